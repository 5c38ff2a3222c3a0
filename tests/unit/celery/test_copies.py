"""The copies of a governed task: which messages are copies, and how a copy runs (the run claim, the
result backend, the original still running in this worker)."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
from celery.exceptions import Ignore, Retry

from rmq.celery import copies
from rmq.celery.copies import is_copy
from rmq.core.ledger import Ledger
from rmq.core.ledger_layout import KIND_TASK, Entry


def request(redelivered: bool = False, **headers) -> SimpleNamespace:
    return SimpleNamespace(delivery_info={"redelivered": redelivered}, headers=headers,
                           rmq_deferrals=headers.get("rmq_deferrals"), rmq_kills=headers.get("rmq_kills"))


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (request(), False),  # a first delivery
        (request(redelivered=True), True),  # back after its process or worker died
        (request(rmq_deferrals=2), True),  # sent by a counted deferral
        (request(rmq_deferrals=0), True),  # sent by an uncounted one (rate limit, a copy waiting its turn)
        (request(rmq_kills=1), True),  # a re-run after a memory kill
        # Celery puts custom headers on the request as attributes, and may keep them in .headers only
        (SimpleNamespace(delivery_info=None, headers=None, rmq_deferrals=0), True),
        (SimpleNamespace(delivery_info={}, headers={"rmq_kills": 1}), True),
        (SimpleNamespace(delivery_info={}, headers={"other": 1}), False),
    ],
)
def test_copies_are_recognised(req: SimpleNamespace, expected: bool) -> None:
    assert is_copy(req) is expected


# -- a copy's run: the claim, the backend, the original ------------------------------------------


class FakeClaims:
    def __init__(self, holder: str | None = None, down: bool = False) -> None:
        self.holder_token, self.down = holder, down
        self.released: list[str] = []

    def acquire(self, task_id: str, token: str) -> bool:
        if self.down:
            raise ConnectionError("no redis")
        if self.holder_token is None:
            self.holder_token = token
            return True
        return self.holder_token == token

    def holder(self, task_id: str) -> str | None:
        return self.holder_token

    def release(self, task_id: str) -> None:
        self.released.append(task_id)
        self.holder_token = None


class Deferred(Exception):
    pass


def fake_task(status: str = "PENDING", body=lambda: "done") -> SimpleNamespace:
    def defer(d):
        raise Deferred(d.kind, d.reason)

    return SimpleNamespace(
        name="t", backend=SimpleNamespace(get_task_meta=lambda task_id, cache: {"status": status}),
        _defer=defer, _run_governed=lambda rt, request, args, kwargs: body(),
    )


def fake_rt(claims: FakeClaims, original_running: bool = False) -> SimpleNamespace:
    counted: list[tuple[str, ...]] = []
    return SimpleNamespace(
        claims=claims, ledger=SimpleNamespace(
            running=lambda task_id, other_than: original_running,
            entries=lambda: [Entry(kind=KIND_TASK, pid=os.getppid(), memory_bytes=0, task_id="id-1", name="t")]
            if original_running else []),
        stats=SimpleNamespace(incr=lambda *names: counted.append(names), counted=counted),
        config=SimpleNamespace(defer_countdown=2.0),
    )


def copy_request() -> SimpleNamespace:
    return SimpleNamespace(id="id-1", hostname="w@h", ignore_result=False, delivery_info={"redelivered": True})


@pytest.fixture(autouse=True)
def no_claim_left():
    copies.finished_copy.claim = None
    yield
    copies.finished_copy.claim = None


def test_a_copy_that_takes_the_claim_runs_and_holds_it_until_its_outcome_is_stored() -> None:
    claims = FakeClaims()
    assert copies.run_copy(fake_task(), fake_rt(claims), copy_request(), (), {}) == "done"
    assert copies.finished_copy.claim == "id-1" and claims.released == []  # after_return releases it


def test_a_copy_of_a_task_that_already_ended_does_not_run() -> None:
    claims = FakeClaims()
    rt = fake_rt(claims)
    with pytest.raises(Ignore):
        copies.run_copy(fake_task(status="SUCCESS"), rt, copy_request(), (), {})
    assert claims.released == ["id-1"] and rt.stats.counted == [("copies", "dropped")]


def test_a_copy_waits_while_another_run_holds_the_claim_or_the_original_runs_here() -> None:
    with pytest.raises(Deferred, match="duplicate"):
        copies.run_copy(fake_task(), fake_rt(FakeClaims(holder="w2@h:42")), copy_request(), (), {})
    # without Redis, the original still running in this worker holds it back
    with pytest.raises(Deferred, match="the original, in this worker"):
        copies.run_copy(fake_task(), fake_rt(FakeClaims(down=True), original_running=True), copy_request(), (), {})
    # without Redis and nothing running here, it runs without a claim
    assert copies.run_copy(fake_task(), fake_rt(FakeClaims(down=True)), copy_request(), (), {}) == "done"
    assert getattr(copies.finished_copy, "claim", None) is None


def test_a_copy_that_retries_releases_its_claim_at_once() -> None:
    def retry():
        raise Retry("again")

    claims = FakeClaims()
    with pytest.raises(Retry):
        copies.run_copy(fake_task(body=retry), fake_rt(claims), copy_request(), (), {})
    assert claims.released == ["id-1"] and getattr(copies.finished_copy, "claim", None) is None


def test_a_dead_process_reservation_does_not_hold_its_copy_back(tmp_path) -> None:
    # Given the reservation of a pool process that was killed from outside, not yet released by the governor
    ledger = Ledger(str(tmp_path), create=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    ledger.try_add(Entry(kind=KIND_TASK, pid=dead.pid, memory_bytes=1, task_id="id-1", name="t"), lambda r: True)
    rt = fake_rt(FakeClaims())
    rt.ledger = ledger
    # When its copy arrives: it runs at once, and the dead reservation is gone
    assert copies.run_copy(fake_task(), rt, copy_request(), (), {}) == "done"
    assert ledger.entries() == []
    ledger.close()
