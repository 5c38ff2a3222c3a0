"""The rate-limit concern: a task takes a token of every rate limit it declares before it runs.

``@governed_task(rate_limits={"tts-api": "10/s"})`` declares them; the tokens come from the same
cluster-wide logs as ``rmq.throttle()`` (see :mod:`rmq.network.rate_limiter`). A task without a
token is deferred, not run late in a pool process it would hold while waiting. See
docs/design.md#rate-limits.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rmq.concern import Concern, TaskContext
from rmq.core import runtime
from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.network.rate_limiter import count_outcome, worker_limiter

__all__ = ["GRANTED_US", "RateLimitGuard"]

log = logging.getLogger(__name__)

#: ``TaskContext.state`` key holding the Redis time (us) at which a task's tokens were granted
GRANTED_US = "rate_limit_granted_us"


class RateLimitGuard(Concern):
    """Takes a token of every declared rate limit before the task runs, or defers it.

    All limits are checked in one script before any token is recorded, so a task denied by
    one limit never consumes another's token. A denied task defers (it must not hold a pool
    slot) until its turn; only a token due within ``inline_wait_s`` is waited for in place,
    which is cheaper than a deferral. The grant's Redis time (microseconds) is left in
    ``ctx.state[GRANTED_US]`` for the task (``self.rmq_context``).
    """

    name = "rate_limit"
    #: longest wait for a token spent in the pool process instead of deferring
    inline_wait_s = 0.1

    def applies(self, declaration: Any) -> bool:
        return bool(declaration.rate_limits)

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or runtime.current()
        if rt is None:
            return
        limits = ctx.declaration.rate_limits
        deadline = time.monotonic() + self.inline_wait_s
        try:
            limiter = worker_limiter(rt)
            while not (decision := limiter.decide(limits, ctx.task_id)).granted:
                if decision.wait_s > deadline - time.monotonic():
                    break
                time.sleep(decision.wait_s)
        except RateLimiterUnavailable as exc:
            log.warning("rmq: %s[%s] deferred %.1fs, rate limits %s not checked (failing closed): %s",
                        ctx.task_name, ctx.task_id, ctx.config.defer_countdown, sorted(limits), exc)
            for name in limits:
                count_outcome(rt, name, "unavailable")
            raise Defer(f"rate limiter unavailable: {exc}", countdown_s=ctx.config.defer_countdown,
                        kind="rate_limit_unavailable") from exc
        if decision.granted:
            for name in limits:
                count_outcome(rt, name, "granted")
            ctx.state[GRANTED_US] = decision.redis_time_us
            return
        blocker = decision.blocker or next(iter(limits))
        count_outcome(rt, blocker, "denied")
        raise Defer(f"rate limit {blocker!r} ({limits[blocker]}) has no token for {decision.wait_s:.3f}s",
                    countdown_s=decision.wait_s, kind="rate_limit")
