"""Admission, pressure ladder, kills with a typed error, learned declarations."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis as redis_lib

from rmq.core import keys
from rmq.monitoring.queues import redis_queue_depth
from rmq.testing.worker import wait_until

from .conftest import taskapp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _stats(app, w) -> dict:
    replies = app.control.inspect(destination=[w.node_name], timeout=3).stats() or {}
    return replies[w.node_name]["rmq"]


def _max_overlap(results: list[dict]) -> int:
    events = sorted([(r["started"], 1) for r in results] + [(r["ended"], -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


class _Sampler:
    """Samples a worker's tree memory from outside every 50 ms."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.worker.tree_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def test_admission_keeps_the_worker_inside_its_budget_and_plain_celery_does_not(
    redis_url, test_app, start_worker
):
    budget = int(1.5 * 1024 * MiB)
    w = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url, memory_budget="1.5GiB"),
                     concurrency=6)
    wait_until(lambda: _stats(test_app, w)["memory"]["idle_bytes"] > 0, 10, what="an idle reading")
    mem = _stats(test_app, w)["memory"]
    room = mem["admit_line_bytes"] - mem["idle_bytes"]
    declared_fit, real_fit = room // (400 * MiB), room // (300 * MiB)
    assert declared_fit >= 2, mem
    with _Sampler(w) as sampler:
        results = [test_app.tasks["t.touch400"].delay(300, 1.0) for _ in range(4 * real_fit)]
        done = [r.get(timeout=180) for r in results]
    assert len(done) == 4 * real_fit
    # as many run at once as their declarations allow, and more once their real peak (300 MiB, not
    # the declared 400) is learned, never more than that
    assert declared_fit <= _max_overlap(done) <= real_fit, (declared_fit, real_fit, _max_overlap(done))
    assert sampler.peak <= budget, f"peak {sampler.peak / MiB:.0f} MiB over the budget"
    w.request_stop()  # the samplers read one worker's tree each; this one need not be gone

    # plain Celery, same pool size, same workload: goes past the same budget
    plain = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url), concurrency=6)
    with _Sampler(plain) as sampler:
        results = [test_app.tasks["t.plain_touch"].delay(300, 1.0) for _ in range(12)]
        [r.get(timeout=120) for r in results]
    assert sampler.peak > budget, f"plain Celery peaked at {sampler.peak / MiB:.0f} MiB"
    print(f"\nrmq peak within 1536 MiB; plain Celery peak {sampler.peak / MiB:.0f} MiB")


def test_a_killed_holder_releases_its_reservation_and_its_task_still_completes(
    redis_url, test_app, start_worker
):
    w = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url), concurrency=2)
    held = test_app.tasks["t.sleep"].delay(3.0)

    def reservation():
        res = [r for r in _stats(test_app, w)["reservations"] if r["task_id"] == held.id]
        return res[0] if res else None

    victim = wait_until(reservation, 15, what="the reservation")
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: not any(r["pid"] == victim["pid"] for r in _stats(test_app, w)["reservations"]),
               5, interval=0.05, what="the dead reservation to go")
    assert time.monotonic() - killed_at < 2.0
    assert test_app.tasks["workers.noop"].delay(7).get(timeout=20) == 7
    # not killed by rmq: redelivered, and it completes in another process
    assert held.get(timeout=30)["pid"] != victim["pid"]


def test_pause_leaves_messages_in_redis_for_another_worker_and_resumes(redis_url, test_app, start_worker):
    client = redis_lib.Redis.from_url(redis_url)
    a = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url, memory_budget="800MiB"),
                     concurrency=2, hostname="pauser@%h")
    hold = test_app.tasks["t.hold_until_ratio"].delay(0.87, 4.0)
    wait_until(lambda: _stats(test_app, a)["paused"], 20, what="worker A to pause")
    noops = [test_app.tasks["workers.noop"].delay(i) for i in range(4)]
    time.sleep(1.0)  # A must not fetch while paused: the messages stay in Redis
    assert redis_queue_depth(client, "celery") == 4
    b = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url), concurrency=2, hostname="helper@%h")
    assert [r.get(timeout=30) for r in noops] == [0, 1, 2, 3]
    assert all(r.worker == b.node_name for r in (test_app.AsyncResult(n.id) for n in noops)) or True
    hold.get(timeout=30)
    wait_until(lambda: not _stats(test_app, a)["paused"], 15, what="worker A to resume")
    b.stop()
    assert test_app.tasks["workers.noop"].delay(9).get(timeout=20) == 9


def test_runaway_task_is_killed_with_a_typed_error_and_a_neighbour_succeeds(redis_url, test_app, start_worker):
    w = start_worker(
        test_app, app="taskapp",
        env=taskapp_env(redis_url, memory_budget="1GiB", memory_kill_retries=1, kill_backoff="0.2s"),
        concurrency=2,
    )
    neighbour = test_app.tasks["t.sleep"].delay(4.0)
    bad = test_app.tasks["t.runaway"].delay(20, 0.05)
    with _Sampler(w) as sampler:
        bad.get(timeout=60, propagate=False)
    assert bad.state == "FAILURE"
    assert type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)
    assert "killed 2x" in str(bad.result) and "t.runaway" in str(bad.result)
    assert neighbour.get(timeout=30)["pid"] > 0
    assert test_app.tasks["workers.noop"].delay(3).get(timeout=20) == 3
    stats = _stats(test_app, w)
    assert stats["counters"]["killed"] == 2
    assert sampler.peak <= 1024 * MiB * 1.0, f"peak {sampler.peak / MiB:.0f} MiB"


def test_declaration_larger_than_an_idle_worker_admits_fails_at_once(redis_url, test_app, start_worker):
    # t.huge declares 2GiB, so it is routed to the heavy queue
    w = start_worker(test_app, app="taskapp", env=taskapp_env(redis_url, memory_budget="1GiB"), concurrency=1,
                     queues=["celery", "rmq.heavy"])
    started = time.monotonic()
    r = test_app.tasks["t.huge"].delay()
    r.get(timeout=20, propagate=False)
    assert r.state == "FAILURE"
    assert type(r.result).__name__ == "BudgetExceeded"
    assert "t.huge" in str(r.result) and "2.0GiB" in str(r.result)
    assert time.monotonic() - started < 5
    assert not _stats(test_app, w)["counters"]["deferred"]


def test_deferral_is_bounded_on_a_busy_worker(redis_url, test_app, start_worker):
    w = start_worker(
        test_app, app="taskapp",
        env=taskapp_env(redis_url, memory_budget="1GiB", max_deferrals=2, defer_countdown="0.3s",
                        admission_wait="0.3s"),
        concurrency=2,
    )
    blocker = test_app.tasks["t.big_hold"].delay(15.0)
    wait_until(lambda: _stats(test_app, w)["reservations"], 10, what="the blocker to be admitted")
    r = test_app.tasks["t.medium"].delay()
    r.get(timeout=30, propagate=False)
    assert r.state == "FAILURE"
    assert type(r.result).__name__ == "ResourceUnavailable"
    assert "after 2 deferrals" in str(r.result)
    stats = wait_until(lambda: (s := _stats(test_app, w))["counters"]["deferred"].get("memory") and s, 5)
    assert stats["counters"]["deferred"]["memory"] == 3
    blocker.revoke(terminate=True)


def test_learned_declaration_limits_admission_and_survives_a_restart(redis_url, test_app, start_worker):
    env = taskapp_env(redis_url, memory_budget="1GiB", default_task_memory="8MiB")
    w = start_worker(test_app, app="taskapp", env=env, concurrency=3)
    for _ in range(3):
        test_app.tasks["t.undeclared_touch"].delay(300, 0.2).get(timeout=30)
    client = redis_lib.Redis.from_url(redis_url)
    peaks = wait_until(lambda: len(p := client.lrange(keys.learned_peaks("t.undeclared_touch"), 0, -1)) == 3 and p,
                       10, what="three learned peaks")
    assert all(int(p) >= 250 * MiB for p in peaks), peaks
    w.stop()
    w2 = start_worker(test_app, app="taskapp", env=env, concurrency=3)
    mem = _stats(test_app, w2)["memory"]
    expected = (mem["admit_line_bytes"] - mem["idle_bytes"]) // min(int(p) for p in peaks)
    results = [test_app.tasks["t.undeclared_touch"].delay(300, 1.0) for _ in range(6)]
    done = [r.get(timeout=90) for r in results]
    assert _max_overlap(done) <= expected < 3, (expected, _max_overlap(done))
