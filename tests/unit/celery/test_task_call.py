"""A governed task's body in the worker: run inside the guards, under the tracer's request."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery, Task

import rmq
from rmq.celery.task import GovernedTask
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.ledger import Control, Ledger
from rmq.core.runtime import Runtime, set_current

MiB = 1 << 20


class DatabaseSession(Task):
    """A user's base class that wraps every call (Celery's documented pattern)."""

    calls: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        DatabaseSession.calls.append(self.request.id)
        return super().__call__(*args, **kwargs)


class SessionGoverned(GovernedTask, DatabaseSession):
    abstract = True


@pytest.fixture
def app(tmp_path):
    app = Celery("calls", broker="memory://", backend="cache+memory://", set_as_current=False)
    rmq.install(app)
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    set_current(Runtime(load_config({}, environ={}), app, str(tmp_path / "rt"), ledger, redis_url=None))
    DatabaseSession.calls = []
    yield app
    set_current(None)


def as_the_tracer_does(task: Any, task_id: str, *args: Any) -> Any:
    """Call ``task`` the way Celery's tracer does in a pool process: request pushed, then ``task(*args)``."""
    task.push_request(id=task_id, args=args, kwargs={}, delivery_info={"redelivered": False},
                      hostname="w@h", called_directly=False, is_eager=False)
    try:
        return task(*args)
    finally:
        task.pop_request()


def test_the_body_runs_once_under_the_tracer_s_request(app) -> None:
    seen = []

    @app.task(base=GovernedTask, rmq=parse_declaration(memory="16MiB"), bind=True, name="calls.plain")
    def plain(self: Any, x: int) -> int:
        seen.append((self.request.id, self.request.hostname, self.rmq_context.memory_bytes))
        return x * 2

    assert as_the_tracer_does(plain, "t-1", 21) == 42
    assert seen == [("t-1", "w@h", 16 * MiB)]  # inside the guards, with the request Celery pushed
    assert plain._runs_directly()


def test_a_base_class_that_wraps_call_is_still_called(app) -> None:
    @app.task(base=SessionGoverned, rmq=parse_declaration(memory="16MiB"), name="calls.session")
    def with_session(x: int) -> int:
        return x + 1

    assert as_the_tracer_does(with_session, "t-2", 1) == 2
    assert DatabaseSession.calls == ["t-2"]
    assert not with_session._runs_directly()
