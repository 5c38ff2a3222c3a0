"""The rate-limit concern against a real Redis: admits with a token, defers without one, fails closed."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from rmq.core import runtime
from rmq.core.declarations import parse_declaration
from rmq.core.errors import Defer
from rmq.network.rate_limit_guard import RateLimitGuard
from rmq.network.rate_limiter import ClusterLimiter


def test_rate_limit_guard_admits_then_defers_without_waiting(client, install_runtime, task_context):
    rt = install_runtime(client)
    guard = RateLimitGuard()
    ctx = task_context(rt, rate_limits={"tts-api": "2/m"})
    assert guard.applies(ctx.declaration) and not guard.applies(parse_declaration())
    guard.enter(ctx)
    guard.enter(ctx)
    started = time.monotonic()
    with pytest.raises(Defer) as info:
        guard.enter(ctx)
    assert time.monotonic() - started < 0.5
    assert info.value.kind == "rate_limit" and 59.0 < info.value.countdown_s <= 60.0
    assert rt.stats.counters["rate_limits"]["tts-api"] == {"granted": 2, "denied": 1}


def test_rate_limit_guard_fails_closed_and_logs_why(dead_client, install_runtime, task_context, caplog):
    rt = install_runtime(dead_client, defer_countdown="3s")
    ctx = task_context(rt, rate_limits={"tts-api": "10/s"})
    with caplog.at_level(logging.WARNING, logger="rmq.network.rate_limit_guard"), pytest.raises(Defer) as info:
        RateLimitGuard().enter(ctx)
    assert info.value.kind == "rate_limit_unavailable" and info.value.countdown_s == 3.0
    port = dead_client.connection_pool.connection_kwargs["port"]
    assert any(f"127.0.0.1:{port}" in r.getMessage() and "failing closed" in r.getMessage()
               for r in caplog.records)


def test_the_rate_limit_guard_does_nothing_outside_a_worker(dead_client, make_runtime, task_context, monkeypatch):
    # Given no current runtime (outside a governed worker) and a context that carries none either
    monkeypatch.setattr(runtime, "_current", None)
    calls: list[str] = []

    def never(name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)  # recorded too, in case the guard swallows the error
            raise AssertionError(f"{name} called outside a worker")
        return called

    monkeypatch.setattr(ClusterLimiter, "decide", never("ClusterLimiter.decide"))
    rt = make_runtime(dead_client)  # only for its config
    rated = task_context(rt, rate_limits={"x": "1/s"})
    assert rated.runtime is None
    # When the guard runs before a task
    RateLimitGuard().enter(rated)
    # Then no limit was consulted and no token granted (and nothing raised)
    assert calls == []
    assert rated.state == {}
    assert rt._local == {} and rt.stats.counters == {}
