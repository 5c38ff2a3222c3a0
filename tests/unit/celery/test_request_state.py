"""The request of a memory-killed task leaves Celery's worker state when rmq re-queues it.

Celery's own ``Request.on_failure`` starts with ``task_ready``: the request leaves ``state.requests``
and the active and reserved sets. rmq's re-run path handles the failure itself, so it must do the
same, or the killed run stays listed as active (and counted as starting by the autoscaler) until a
re-run with the same id reaches this worker, which is never when another worker takes it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.contrib.testing.mocks import TaskMessage
from celery.worker import state

from rmq.celery.request import GovernedRequest
from rmq.celery.task import GovernedTask
from rmq.core.config import load_config
from rmq.core.runtime import set_current
from rmq.memory.governor import KillRecord

MiB = 1 << 20


@pytest.fixture
def killed_request(monkeypatch):
    app = Celery("request-state", broker="memory://", set_as_current=False)

    @app.task(base=GovernedTask, name="t.grow", shared=False)
    def grow() -> None: ...

    request = GovernedRequest(TaskMessage(grow.name, id="killed-1", args=(), kwargs={}), app=app, task=grow)
    record = KillRecord("killed-1", grow.name, 4242, 300 * MiB, 100 * MiB, 1024 * MiB, 0.0, 0.0)
    kills = {"killed-1": record}
    counted: list[tuple[str, ...]] = []
    rt = SimpleNamespace(config=load_config({}, environ={}), governor=SimpleNamespace(pop_kill=kills.pop),
                         stats=SimpleNamespace(incr=lambda *k: counted.append(k)))
    set_current(rt)  # type: ignore[arg-type]
    monkeypatch.setattr(GovernedRequest, "_release_run_claim", lambda self: None)
    requeued: list[int] = []
    monkeypatch.setattr(GovernedRequest, "_rerun",
                        lambda self, headers, n, name, crowded=False: requeued.append(n) or True)
    state.task_accepted(request)
    yield request, requeued
    set_current(None)
    state.task_ready(request)


def test_a_requeued_memory_kill_leaves_the_worker_state(killed_request) -> None:
    request, requeued = killed_request
    assert request in state.active_requests and state.requests.get("killed-1") is request
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
    except WorkerLostError:
        info = ExceptionInfo()
    request.on_failure(info)
    assert requeued == [1]  # re-queued, not failed
    assert request not in state.active_requests and "killed-1" not in state.requests
