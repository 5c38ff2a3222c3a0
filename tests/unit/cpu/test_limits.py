"""Native thread caps around a task: BLAS, torch and subprocesses' thread variables, and the concern."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from typing import Any

import pytest

from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.procstats import ProcessStats
from rmq.cpu.limits import THREAD_ENV_VARS, ThreadCapGuard, ThreadCaps

# --- ThreadCaps --------------------------------------------------------------------------------


def test_thread_caps_cap_blas_and_restore_it():
    pytest.importorskip("numpy")
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=3):
        assert threadpool_info(), "numpy's BLAS should be loaded"
        with ThreadCaps(1):
            assert {p["num_threads"] for p in threadpool_info()} == {1}
        assert {p["num_threads"] for p in threadpool_info()} == {3}


def test_subprocesses_see_the_cap_and_the_environment_is_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    for name in THREAD_ENV_VARS[1:]:
        monkeypatch.delenv(name, raising=False)
    code = f"import os; print(','.join(os.environ.get(n, '-') for n in {THREAD_ENV_VARS!r}))"
    with ThreadCaps(1):
        seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert seen.strip() == "1,1,1,1"
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert all(name not in os.environ for name in THREAD_ENV_VARS[1:])


def test_torch_is_capped_only_when_already_imported(monkeypatch):
    calls: list[int] = []
    fake = types.SimpleNamespace(get_num_threads=lambda: 4, set_num_threads=calls.append)
    monkeypatch.setitem(sys.modules, "torch", fake)
    with ThreadCaps(2):
        assert calls == [2]
    assert calls == [2, 4]
    monkeypatch.delitem(sys.modules, "torch")
    with ThreadCaps(2):
        assert "torch" not in sys.modules


def test_caps_are_restored_when_the_task_raises(monkeypatch):
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with pytest.raises(ZeroDivisionError), ThreadCaps(2):
        assert os.environ["MKL_NUM_THREADS"] == "2"
        1 / 0  # noqa: B018
    assert "MKL_NUM_THREADS" not in os.environ


# --- ThreadCapGuard ----------------------------------------------------------------------------


class _Runtime:
    def __init__(self) -> None:
        self.stats = ProcessStats(None)


@pytest.fixture
def rt():
    fake: Any = _Runtime()
    runtime.set_current(fake)
    yield fake
    runtime.set_current(None)


def _ctx(**declared: Any) -> TaskContext:
    return TaskContext("media.encode", "t1", parse_declaration(**declared), load_config({}, environ={}))


def test_guard_applies_to_tasks_that_declare_cpu():
    assert ThreadCapGuard().applies(parse_declaration(cpu=2))
    assert not ThreadCapGuard().applies(parse_declaration())


def test_guard_caps_while_the_task_runs_and_records_cpu_seconds(rt, monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    readings = iter([10.0, 12.5])
    guard, ctx = ThreadCapGuard(clock=lambda: next(readings)), _ctx(cpu=2)
    guard.enter(ctx)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"
    guard.exit(ctx, failed=False)
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    assert ctx.state["cpu_seconds"] == 2.5
    assert rt.stats.counters["cpu"] == {"task_seconds": 2.5, "by_task": {"media.encode": 2.5}}


def test_guard_measures_real_cpu_time(rt):
    guard, ctx = ThreadCapGuard(), _ctx(cpu=1)
    guard.enter(ctx)
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    guard.exit(ctx, failed=True)
    assert 0.15 <= rt.stats.counters["cpu"]["task_seconds"] < 2.0
