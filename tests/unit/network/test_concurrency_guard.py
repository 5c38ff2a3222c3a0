"""The concurrency concern against a real Redis: holds, renews and releases permits; fails closed."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from rmq.core import runtime
from rmq.core.errors import Defer
from rmq.network.concurrency_guard import ConcurrencyGuard
from rmq.network.semaphore import ClusterSemaphore


def test_concurrency_guard_holds_renews_and_releases(client, install_runtime, task_context):
    rt = install_runtime(client, concurrency_lease="600ms")
    guard = ConcurrencyGuard()
    first = task_context(rt, "t1", concurrency={"gpu-api": 1})
    second = task_context(rt, "t2", concurrency={"gpu-api": 1})
    guard.enter(first)
    time.sleep(1.5)  # longer than the lease: only renewal keeps the permit
    with pytest.raises(Defer) as info:
        guard.enter(second)
    assert info.value.kind == "concurrency" and 0 < info.value.countdown_s <= 1.0
    guard.exit(first, failed=False)
    guard.enter(second)
    sem = ClusterSemaphore(client, 1)
    assert sem.holders("gpu-api") == 1
    guard.exit(second, failed=True)
    assert sem.holders("gpu-api") == 0
    assert rt.stats.counters["concurrency"]["gpu-api"] == {"granted": 2, "denied": 1}


def test_concurrency_guard_fails_closed(dead_client, install_runtime, task_context, caplog):
    rt = install_runtime(dead_client)
    with caplog.at_level(logging.WARNING, logger="rmq.network.concurrency_guard"), pytest.raises(Defer) as info:
        ConcurrencyGuard().enter(task_context(rt, concurrency={"gpu-api": 1}))
    assert info.value.kind == "concurrency_unavailable"
    assert info.value.countdown_s == rt.config.defer_countdown
    assert "failing closed" in caplog.text


def test_the_concurrency_guard_does_nothing_outside_a_worker(dead_client, make_runtime, task_context, monkeypatch):
    # Given no current runtime (outside a governed worker) and a context that carries none either
    monkeypatch.setattr(runtime, "_current", None)
    calls: list[str] = []

    def never(name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)  # recorded too, in case the guard swallows the error
            raise AssertionError(f"{name} called outside a worker")
        return called

    monkeypatch.setattr(ClusterSemaphore, "acquire_all", never("ClusterSemaphore.acquire_all"))
    monkeypatch.setattr(ClusterSemaphore, "release", never("ClusterSemaphore.release"))
    rt = make_runtime(dead_client)  # only for its config
    bounded = task_context(rt, concurrency={"x": 1})
    assert bounded.runtime is None
    # When the guard runs around a task
    ConcurrencyGuard().enter(bounded)
    ConcurrencyGuard().exit(bounded, failed=False)
    # Then no limit was consulted and no permit held (and nothing raised)
    assert calls == []
    assert bounded.state == {}
    assert rt._local == {} and rt.stats.counters == {}
