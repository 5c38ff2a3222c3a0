"""The concurrency concern: a task holds a permit of every concurrency limit it declares while it runs.

``@governed_task(concurrency={"gpu-api": 4})`` declares them; permits are leases of cluster-wide
semaphores (see :mod:`rmq.network.semaphore`), kept alive by the process's
:class:`~rmq.network.lease_keeper.LeaseKeeper` and given back when the task ends. A task that finds
a limit full is deferred. See docs/design.md#rate-limits.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from rmq.concern import Concern, TaskContext
from rmq.core import runtime
from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.network.lease_keeper import LeaseKeeper
from rmq.network.semaphore import ClusterSemaphore

__all__ = ["ConcurrencyGuard"]

log = logging.getLogger(__name__)

# ``Runtime.local`` keys of a worker process's one semaphore client and one lease keeper
_WORKER_SEMAPHORE = "rmq.network.concurrency_guard.semaphore"
_WORKER_KEEPER = "rmq.network.concurrency_guard.keeper"


class ConcurrencyGuard(Concern):
    """Holds a permit of every declared concurrency limit while the task runs, or defers it.

    Permits are leases renewed by the process's :class:`LeaseKeeper`; a killed process stops
    renewing and its permits lapse after ``rmq_concurrency_lease``.
    """

    name = "concurrency"
    #: countdown of a task deferred because a limit was full (no way to know when it frees)
    retry_s = 1.0

    def applies(self, declaration: Any) -> bool:
        return bool(declaration.concurrency)

    @staticmethod
    def _parts(rt: Any) -> tuple[ClusterSemaphore, LeaseKeeper]:
        sem = rt.local(_WORKER_SEMAPHORE, lambda: ClusterSemaphore(rt.redis(), rt.config.concurrency_lease))
        return sem, rt.local(_WORKER_KEEPER, lambda: LeaseKeeper(sem))

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or runtime.current()
        if rt is None:
            return
        limits = ctx.declaration.concurrency
        holder = f"{socket.gethostname()}:{os.getpid()}:{ctx.task_id}"
        try:
            sem, keeper = self._parts(rt)
            full = sem.acquire_all(limits, holder)
        except RateLimiterUnavailable as exc:
            log.warning("rmq: %s[%s] deferred %.1fs, concurrency limits %s not checked (failing closed): %s",
                        ctx.task_name, ctx.task_id, ctx.config.defer_countdown, sorted(limits), exc)
            raise Defer(f"concurrency limiter unavailable: {exc}", countdown_s=ctx.config.defer_countdown,
                        kind="concurrency_unavailable") from exc
        if full is not None:
            rt.stats.incr("concurrency", full, "denied")
            raise Defer(f"concurrency limit {full!r} ({limits[full]}) is full",
                        countdown_s=self.retry_s, kind="concurrency")
        for name, limit in limits.items():
            rt.stats.incr("concurrency", name, "granted")
            keeper.add(name, holder, limit)
        keeper.start()
        ctx.state[self.name] = holder

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        holder = ctx.state.pop(self.name, None)
        rt = ctx.runtime or runtime.current()
        if holder is None or rt is None:
            return
        sem, keeper = self._parts(rt)
        for name in ctx.declaration.concurrency:
            keeper.discard(name, holder)
            try:
                sem.release(name, holder)
            except RateLimiterUnavailable as exc:
                log.warning("rmq: permit of %r for %s not released, it lapses in %.0fs: %s",
                            name, holder, sem.lease_s, exc)
