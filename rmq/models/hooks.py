"""Wires the model cache into a worker: ledger-admitted loads, unloading under pressure."""

from __future__ import annotations

from typing import Any

from ..runtime import Runtime

__all__ = ["worker_hooks"]


def worker_hooks(rt: Runtime, worker: Any) -> None:
    """Main process, before the fork: every pool process's cache reserves loads in the ledger,
    unloads when the governor (or a waiting admission) asks, and closes on exit."""
    from ..reservation import LedgerReserver
    from . import cache, set_reserver_factory

    set_reserver_factory(lambda: LedgerReserver(rt))

    def start(rt: Runtime) -> None:
        def relieve(bytes_wanted: int) -> int:
            freed = cache().relieve(bytes_wanted, "pressure")
            rt.stats.flush(force=True)  # an idle process has no task end to flush at
            return freed

        rt.unload_hooks.append(relieve)

    rt.process_start_hooks.append(start)
    rt.process_exit_hooks.append(lambda rt: cache().close())
