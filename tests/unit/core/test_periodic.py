"""The one periodic daemon thread: fixed rate, survives a failing step, stops for good."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from rmq.core.periodic import PeriodicThread


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("bad reading")

    loop = PeriodicThread("rmq-test-loop", step, 0.01, logging.getLogger("rmq.test"))
    with caplog.at_level(logging.ERROR, logger="rmq.test"):
        loop.start()
        wait_for(lambda: len(calls) >= 3)
        loop.stop()
    assert "rmq rmq-test-loop failed" in caplog.text  # named after the thread unless told
    assert "bad reading" in caplog.text
    assert not loop.running
    count = len(calls)
    time.sleep(0.05)
    assert len(calls) == count  # stopped for good


def test_the_step_time_is_taken_off_the_wait_and_the_interval_is_read_each_time() -> None:
    starts: list[float] = []
    interval = [0.05]

    def step() -> None:
        starts.append(time.monotonic())
        time.sleep(0.03)  # most of the interval
        if len(starts) == 3:
            interval[0] = 0.01

    loop = PeriodicThread("rmq-test-rate", step, lambda: interval[0])
    loop.start()
    wait_for(lambda: len(starts) >= 6)
    loop.stop()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert 0.04 <= gaps[0] < 0.075  # 50 ms between starts, not 50 + 30
    assert all(g < 0.045 for g in gaps[3:])  # the new, shorter interval (the 30 ms step is the floor)


def test_start_twice_runs_one_thread_and_stop_from_the_step_does_not_deadlock() -> None:
    seen: set[int] = set()
    done = threading.Event()
    loop: PeriodicThread

    def step() -> None:
        seen.add(threading.get_ident())
        if len(seen) == 1 and not done.is_set():
            done.set()
            loop.stop()

    loop = PeriodicThread("rmq-test-once", step, 0.005)
    loop.start()
    loop.start()
    assert done.wait(5)
    wait_for(lambda: not loop.running)
    assert len(seen) == 1
