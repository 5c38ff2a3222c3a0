"""The Celery releases the package allows are the ones rmq works with (docs/design.md#celery-versions).

rmq reaches into Celery, kombu and billiard in a few places (private attributes among them). The
floor in pyproject.toml is the oldest release tested; this test fails when the installed release is
below it, or when any attribute rmq relies on is missing, so that an upgrade or a lower pin shows
here instead of as an ``AttributeError`` in a worker.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _floor(package: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{package}(\[|>|=|<|$)", d))
    found = re.search(r">=\s*([\d.]+)", spec)
    assert found, f"{spec!r} has no floor"
    return tuple(int(x) for x in found.group(1).split("."))


def _installed(package: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version(package))[:3])


def test_the_floor_is_the_release_that_has_what_rmq_uses() -> None:
    # Request._success_was_stored (the lost-process path) is new in Celery 5.7
    assert _floor("celery") >= (5, 7)
    assert _floor("kombu") >= (5, 7)


@pytest.mark.parametrize("package", ["celery", "kombu"])
def test_the_installed_release_satisfies_the_floor(package: str) -> None:
    assert _installed(package) >= _floor(package), f"{package} {version(package)} is below the floor"
    assert _installed(package) < (6,)


def _class_attrs() -> list[tuple[type, str]]:
    from billiard.pool import ApplyResult, Pool, Worker
    from celery.app.amqp import AMQP, Queues
    from celery.app.task import Task
    from celery.worker.autoscale import Autoscaler
    from celery.worker.consumer import Consumer
    from celery.worker.request import Request
    from kombu.transport.redis import Channel

    wanted = {
        Request: ["_success_was_stored", "_request_dict", "_context", "worker_pid", "on_failure", "acknowledge",
                  "send_event", "task", "hostname", "task_name", "id"],
        Task: ["signature_from_request", "after_return", "apply_async"],
        Autoscaler: ["_maybe_scale", "update", "info"],
        Consumer: ["cancel_task_queue", "add_task_queue"],
        AMQP: ["Queues", "queues"],
        Queues: ["new_missing"],
        Pool: ["maintain_pool"],
        ApplyResult: ["worker_pids", "_write_to", "_scheduled_for"],
        Worker: ["_make_protected_receive"],
        Channel: ["conn_or_acquire", "keyprefix_queue", "priority_steps", "sep", "unacked_index_key"],
    }
    return [(cls, name) for cls, names in wanted.items() for name in names]


@pytest.mark.parametrize(("cls", "name"), _class_attrs(), ids=lambda x: getattr(x, "__qualname__", x))
def test_every_celery_attribute_rmq_relies_on_exists(cls: type, name: str) -> None:
    assert hasattr(cls, name), f"{cls.__module__}.{cls.__qualname__}.{name} is gone"


def _instance_attrs() -> list[tuple[type, str]]:
    from billiard.pool import Pool, Worker
    from kombu.transport.redis import QoS

    wanted = {
        Pool: ["_pool", "_processes", "_putlock", "_cache"],
        Worker: ["wait_for_job"],
        QoS: ["_delivered"],
    }
    return [(cls, name) for cls, names in wanted.items() for name in names]


@pytest.mark.parametrize(("cls", "name"), _instance_attrs(), ids=lambda x: getattr(x, "__qualname__", x))
def test_every_instance_attribute_rmq_reads_is_still_assigned(cls: type, name: str) -> None:
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.split(".")[0] in ("billiard", "kombu"))
    assert f"self.{name} =" in source or f"self.{name}:" in source, f"{cls.__qualname__} no longer sets {name}"


def test_a_pool_process_can_still_be_told_to_exit_after_its_task() -> None:
    # rmq/celery/recycle.py points the receive closure's should_shutdown at a function returning True
    from billiard.pool import Worker

    assert "should_shutdown" in inspect.getsource(Worker._make_protected_receive)


def test_the_settings_view_keeps_its_namespace_where_rmq_reads_it() -> None:
    from celery import Celery

    app = Celery("v", broker="memory://", set_as_current=False)
    app.config_from_object({"CELERY_RMQ_HEAVY_QUEUE": "x"}, namespace="CELERY")
    conf = app.conf
    conf.finalize()  # what rmq.core.config does before reading the namespace
    assert conf.prefix == "CELERY_"


def test_the_pool_aliases_rmq_names_in_its_refusal_exist() -> None:
    from celery.concurrency import ALIASES

    assert {"prefork", "processes", "solo", "threads", "gevent", "eventlet"} <= set(ALIASES)
