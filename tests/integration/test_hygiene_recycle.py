"""Graceful recycling in a real billiard pool (the worker loop Celery's prefork children run).

Each task runs the hygiene guard around a body that really leaks 30 MiB. The leak detector
decides in the child; the child must finish that task, deliver its result, and only then be
replaced by a new process. No result may be lost or turned into a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from billiard.pool import Pool

from rmq.celery.recycle import request_recycle
from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import TaskDeclaration
from rmq.core.runtime import Runtime
from rmq.memory.hygiene import HygieneGuard, rss_bytes

pytestmark = pytest.mark.integration

MiB = 1 << 20
LEAK: list[bytearray] = []  # what the leaky task keeps, per pool process
GUARD = HygieneGuard(recycle=request_recycle)


def _init(runtime_dir: str, conf: dict[str, Any]) -> None:
    config = load_config(conf, {})
    rt = Runtime(config, app=None, runtime_dir=runtime_dir, ledger=None, redis_url=None)  # type: ignore[arg-type]
    runtime.set_current(rt)


def _leaky(i: int) -> dict[str, Any]:
    rt = runtime.current()
    assert rt is not None
    ctx = TaskContext(task_name="tests.leaky", task_id=str(i), declaration=TaskDeclaration(), config=rt.config)
    GUARD.enter(ctx)
    LEAK.append(bytearray(b"\x01") * (30 * MiB))  # written, so resident
    GUARD.exit(ctx, failed=False)
    gauges = rt.stats.gauges["hygiene"]
    return {
        "i": i,
        "pid": os.getpid(),
        "recycling": gauges["recycling"],
        "baseline": gauges["baseline_bytes"],
    }


def _recycle_then_keep_working(i: int) -> dict[str, Any]:
    requested = request_recycle("test", suspect_task="tests.slow")
    time.sleep(0.3)  # the task goes on after asking: nothing may cut it short
    return {"i": i, "pid": os.getpid(), "requested": requested, "finished": True}


def _plain(i: int) -> dict[str, Any]:
    return {"i": i, "pid": os.getpid()}


def _run(pool: Pool, fn: Any, n: int) -> list[dict[str, Any]]:
    pending = [pool.apply_async(fn, (i,)) for i in range(n)]
    return [r.get(timeout=60) for r in pending]


@pytest.fixture
def make_pool(tmp_path: Path):  # type: ignore[no-untyped-def]
    pools: list[Pool] = []

    def make(allow_restart: bool, **conf: Any) -> Pool:
        pool = Pool(1, initializer=_init, initargs=(str(tmp_path), conf), allow_restart=allow_restart)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()
        pool.join()


def _assert_recycled_only_after_deciding(results: list[dict[str, Any]]) -> list[int]:
    """Every pid change comes right after a task that decided to recycle; returns those indexes."""
    decided = []
    for prev, cur in itertools.pairwise(results):
        if prev["recycling"]:
            decided.append(prev["i"])
            assert cur["pid"] != prev["pid"], f"task {prev['i']} asked for a recycle but its process ran on"
        else:
            assert cur["pid"] == prev["pid"], f"process changed after task {prev['i']} without a decision"
    return decided


@pytest.mark.parametrize("allow_restart", [False, True], ids=["closure-flag", "restart-sentinel"])
def test_leaking_process_is_replaced_between_tasks(make_pool, tmp_path: Path, allow_restart: bool) -> None:  # type: ignore[no-untyped-def]
    # Given a one-process pool whose leak detector looks at the last 4 baselines
    pool = make_pool(allow_restart, rmq_leak_window=4, rmq_leak_slope="8MiB", rmq_hygiene_margin="16MiB")
    # When 12 tasks each leak 30 MiB
    results = _run(pool, _leaky, 12)
    # Then every task succeeded, in order
    assert [r["i"] for r in results] == list(range(12))
    # And the process was replaced exactly after the tasks that decided it leaks (4th, 8th, 12th)
    assert _assert_recycled_only_after_deciding(results) == [3, 7]
    assert results[-1]["recycling"] == "slope"
    pids = list(dict.fromkeys(r["pid"] for r in results))  # in order of appearance
    assert len(pids) == 3
    # And each recycled process left its counters and suspect for the governor
    for pid in pids[:2]:
        data = json.loads((tmp_path / f"proc-{pid}.json").read_text())
        assert data["counters"]["hygiene"]["recycles"] == {"slope": 1}
        assert data["gauges"]["hygiene"]["suspect_task"] == "tests.leaky"


def test_ceiling_recycles_before_the_baseline_passes_it(make_pool) -> None:  # type: ignore[no-untyped-def]
    # Given a ceiling 130 MiB above a fresh process's memory, and a slope rule that cannot fire
    ceiling = rss_bytes() + 130 * MiB
    pool = make_pool(False, rmq_leak_window=50, rmq_leak_slope="1GiB", rmq_leak_ceiling=ceiling)
    results = _run(pool, _leaky, 8)
    # Then the process is recycled after some task, and no task ever saw a baseline past the ceiling
    decided = [r["i"] for r in results if r["recycling"]]
    assert decided and results[decided[0] + 1]["pid"] != results[decided[0]]["pid"]
    assert max(r["baseline"] for r in results) < ceiling
    assert {r["recycling"] for r in results} == {None, "ceiling"}


def test_a_recycle_request_never_cuts_the_running_task_short(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(False)
    first = _run(pool, _recycle_then_keep_working, 1)[0]
    after = _run(pool, _plain, 3)
    assert first["requested"] is True and first["finished"] is True
    assert all(r["pid"] != first["pid"] for r in after)
    assert len({r["pid"] for r in after}) == 1, "one replacement serves the following tasks"
