"""The sliding-window limiter against a real Redis (its decisions are a Lua script); one process here."""

from __future__ import annotations

import time

from rmq.core import keys
from rmq.core.units import parse_rate
from rmq.network.rate_limiter import ClusterLimiter


def test_grants_count_tokens_per_period_then_returns_the_wait(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("3/s")
    started = time.monotonic()
    grants = [limiter.acquire("api", rate) for _ in range(3)]
    denied = limiter.acquire("api", rate)
    elapsed = time.monotonic() - started
    assert grants == [0.0, 0.0, 0.0]
    # the oldest grant leaves the window one period after it was made
    assert 1.0 - elapsed - 0.05 <= denied <= 1.0
    assert client.zcard(keys.rate_limit("api")) == 3  # a denial records nothing


def test_a_token_is_available_after_the_returned_wait_and_not_before(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("4/s")
    for _ in range(4):
        assert limiter.acquire("api", rate) == 0.0
    wait = limiter.acquire("api", rate)
    assert wait > 0
    time.sleep(wait / 2)
    assert limiter.acquire("api", rate) > 0
    time.sleep(wait / 2 + 0.01)
    assert limiter.acquire("api", rate) == 0.0


def test_limits_with_different_names_do_not_share_tokens(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("1/m")
    assert limiter.acquire("a", rate) == 0.0
    assert limiter.acquire("b", rate) == 0.0
    assert 59.0 < limiter.acquire("a", rate) <= 60.0


def test_a_denial_by_one_limit_consumes_no_token_of_another(client):
    limiter = ClusterLimiter(client)
    limits = {"cheap": parse_rate("100/s"), "tight": parse_rate("1/m")}
    first = limiter.decide(limits)
    second = limiter.decide(limits)
    assert first.granted and first.wait_s == 0.0
    assert not second.granted and second.blocker == "tight" and 59.0 < second.wait_s <= 60.0
    assert client.zcard(keys.rate_limit("cheap")) == 1


def test_idle_limit_keys_expire(client):
    ClusterLimiter(client).acquire("api", parse_rate("5/s"))
    assert 0 < client.pttl(keys.rate_limit("api")) <= 2000


def test_decision_uses_redis_clock(client):
    decision = ClusterLimiter(client).decide({"api": parse_rate("5/s")})
    seconds, micros = client.time()
    assert abs(seconds * 1_000_000 + micros - decision.redis_time_us) < 1_000_000
