"""The ordered guard chain of governed tasks."""

from __future__ import annotations

from functools import lru_cache

from rmq.guards import Guard

__all__ = ["default_guards"]


@lru_cache(maxsize=1)
def _chain() -> tuple[Guard, ...]:
    from rmq import models
    from rmq.cpu.limits import ThreadCapGuard
    from rmq.memory.hygiene import HygieneGuard
    from rmq.network.ratelimit import ConcurrencyGuard, RateLimitGuard
    from rmq.memory.reservation import AdmissionGuard
    from rmq.disk.sessions import SessionGuard

    # Cluster-wide permits and tokens first: a task without one is deferred at once, before it
    # waits for memory while holding a pool process. Hygiene last, so it measures what the
    # task left behind after everything else was released.
    return (
        ConcurrencyGuard(),
        RateLimitGuard(),
        AdmissionGuard(),
        SessionGuard(),
        ThreadCapGuard(),
        HygieneGuard(model_bytes=models.held_bytes),
    )


def default_guards() -> list[Guard]:
    """Concurrency -> rate limits -> admission (memory, CPU, disk) -> session -> thread caps -> hygiene."""
    return list(_chain())
