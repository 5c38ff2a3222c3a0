"""The model cache as a worker concern: ledger-admitted loads, unloading under pressure."""

from __future__ import annotations

import os
from typing import Any

from rmq.concern import Concern, current_context
from rmq.core import procstats
from rmq.core.ledger import KIND_MODEL
from rmq.core.runtime import Runtime
from rmq.models import REGISTRY, cache, set_reserver_factory, set_task_probe
from rmq.models.relief import plan_relief, resident_models
from rmq.models.reserver import LedgerModelReserver

__all__ = ["ModelsConcern", "in_governed_task", "pressure_bytes", "relieve_worker"]


def in_governed_task() -> bool:
    """True in a thread that runs a governed task body (its concerns entered, not yet exited)."""
    return current_context() is not None


def pressure_bytes(rt: Runtime, signalled_bytes: int) -> int:
    """What to free for one unload signal.

    The governor publishes the bytes with each tick, not with each signal: a watcher that reads
    the new generation a tick late sees 0. Then free what the current reading is above the
    unload target, and at least one model (someone asked for memory).
    """
    if signalled_bytes > 0:
        return signalled_bytes
    c = rt.ledger.read_control()
    return max(1, c.worker_bytes - int(c.budget_bytes * rt.config.unload_target_ratio))


def relieve_worker(rt: Runtime, bytes_wanted: int) -> int:
    """Unload this process's share of the worker's least recently used models (see
    :mod:`rmq.models.relief`); returns the bytes this process freed.

    Before unloading, the share is published (the ``relief`` gauge, flushed at once) with the
    signal's generation: a process that plans later for the same signal, when these models have
    already left the ledger, counts them as freed instead of taking more.
    """
    pid = os.getpid()
    generation = rt.ledger.read_control().unload_generation
    models = cache()
    own = models.snapshot()
    published = {other: data.get("gauges", {}) for other, data in procstats.read_all(rt.runtime_dir).items()}
    claimed: set[tuple[int, str]] = set()
    for other, gauges in published.items():
        relief = gauges.get("relief") or {}
        if other != pid and relief.get("generation") == generation:
            claimed.update((other, name) for name in relief.get("names", []))
            bytes_wanted -= int(relief.get("bytes", 0))
    reservations = [
        (e.pid, e.name.removeprefix("model:"), e.memory_bytes) for e in rt.ledger.entries() if e.kind == KIND_MODEL
    ]
    gauges = {other: g.get("models", []) for other, g in published.items() if other != pid}
    residents = [
        r for r in resident_models(pid, own, reservations, gauges, REGISTRY) if (r.pid, r.name) not in claimed
    ]
    mine = [r for r in plan_relief(residents, bytes_wanted) if r.pid == pid]
    if not mine:
        return 0
    claim = {"generation": generation, "bytes": sum(r.size_bytes for r in mine), "names": [r.name for r in mine]}
    rt.stats.set_gauge("relief", claim)
    rt.stats.flush(force=True)
    return sum(r.size_bytes for r in mine if models.evict(r.name, "pressure"))


class ModelsConcern(Concern):
    """Every pool process's cache reserves its loads in the worker's ledger, unloads its share when
    the governor (or a waiting load) asks, and closes on exit."""

    name = "models"

    def worker_boot(self, rt: Runtime, worker: Any) -> None:
        set_reserver_factory(lambda: LedgerModelReserver(rt))
        set_task_probe(in_governed_task)

    def process_start(self, rt: Runtime) -> None:
        def relieve(bytes_wanted: int) -> int:
            freed = relieve_worker(rt, pressure_bytes(rt, bytes_wanted))
            rt.stats.flush(force=True)  # an idle process has no task end to flush at
            return freed

        rt.unload_hooks.append(relieve)

    def process_exit(self, rt: Runtime) -> None:
        cache().close()
