"""The per-process model cache: load on first use, leases, admission through the ledger.

Policy, in one place (eviction itself is in :mod:`rmq.models.store`):

- A model is loaded by the first ``get``/``use`` of its name; concurrent callers of the same
  name wait for that one load; loads of different names run in parallel (the cache lock is
  never held while a loader, an unload hook or the reserver runs).
- Eviction takes the least recently used model that is neither pinned nor leased. Pinned
  models are never evicted by pressure (``relieve``) or by the caps; leased ones by nothing.
- Caps (``max_memory_bytes``, ``max_count``) are eviction targets, not refusals: when only
  pinned or leased models stand in the way, the load goes ahead and a WARNING says which cap
  is exceeded, by how much and by whom. Refusing would fail every task that needs the model,
  with no recovery short of a config change, while the hard limit that protects the worker,
  its memory budget, is enforced by the ledger reservation that every load takes.
- Before loading, the model's size (declared, else the size measured at its last load in this
  process, else 0) is reserved through a :class:`~rmq.models.admission.Reserver` (in a worker,
  :class:`~rmq.models.reserver.LedgerModelReserver`). Refused: this process evicts its own LRU
  models, then the other pool processes are asked, waiting up to ``load_wait_s``. Refused again:
  the load raises :class:`rmq.core.errors.Defer` inside a governed task (the task is re-queued), else
  :class:`rmq.core.errors.ModelLoadError`. A resident model holds its reservation until unloaded.
- Undeclared sizes are the growth of ``memory_probe()`` during the load; a concurrent load in
  another thread of the same process inflates it, so declare sizes where that matters.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rmq.core import runtime as rt_mod
from rmq.core.errors import Defer, ModelLoadError
from rmq.core.units import format_bytes
from rmq.models.admission import Reserver
from rmq.models.registry import REGISTRY, ModelSpec, Registry
from rmq.models.store import ModelStore, _Entry

__all__ = ["ModelCache", "rss_probe"]

logger = logging.getLogger("rmq.models")


def rss_probe() -> int:
    """This process's resident set size in bytes (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


class _Pending:
    """One load in progress; callers of the same name wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


def _for_waiter(error: BaseException) -> BaseException:
    """The error a caller that waited for someone else's failed load raises."""
    if isinstance(error, Defer):
        return Defer(error.reason, error.countdown_s, error.kind)
    new = ModelLoadError(str(error))
    new.__cause__ = error.__cause__ if isinstance(error, ModelLoadError) else error
    return new


class ModelCache(ModelStore):
    """Models loaded in this process. Thread-safe; one per process (see ``models.cache()``).

    Args:
        registry: where names are looked up (default: the global ``models.register`` one).
        max_memory_bytes: evict LRU models to keep the total size under this (None: no cap).
        max_count: evict LRU models to keep at most this many (None: no cap).
        memory_probe: this process's memory in bytes, to measure undeclared sizes (default RSS).
        clock: time recorded as ``last_used`` and used for LRU order (default ``time.time``).
        reserver: admission of loads (default: grants everything).
        load_wait_s: how long the second reservation attempt may wait (default 10 s).
        defer_countdown_s: countdown of the ``Defer`` raised when a load is refused in a task.
        trim: return freed heap to the OS with ``malloc_trim(0)`` after unloading (default True).
        in_task: whether the caller runs in a governed task (default: a runtime exists).
    """

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        max_memory_bytes: int | None = None,
        max_count: int | None = None,
        memory_probe: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        reserver: Reserver | None = None,
        load_wait_s: float = 10.0,
        defer_countdown_s: float = 2.0,
        trim: bool = True,
        in_task: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(
            max_memory_bytes=max_memory_bytes, max_count=max_count, clock=clock, reserver=reserver, trim=trim
        )
        self.registry = registry if registry is not None else REGISTRY
        self.memory_probe = memory_probe or rss_probe
        self.load_wait_s = load_wait_s
        self.defer_countdown_s = defer_countdown_s
        self._in_task = in_task or (lambda: rt_mod.current() is not None)
        self._loading: dict[str, _Pending] = {}
        self._measured: dict[str, int] = {}

    def get(self, name: str) -> Any:
        """The model ``name``, loaded on first use; not leased.

        Pressure may unload it later: inside tasks prefer ``use``, and do not keep the returned
        object around (a reference kept outside the cache keeps its memory).

        Raises:
            ModelNotRegistered: unknown name.
            ModelLoadError: the loader raised (cause chained), or no room outside a task.
            Defer: no room in the worker's memory budget, inside a task.
        """
        return self._acquire(name, lease=False).obj

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Lease the model ``name`` for the block: nothing evicts it meanwhile. Raises as ``get``."""
        entry = self._acquire(name, lease=True)
        try:
            yield entry.obj
        finally:
            with self._lock:
                entry.leases -= 1
                self._touch(entry)
            if self._over_caps():  # leases may have kept the cache over a cap
                self._fit_caps(0, 0, keep=None)
            self._publish()  # the gauge shows leases and LRU order

    def _acquire(self, name: str, lease: bool) -> _Entry:
        spec = self.registry.get(name)
        first = True
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:
                    self._touch(entry)
                    entry.leases += int(lease)
                    if first:
                        self._count("hits")
                else:
                    if first:
                        self._count("misses")
                        first = False
                    found = self._loading.get(name)
                    owner = found is None
                    pending = found if found is not None else self._loading.setdefault(name, _Pending())
            if entry is not None:
                if lease:
                    self._publish()  # the gauge shows the lease
                return entry
            if owner:
                return self._load(spec, pending, lease)
            pending.done.wait()
            if pending.error is not None:
                raise _for_waiter(pending.error)

    def _load(self, spec: ModelSpec, pending: _Pending, lease: bool) -> _Entry:
        name, key = spec.name, f"model:{spec.name}"
        try:
            guess = spec.size_bytes if spec.size_bytes is not None else self._measured.get(name, 0)
            self._fit_caps(guess, 1, keep=None)
            self._reserve(name, key, guess)
            try:
                obj, size, measured, seconds = self._call_loader(spec)
            except BaseException:
                self._reserver.release(key)
                raise
            with self._lock:
                self._seq += 1
                entry = _Entry(spec, obj, size, measured, self.clock(), self._seq, int(lease))
                del obj
                self._entries[name] = entry
                self._loads[name] = self._loads.get(name, 0) + 1
                if measured:
                    self._measured[name] = size
                self._count("loads")
                self._count("load_seconds", n=seconds)
                self._count("bytes_loaded", n=size)
            how = "measured" if measured else "declared"
            logger.info("loaded model %r in %.2fs (%s %s)", name, seconds, format_bytes(size), how)
            self._fit_caps(0, 0, keep=name)
            self._publish()
            return entry
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
            pending.done.set()

    def _reserve(self, name: str, key: str, size_bytes: int) -> None:
        admit = getattr(self._reserver, "admit", None)
        if admit is not None:  # the worker's reserver: it knows how much is missing
            if admit(key, size_bytes, self.load_wait_s, lambda n: self.relieve(n, "admission")):
                return
        elif self._reserver.reserve(key, size_bytes, 0.0):
            return
        else:
            self.relieve(size_bytes, "admission")
            if self._reserver.reserve(key, size_bytes, self.load_wait_s):
                return
        with self._lock:
            self._count("denied")
        reason = f"model {name!r} needs {format_bytes(size_bytes)} and the worker's memory budget has no room"
        if self._in_task():
            raise Defer(reason, self.defer_countdown_s, kind="model_memory")
        raise ModelLoadError(f"cannot load: {reason}")

    def _call_loader(self, spec: ModelSpec) -> tuple[Any, int, bool, float]:
        before = self.memory_probe() if spec.size_bytes is None else 0
        t0 = time.perf_counter()
        try:
            obj = spec.loader()
        except Defer:
            raise
        except Exception as exc:
            with self._lock:
                self._count("load_errors")
            # the loader's frames hold the half-built model: free it, keep the traceback's text
            traceback.clear_frames(exc.__traceback__)
            self._trim()
            raise ModelLoadError(f"loading model {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - t0
        if spec.size_bytes is not None:
            return obj, spec.size_bytes, False, seconds
        return obj, max(0, int(self.memory_probe()) - int(before)), True, seconds
