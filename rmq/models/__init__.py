"""Model cache (``docs/design.md#models``): register loaders, get or lease models, unload them for real.

Users write::

    from rmq import models

    @models.register("whisper_base", size="1.5GiB", pinned=True)
    def load_whisper():
        ...

    with models.use("whisper_base") as model:   # leased: never evicted while in use
        ...

There is one cache per process (pool processes each have theirs); ``models.cache()`` returns
this process's one, made on first use with the worker's ``rmq_models_*`` settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rmq.core import forks
from rmq.core import runtime as rt_mod
from rmq.models.admission import NullReserver, Reserver
from rmq.models.cache import ModelCache, rss_probe
from rmq.models.registry import REGISTRY, ModelSpec, Registry

__all__ = [
    "REGISTRY",
    "ModelCache",
    "ModelSpec",
    "NullReserver",
    "Registry",
    "Reserver",
    "cache",
    "get",
    "held_bytes",
    "loaded_bytes",
    "register",
    "rss_probe",
    "set_reserver_factory",
    "set_task_probe",
    "use",
]

_RUNTIME_KEY = "rmq.models.cache"
_cache: ModelCache | None = None
_cache_pid = -1
_cache_lock = threading.Lock()
_reserver_factory: Callable[[], Reserver] | None = None
_task_probe: Callable[[], bool] | None = None


def register(
    name: str,
    size: object = None,
    pinned: bool = False,
    loader: Callable[[], Any] | None = None,
    unload: Callable[[Any], None] | None = None,
) -> Any:
    """Register a model loader; a decorator when ``loader`` is not given.

    Args:
        name: the model's name.
        size: ``"1.5GiB"`` or bytes; ``None`` measures the process's growth during the load.
        pinned: never unloaded by memory pressure or by ``rmq_models_max_*``.
        loader: builds the model; called once per process on first use.
        unload: called with the model before it is dropped (else its ``unload()``/``close()``).

    Raises:
        ConfigError: bad argument, or the name is taken by another loader.
    """
    return REGISTRY.register(name, size=size, pinned=pinned, loader=loader, unload=unload)


def set_reserver_factory(factory: Callable[[], Reserver] | None) -> None:
    """Make every cache created from now on (one per process) reserve loads via ``factory()``.

    The worker glue (:class:`rmq.models.concern.ModelsConcern`) sets this before the pool forks:
    ``models.set_reserver_factory(lambda: LedgerModelReserver(rt))``.
    """
    global _reserver_factory
    _reserver_factory = factory


def set_task_probe(probe: Callable[[], bool] | None) -> None:
    """Make caches created from now on ask ``probe()`` whether a governed task runs in the
    calling thread: a load refused for memory then defers that task (:class:`rmq.core.errors.Defer`);
    anywhere else it raises :class:`rmq.core.errors.ModelLoadError`. None: "a runtime exists"."""
    global _task_probe
    _task_probe = probe


def _new_cache(rt: rt_mod.Runtime | None) -> ModelCache:
    reserver = _reserver_factory() if _reserver_factory is not None else None
    if rt is None:
        return ModelCache(reserver=reserver, in_task=_task_probe)
    cfg = rt.config
    return ModelCache(
        max_memory_bytes=cfg.models_max_memory,
        max_count=cfg.models_max_count,
        load_wait_s=cfg.model_load_wait,
        defer_countdown_s=cfg.defer_countdown,
        reserver=reserver,
        in_task=_task_probe,
    )


def _new_runtime_cache() -> ModelCache:
    return _new_cache(rt_mod.current())


def cache() -> ModelCache:
    """This process's model cache (a new one after a fork; the runtime's in a worker)."""
    global _cache, _cache_pid, _cache_lock
    rt = rt_mod.current()
    if rt is not None:
        return rt.local(_RUNTIME_KEY, _new_runtime_cache)  # type: ignore[no-any-return]
    pid = forks.pid()
    if _cache_pid != pid:
        _cache_lock = threading.Lock()  # the parent's lock may have been held when it forked
    with _cache_lock:
        if _cache is None or _cache_pid != pid:
            _cache, _cache_pid = _new_cache(None), pid
        return _cache


def _made_cache() -> ModelCache | None:
    """This process's cache if one was made, without making one (most tasks use no model)."""
    rt = rt_mod.current()
    if rt is not None:
        return rt.made(_RUNTIME_KEY)  # type: ignore[no-any-return]
    return _cache if _cache_pid == forks.pid() else None


def get(name: str) -> Any:
    """The model ``name`` from this process's cache, loaded on first use (not leased).

    Raises:
        ModelNotRegistered: unknown name.
        ModelLoadError: the loader raised (cause chained).
        Defer: inside a task, when the worker's memory budget has no room for the load.
    """
    return cache().get(name)


def held_bytes() -> int:
    """Bytes of the models this process holds (declared or measured sizes)."""
    # read four times per governed task (admission and hygiene, before and after it): in a worker, one
    # dict look-up and no helper calls, each of which costs about 1 us in a busy pool process
    rt = rt_mod._current
    made = rt.made(_RUNTIME_KEY) if rt is not None else _made_cache()
    return made.held_bytes if made is not None else 0


def loaded_bytes() -> int:
    """Bytes this process has loaded so far (a running total, never decreases).

    The difference across a task is the memory it spent on model loads, which stays in the
    cache (and in the ledger) after the task: not part of the task's own peak.
    """
    rt = rt_mod._current  # as in held_bytes: read twice per governed task
    made = rt.made(_RUNTIME_KEY) if rt is not None else _made_cache()
    return int(made.counters.get("bytes_loaded", 0)) if made is not None else 0


@contextmanager
def use(name: str) -> Iterator[Any]:
    """Lease the model ``name`` for the ``with`` block; raises like :func:`get`."""
    with cache().use(name) as model:
        yield model
