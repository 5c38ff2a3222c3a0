"""What the request handler makes of a memory kill: a task crowded out by its neighbours runs again
reserving what it used; a runaway (alone, or past what it reserved) spends its retries
(docs/design.md#kills)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

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
def kill(monkeypatch):
    """``kill(observed, reserved, neighbours, **headers)`` -> what the handler did: re-run headers
    and whether it counted as crowded, or the exception it failed with; plus what it taught the learner."""
    app = Celery("crowded", broker="memory://", set_as_current=False)

    @app.task(base=GovernedTask, name="t.lying", shared=False)
    def lying() -> None: ...

    done: dict[str, Any] = {}
    monkeypatch.setattr(GovernedRequest, "_release_run_claim", lambda self: None)
    monkeypatch.setattr(GovernedRequest, "_rerun", lambda self, headers, n, name, crowded=False:
                        done.update(rerun=(dict(headers), n, crowded)) or True)
    monkeypatch.setattr(GovernedRequest, "_learn_kill", staticmethod(lambda name, observed:
                        done.update(learned=(name, observed))))
    failed: list[BaseException] = []
    monkeypatch.setattr("celery.worker.request.Request.on_failure",
                        lambda self, exc_info, *a, **k: failed.append(getattr(exc_info.exception, "exc",
                                                                              exc_info.exception)))

    def run(observed: int, reserved: int, neighbours: int, **headers: Any) -> dict[str, Any]:
        done.clear()
        failed.clear()
        request = GovernedRequest(TaskMessage(lying.name, id="k-1", args=(), kwargs={}, **headers), app=app,
                                  task=lying)
        record = KillRecord("k-1", lying.name, 4242, observed, reserved, 1024 * MiB, 0.0, 0.0,
                            room_bytes=500 * MiB, neighbours=neighbours)
        rt = SimpleNamespace(config=load_config({}, environ={}), governor=SimpleNamespace(pop_kill=lambda _: record),
                             stats=SimpleNamespace(incr=lambda *k: None))
        set_current(rt)  # type: ignore[arg-type]
        state.task_accepted(request)
        try:
            try:
                raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
            except WorkerLostError:
                request.on_failure(ExceptionInfo())
        finally:
            set_current(None)
            state.task_ready(request)
        if failed:
            done["failed"] = failed[0]
        return done

    return run


def test_crowded_out_beside_neighbours_it_runs_again_reserving_what_it_used(kill) -> None:
    done = kill(observed=200 * MiB, reserved=64 * MiB, neighbours=3)
    headers, n, crowded = done["rerun"]
    assert crowded and n == 1 and headers["rmq_reserve"] == 200 * MiB
    assert done["learned"] == ("t.lying", 200 * MiB)


def test_crowded_out_it_runs_again_past_the_memory_kill_retries(kill) -> None:
    done = kill(observed=200 * MiB, reserved=200 * MiB, neighbours=3, rmq_kills=5, rmq_reserve=200 * MiB)
    headers, n, crowded = done["rerun"]
    assert crowded and n == 6 and "failed" not in done


def test_killed_alone_it_is_a_runaway_whatever_it_used(kill) -> None:
    done = kill(observed=200 * MiB, reserved=64 * MiB, neighbours=0)
    headers, n, crowded = done["rerun"]
    assert not crowded and "rmq_reserve" not in headers and "learned" not in done


def test_a_rerun_killed_past_what_it_reserved_is_a_runaway_and_spends_its_retries(kill) -> None:
    done = kill(observed=300 * MiB, reserved=200 * MiB, neighbours=3, rmq_kills=2, rmq_reserve=200 * MiB)
    assert "rerun" not in done  # the third kill of a runaway: no more runs
    assert type(done["failed"]).__name__ == "MemoryBudgetExceeded"
