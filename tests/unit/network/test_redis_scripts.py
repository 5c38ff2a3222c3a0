"""How the limits' scripts reach Redis: reloaded after NOSCRIPT, and failing closed naming the Redis."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions as rexc

from rmq.core import keys
from rmq.core.errors import RateLimiterUnavailable
from rmq.core.units import parse_rate
from rmq.network.rate_limiter import ClusterLimiter
from rmq.network.semaphore import ClusterSemaphore


class _NoScriptOnce:
    """A client whose first EVALSHA answers NOSCRIPT, as after a Redis restart or SCRIPT FLUSH."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls, self.loads = real, 0, 0
        self.connection_pool = real.connection_pool

    def evalsha(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise rexc.NoScriptError("NOSCRIPT No matching script.")
        return self.real.evalsha(*args)

    def script_load(self, text: str) -> str:
        self.loads += 1
        return self.real.script_load(text)


def test_noscript_loads_the_script_and_retries(client):
    proxy = _NoScriptOnce(client)
    assert ClusterLimiter(proxy).acquire("api", parse_rate("5/s")) == 0.0
    assert (proxy.calls, proxy.loads) == (2, 1)
    assert client.zcard(keys.rate_limit("api")) == 1


def test_unreachable_redis_raises_rate_limiter_unavailable_naming_it(dead_client):
    port = dead_client.connection_pool.connection_kwargs["port"]
    with pytest.raises(RateLimiterUnavailable, match=f"127.0.0.1:{port}.*ConnectionError"):
        ClusterLimiter(dead_client).acquire("api", parse_rate("5/s"))
    sem = ClusterSemaphore(dead_client, 5)
    for call in (lambda: sem.acquire("g", 1, "h"), lambda: sem.renew("g", "h"),
                 lambda: sem.release("g", "h"), lambda: sem.holders("g")):
        with pytest.raises(RateLimiterUnavailable, match=str(port)):
            call()
