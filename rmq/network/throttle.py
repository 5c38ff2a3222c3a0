"""``rmq.throttle()``: a block of code takes a token of a cluster-wide rate limit before it runs.

For calls to a rate-limited service from anywhere (a task body, a script): it shares the limit's log
with the ``rate_limits`` tasks declare (see :mod:`rmq.network.rate_limiter`), waits a little for a
token and otherwise raises :class:`Defer`, which re-queues a governed task without using its retries.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rmq.core import runtime
from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.core.units import Rate, parse_rate
from rmq.network.rate_limiter import ClusterLimiter, count_outcome, worker_limiter

__all__ = ["DEFAULT_THROTTLE_WAIT_S", "throttle"]

#: ``throttle``'s longest wait for a token outside a worker (inside: ``rmq_throttle_max_wait``)
DEFAULT_THROTTLE_WAIT_S = 2.0


@contextmanager
def throttle(
    name: str, rate: str | Rate, *, max_wait_s: float | None = None, client: Any = None
) -> Iterator[None]:
    """Take a token of the cluster-wide limit ``name`` before running the block.

    Waits (sleeping until the next token) up to ``max_wait_s`` seconds: by default
    ``rmq_throttle_max_wait`` inside a worker, 2 s elsewhere.

    Raises:
        Defer: no token within ``max_wait_s`` (``countdown_s`` = time to the next token); a
            governed task is re-queued without using its retries.
        RateLimiterUnavailable: Redis did not answer, or there is no Redis (outside a worker
            without ``client``).
        ConfigError: ``rate`` is not a rate like ``"10/s"``.
    """
    parsed = parse_rate(rate, f"throttle({name!r}) rate")
    rt = runtime.current()
    if max_wait_s is None:
        max_wait_s = rt.config.throttle_max_wait if rt is not None else DEFAULT_THROTTLE_WAIT_S
    if client is not None:
        limiter = ClusterLimiter(client)
    elif rt is not None:
        limiter = worker_limiter(rt)
    else:
        raise RateLimiterUnavailable(
            f"throttle({name!r}) has no Redis outside a governed worker: pass client=redis.Redis(...)"
        )
    deadline = time.monotonic() + max_wait_s
    caller = secrets.token_hex(8)  # one turn for the whole wait
    slept = 0.0
    while (wait := limiter.acquire(name, parsed, caller)) > 0:
        if wait > deadline - time.monotonic():
            _count_wait(rt, name, slept)
            count_outcome(rt, name, "denied")
            raise Defer(f"rate limit {name!r} ({parsed}) has no token within {max_wait_s:g}s",
                        countdown_s=wait, kind="rate_limit")
        time.sleep(wait)
        slept += wait
    _count_wait(rt, name, slept)
    count_outcome(rt, name, "granted")
    yield


def _count_wait(rt: Any, name: str, slept: float) -> None:
    """Add the seconds slept waiting for a token to ``rate_limits.<name>.wait_s`` (the dashboard's
    rate-limit waits; a wait that ends in a deferral counts too)."""
    if rt is not None and slept > 0:
        rt.stats.incr("rate_limits", name, "wait_s", n=slept)
