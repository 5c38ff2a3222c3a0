"""Connects each concern to the worker's lifecycle: what runs in the main process when the
governor starts, and in every pool process when it starts and ends. Glue only."""

from __future__ import annotations

import logging
from typing import Any

from .runtime import Runtime

__all__ = ["install_hooks"]

log = logging.getLogger("rmq.hooks")


def _models(rt: Runtime) -> None:
    from . import models
    from .reservation import LedgerReserver

    models.set_reserver_factory(lambda: LedgerReserver(rt))

    def start(rt: Runtime) -> None:
        def relieve(bytes_wanted: int) -> int:
            freed = models.cache().relieve(bytes_wanted, "pressure")
            rt.stats.flush(force=True)  # an idle process has no task end to flush at
            return freed

        rt.unload_hooks.append(relieve)

    def end(rt: Runtime) -> None:
        models.cache().close()

    rt.process_start_hooks.append(start)
    rt.process_exit_hooks.append(end)


def install_hooks(rt: Runtime, worker: Any) -> None:
    """Register every concern's hooks on ``rt`` (main process, before the pool forks)."""
    _models(rt)
    for name in ("_hygiene", "_http"):
        fn = globals().get(name)
        if fn is not None:
            fn(rt)
