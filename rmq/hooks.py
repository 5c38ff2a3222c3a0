"""Connects each concern to the worker's lifecycle. Glue only.

Every concern module that needs the worker exposes ``worker_hooks(rt, worker)``; it is called
once in the worker's main process before the pool forks, and registers what it needs on the
runtime: ``rt.process_start_hooks`` / ``rt.process_exit_hooks`` (each pool process),
``rt.main_start_hooks`` / ``rt.main_stop_hooks`` (the main process, around the governor),
``rt.unload_hooks`` (per process, called with bytes to free) and ``rt.snapshot_parts``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from rmq.core.runtime import Runtime

__all__ = ["install_hooks", "CONCERNS"]

log = logging.getLogger("rmq.hooks")

#: modules whose ``worker_hooks`` run, in this order
CONCERNS = ("rmq.models.hooks", "rmq.memory.hygiene", "rmq.network.http", "rmq.monitoring.worker_monitor", "rmq.celery.autoscale")


def install_hooks(rt: Runtime, worker: Any) -> None:
    """Call every concern's ``worker_hooks(rt, worker)`` (main process, before the fork)."""
    for name in CONCERNS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the concern is not there (yet): nothing to wire
                continue
            raise
        hook = getattr(module, "worker_hooks", None)
        if hook is not None:
            hook(rt, worker)
