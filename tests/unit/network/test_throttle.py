"""rmq.throttle() against a real Redis: waits a little for a token, else defers."""

from __future__ import annotations

import time

import pytest

from rmq.core.errors import ConfigError, Defer, RateLimiterUnavailable
from rmq.network.throttle import throttle


def test_throttle_defers_with_the_time_to_the_next_token(client):
    with throttle("api", "1/m", client=client):
        pass
    with pytest.raises(Defer) as info, throttle("api", "1/m", client=client, max_wait_s=0.5):
        pytest.fail("the block must not run without a token")
    assert info.value.kind == "rate_limit"
    assert 59.0 < info.value.countdown_s <= 60.0
    assert "'api'" in info.value.reason


def test_throttle_waits_for_a_token_within_max_wait(client):
    for _ in range(5):
        with throttle("api", "5/s", client=client):
            pass
    started = time.monotonic()
    with throttle("api", "5/s", client=client, max_wait_s=2):
        waited = time.monotonic() - started
    assert 0.5 < waited < 1.5


def test_throttle_outside_a_worker_without_client_is_unavailable():
    with pytest.raises(RateLimiterUnavailable, match="client="), throttle("api", "5/s"):
        pass


def test_throttle_refuses_a_bad_rate(client):
    with pytest.raises(ConfigError, match="10 per s"), throttle("api", "10 per s", client=client):
        pass


def test_throttle_in_a_worker_uses_its_redis_and_counts(client, install_runtime):
    rt = install_runtime(client, throttle_max_wait="0s")
    with throttle("api", "1/m"):
        pass
    with pytest.raises(Defer), throttle("api", "1/m"):
        pass
    assert rt.stats.counters["rate_limits"]["api"] == {"granted": 1, "denied": 1}


def test_throttle_in_a_worker_counts_the_seconds_it_waited_for_a_token(client, install_runtime):
    rt = install_runtime(client, throttle_max_wait="2s")
    for _ in range(5):
        with throttle("api", "5/s"):
            pass
    assert "wait_s" not in rt.stats.counters["rate_limits"]["api"]  # tokens at hand: no wait
    with throttle("api", "5/s"):
        pass
    counted = rt.stats.counters["rate_limits"]["api"]
    assert counted["granted"] == 6 and 0.5 < counted["wait_s"] < 1.5
