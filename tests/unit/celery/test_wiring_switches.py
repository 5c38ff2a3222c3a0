"""What install() adds can be left out: beat entries, the autoscaler, the priority mapping."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import rmq
from rmq.core.errors import ConfigError


def _app(broker: str = "redis://127.0.0.1:1/0", **conf: Any) -> Celery:
    app = Celery("switches", broker=broker, set_as_current=False)
    app.conf.update(conf)
    rmq.install(app)
    app.loader.import_default_modules()
    return app


def test_by_default_install_adds_beat_entries_autoscaler_and_priorities() -> None:
    app = _app()
    assert {"rmq.cleanup_sessions", "rmq.monitor"} <= set(app.conf.beat_schedule)
    assert app.conf.worker_autoscaler == "rmq.celery.autoscale:ResourceAutoscaler"
    assert app.conf.broker_transport_options["sep"] == ":"
    assert app.conf.task_queue_max_priority == 10


def test_on_redis_four_priority_lists_keep_high_normal_and_low_apart_in_order() -> None:
    from bisect import bisect

    from rmq.core.routing import to_wire_priority
    from rmq.core.units import PRIORITY_NAMES

    steps = _app().conf.broker_transport_options["priority_steps"]
    assert steps == [0, 3, 6, 9]  # plain Celery's four lists per queue, not ten

    def list_of(priority: int) -> int:  # the step kombu files a wire priority under
        return steps[bisect(steps, to_wire_priority(priority, "redis")) - 1]

    named = [list_of(PRIORITY_NAMES[n]) for n in ("high", "normal", "low")]
    assert named == sorted(set(named))  # each its own list, high's polled first
    assert [list_of(p) for p in range(9, -1, -1)] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]


def test_the_users_own_priority_steps_win() -> None:
    app = _app(broker_transport_options={"priority_steps": list(range(10))})
    assert app.conf.broker_transport_options["priority_steps"] == list(range(10))


def test_beat_entries_off_leaves_the_schedule_alone() -> None:
    app = _app(rmq_beat_entries=False, beat_schedule={"mine": {"task": "x", "schedule": 5}})
    assert set(app.conf.beat_schedule) == {"mine"}


def test_autoscaler_off_keeps_celerys_own() -> None:
    app = _app(rmq_autoscaler=False)
    assert app.conf.worker_autoscaler == "celery.worker.autoscale:Autoscaler"


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])
def test_priorities_off_leaves_the_broker_layout_and_the_messages_alone(broker: str) -> None:
    app = _app(broker, rmq_priorities="false")
    options = app.conf.broker_transport_options or {}
    assert not {"priority_steps", "sep", "queue_order_strategy"} & set(options)
    assert app.conf.task_queue_max_priority is None and app.conf.task_default_priority is None
    if broker.startswith("redis"):
        assert options["visibility_timeout"] == 20  # crash recovery stays
    sent: list[dict[str, Any]] = []

    name = f"switches.{broker.split(':')[0]}"

    @rmq.governed_task(priority="high", name=name)
    def t() -> None: ...

    task = app.tasks[name]
    from celery import Task

    original = Task.apply_async
    try:
        Task.apply_async = lambda self, *a, **kw: sent.append(kw)  # type: ignore[method-assign]
        task.apply_async()
        task.apply_async(priority=3)
    finally:
        Task.apply_async = original  # type: ignore[method-assign]
    assert [kw.get("priority") for kw in sent] == [None, 3]  # Celery's meaning, as given


def test_the_switches_take_booleans_and_their_text_only() -> None:
    from rmq.core.runtime import config_for

    with pytest.raises(ConfigError, match="rmq_priorities must be true or false"):
        config_for(_app(rmq_priorities="sometimes"))
    assert _app(rmq_autoscaler="0").conf.worker_autoscaler == "celery.worker.autoscale:Autoscaler"
