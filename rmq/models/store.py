"""Resident models of one process and how they leave: LRU choice, caps, real unloading.

:class:`ModelStore` is the eviction half of :class:`rmq.models.cache.ModelCache`; the
loading half lives there. Unloading calls the registered ``unload`` hook, else the object's
``unload()`` or ``close()``, drops the store's references, runs ``gc.collect()`` and
``malloc_trim(0)`` (and empties torch's CUDA cache), and only then releases the model's
reservation, so the ledger never counts as free memory the OS has not got back.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmq.core import runtime as rt_mod
from rmq.core.units import format_bytes
from rmq.memory import trim as memtrim
from rmq.models.admission import NullReserver, Reserver
from rmq.models.registry import ModelSpec

__all__ = ["ModelStore"]

logger = logging.getLogger("rmq.models")


@dataclass
class _Entry:
    spec: ModelSpec
    obj: Any
    size_bytes: int
    measured: bool
    last_used: float
    seq: int
    leases: int = 0


class ModelStore:
    """Loaded models, their LRU order, caps and eviction. Thread-safe.

    Args:
        max_memory_bytes: evict LRU models to keep the total size under this (None: no cap).
        max_count: evict LRU models to keep at most this many (None: no cap).
        clock: time recorded as ``last_used`` and used for LRU order (default ``time.time``).
        reserver: admission of loads, released on unload (default: grants everything).
        trim: return freed heap to the OS with ``malloc_trim(0)`` after unloading (default True).
    """

    def __init__(
        self,
        *,
        max_memory_bytes: int | None = None,
        max_count: int | None = None,
        clock: Callable[[], float] = time.time,
        reserver: Reserver | None = None,
        trim: bool = True,
    ) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.max_count = max_count
        self.clock = clock
        self.trim = trim
        self._reserver: Reserver = reserver or NullReserver()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._loads: dict[str, int] = {}
        self._seq = 0
        #: local copy of the counters also sent to ``rt.stats`` under "models"
        self.counters: dict[str, Any] = {
            "hits": 0, "misses": 0, "loads": 0, "load_seconds": 0.0, "load_errors": 0,
            "denied": 0, "evictions": {}, "bytes_loaded": 0, "bytes_unloaded": 0,
        }  # fmt: skip

    def relieve(self, bytes_to_free: int, reason: str) -> int:
        """Unload LRU unpinned, unleased models until ``bytes_to_free`` are freed or none is left.

        Returns:
            Bytes freed, by the models' declared or measured sizes.
        """
        if bytes_to_free <= 0:
            return 0
        victims: list[_Entry] = []
        freed = 0
        with self._lock:
            for entry in self._candidates(keep=None):
                if freed >= bytes_to_free:
                    break
                victims.append(self._entries.pop(entry.spec.name))
                freed += entry.size_bytes
        self._unload(victims, reason)
        return freed

    def evict(self, name: str, reason: str = "manual") -> bool:
        """Unload ``name`` now, pinned or not; False if it is not loaded or is leased."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.leases:
                return False
            del self._entries[name]
        self._unload([entry], reason)
        return True

    def close(self, reason: str = "shutdown") -> int:
        """Unload every unleased model, pinned ones included; returns the bytes freed."""
        with self._lock:
            victims = [e for e in self._entries.values() if not e.leases]
            for entry in victims:
                del self._entries[entry.spec.name]
        self._unload(victims, reason)
        return sum(e.size_bytes for e in victims)

    def snapshot(self) -> list[dict[str, Any]]:
        """Loaded models, least recently used first, for the per-process ``models`` gauge."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: (e.last_used, e.seq))
            return [
                {
                    "name": e.spec.name,
                    "size_bytes": e.size_bytes,
                    "size_source": "measured" if e.measured else "declared",
                    "pinned": e.spec.pinned,
                    "leased": e.leases > 0,
                    "leases": e.leases,
                    "last_used": e.last_used,
                    "loads": self._loads.get(e.spec.name, 0),
                }
                for e in entries
            ]

    @property
    def held_bytes(self) -> int:
        """Total size of the loaded models."""
        if not self._entries:  # the common case, read once per task: no lock needed to see it empty
            return 0
        with self._lock:
            return sum(e.size_bytes for e in self._entries.values())

    def names(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return [m["name"] for m in self.snapshot()]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    # -- policy (callers of the underscore methods that say so hold self._lock) -------------

    def _touch(self, entry: _Entry) -> None:
        self._seq += 1
        entry.last_used, entry.seq = self.clock(), self._seq

    def _candidates(self, keep: str | None) -> list[_Entry]:
        """Evictable entries, LRU first (lock held)."""
        found = [e for e in self._entries.values() if not (e.spec.pinned or e.leases or e.spec.name == keep)]
        return sorted(found, key=lambda e: (e.last_used, e.seq))

    def _excess(self, extra_bytes: int, extra_count: int) -> list[str]:
        """The caps exceeded if ``extra`` more were loaded (lock held)."""
        out = []
        count = len(self._entries) + extra_count
        held = sum(e.size_bytes for e in self._entries.values()) + extra_bytes
        if self.max_count is not None and count > self.max_count:
            out.append(f"rmq_models_max_count ({count} > {self.max_count})")
        if self.max_memory_bytes is not None and held > self.max_memory_bytes:
            out.append(
                f"rmq_models_max_memory ({format_bytes(held)} > {format_bytes(self.max_memory_bytes)})"
            )
        return out

    def _over_caps(self) -> bool:
        with self._lock:
            return bool(self._excess(0, 0))

    def _fit_caps(self, extra_bytes: int, extra_count: int, keep: str | None) -> None:
        """Evict LRU models until ``extra`` more fit the caps; warn if ``keep`` stays over them."""
        victims: list[_Entry] = []
        with self._lock:
            for entry in self._candidates(keep):
                if not self._excess(extra_bytes, extra_count):
                    break
                victims.append(self._entries.pop(entry.spec.name))
            excess = self._excess(extra_bytes, extra_count)
            holders = [f"{e.spec.name}{' (pinned)' if e.spec.pinned else ''}" for e in self._entries.values()]
        self._unload(victims, "cap")
        if excess and keep is not None:
            logger.warning(
                "model cache over %s after loading %r: the other models are pinned or in use (%s); "
                "keeping them all, the worker's memory budget still applies",
                " and ".join(excess), keep, ", ".join(holders),
            )  # fmt: skip

    def _unload(self, victims: list[_Entry], reason: str) -> None:
        """Unload entries already removed from the store."""
        if not victims:
            return
        for entry in victims:
            obj, entry.obj = entry.obj, None
            try:
                self._call_unload_hook(entry.spec, obj)
            except Exception:
                logger.warning(
                    "unload hook of model %r raised; dropping it anyway", entry.spec.name, exc_info=True
                )
            del obj
        self._trim()
        for entry in victims:
            self._reserver.release(f"model:{entry.spec.name}")
            with self._lock:
                self._count("evictions", reason)
                self._count("bytes_unloaded", n=entry.size_bytes)
            logger.info("unloaded model %r (%s, %s)", entry.spec.name, format_bytes(entry.size_bytes), reason)
        self._publish()

    @staticmethod
    def _call_unload_hook(spec: ModelSpec, obj: Any) -> None:
        if spec.unload is not None:
            spec.unload(obj)
            return
        for attr in ("unload", "close"):
            method = getattr(obj, attr, None)
            if callable(method):
                method()
                return

    def _trim(self) -> None:
        if self.trim:
            memtrim.collect_and_trim()
        else:
            gc.collect()

    def _count(self, *path: str, n: float = 1) -> None:
        """Add to the local counter and to ``rt.stats`` (lock held)."""
        node = self.counters
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = node.get(path[-1], 0) + n
        rt = rt_mod.current()
        if rt is not None:
            rt.stats.incr("models", *path, n=n)

    def _publish(self) -> None:
        rt = rt_mod.current()
        if rt is not None:
            rt.stats.set_gauge("models", self.snapshot())
