"""The governor's hands on a Celery worker, against a fake worker: pause and resume, pool pids, reaping."""

from __future__ import annotations

import os
from types import SimpleNamespace

from rmq.celery.actuator import CeleryActuator


class FakeConsumer:
    def __init__(self, *queues: str) -> None:
        self.task_consumer = SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues])
        self.consuming = set(queues)

    def cancel_task_queue(self, name: str) -> None:
        self.consuming.discard(name)

    def add_task_queue(self, name: str) -> None:
        self.consuming.add(name)


def test_pause_and_resume_take_effect_on_the_event_loop() -> None:
    consumer = FakeConsumer("celery", "rmq.heavy")
    act = CeleryActuator(SimpleNamespace(consumer=consumer))
    act.pause()
    assert act.want_paused and not act.is_paused and consumer.consuming == {"celery", "rmq.heavy"}
    act.apply_pause_state()
    assert act.is_paused and consumer.consuming == set()
    act.resume()
    act.apply_pause_state()
    assert not act.is_paused and consumer.consuming == {"celery", "rmq.heavy"} and act.paused_queues == []


def test_nothing_happens_before_the_consumer_exists() -> None:
    act = CeleryActuator(SimpleNamespace(consumer=None))
    act.pause()
    act.apply_pause_state()
    assert not act.is_paused


def test_pool_pids_leave_out_this_process_and_unstarted_ones() -> None:
    procs = [SimpleNamespace(pid=11), SimpleNamespace(pid=None), SimpleNamespace(pid=os.getpid())]
    worker = SimpleNamespace(pool=SimpleNamespace(_pool=SimpleNamespace(_pool=procs)))
    assert CeleryActuator(worker).pool_pids() == [11]
    assert CeleryActuator(SimpleNamespace(pool=None)).pool_pids() == []


def test_a_dead_pool_process_is_reaped_at_once() -> None:
    maintained: list[int] = []
    alive = SimpleNamespace(_popen=SimpleNamespace(poll=lambda: None))
    dead = SimpleNamespace(_popen=SimpleNamespace(poll=lambda: -9))
    pool = SimpleNamespace(_pool=[alive], maintain_pool=lambda: maintained.append(1))
    act = CeleryActuator(SimpleNamespace(pool=SimpleNamespace(_pool=pool)))
    act.reap_exited()
    assert maintained == []
    pool._pool.append(dead)
    act.reap_exited()
    assert maintained == [1]


def test_the_keeper_thread_touches_only_when_the_event_loop_has_stopped_touching() -> None:
    touched: list[int] = []
    act = CeleryActuator(SimpleNamespace(consumer=None))
    act.touch_unacked = lambda: touched.append(1)  # type: ignore[method-assign]
    act.touch_if_stale(4.0)
    assert touched == []  # the loop touched (or the actuator was made) less than 6 s ago
    act.last_touch -= 6.0
    act.touch_if_stale(4.0)
    assert touched == [1]
