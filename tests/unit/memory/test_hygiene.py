"""Memory hygiene: the leak detector on fake series, the guard with fake memory readings."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmq.celery.recycle import request_recycle
from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import TaskDeclaration
from rmq.core.runtime import Runtime
from rmq.memory.hygiene import HygieneGuard, LeakDetector, rss_bytes

MiB = 1 << 20


# --- LeakDetector -------------------------------------------------------------------------


def test_flat_series_with_noise_never_recycles() -> None:
    rng = random.Random(7)
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8)
    for i in range(2000):
        det.observe(f"t{i % 3}", 300 * MiB + rng.randint(-6 * MiB, 6 * MiB))
        assert det.should_recycle() == (False, "")


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(4, 16),
    noise=st.lists(st.integers(-8 * MiB + 1, 8 * MiB - 1), min_size=1, max_size=60),
)
def test_noise_smaller_than_the_slope_never_recycles(window: int, noise: list[int]) -> None:
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=window)
    for n in noise:
        det.observe("t", 500 * MiB + n)
        assert det.should_recycle()[0] is False


def test_steady_30mib_growth_recycles_within_the_window() -> None:
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8)
    decisions = []
    for i in range(8):
        det.observe("leaky", 100 * MiB + i * 30 * MiB)
        decisions.append(det.should_recycle())
    assert decisions[:7] == [(False, "")] * 7, "needs a full window before calling it a leak"
    assert decisions[7] == (True, "slope")
    assert det.slope() == pytest.approx(30 * MiB)
    assert "30.0MiB/task" in det.explain("slope")


def test_one_step_up_is_not_a_leak() -> None:
    # Given a process whose baseline jumps once (a module imported on first use) and stays flat
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8)
    series = [100 * MiB] * 4 + [300 * MiB] * 20
    # Then it is never recycled, although the slope right after the step is steep
    for v in series:
        det.observe("t", v)
        assert det.should_recycle()[0] is False


def test_ceiling_recycles_before_the_baseline_passes_it() -> None:
    det = LeakDetector(slope_bytes_per_task=1 << 40, window=50, ceiling_bytes=400 * MiB)
    seen = []
    for i in range(20):
        det.observe("leaky", 100 * MiB + i * 30 * MiB)
        seen.append(det.baselines[-1])
        if det.should_recycle()[0]:
            break
    assert det.should_recycle() == (True, "ceiling")
    assert max(seen) < 400 * MiB, "recycled before the next task would pass the ceiling"
    assert max(seen) + 30 * MiB >= 400 * MiB
    assert "ceiling 400.0MiB" in det.explain("ceiling")


def test_one_step_below_the_ceiling_does_not_recycle() -> None:
    # A library loaded on first use must not get every new process recycled after its first tasks
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8, ceiling_bytes=1024 * MiB)
    for v in (200, 700, 702, 701, 703, 700):
        det.observe("t", v * MiB)
        assert det.should_recycle()[0] is False


def test_ceiling_triggers_on_a_single_reading_above_it() -> None:
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8, ceiling_bytes=1024 * MiB)
    det.observe("t", 2048 * MiB)
    assert det.should_recycle() == (True, "ceiling")


def test_attribution_names_the_leaky_task_among_several() -> None:
    rng = random.Random(3)
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8)
    level = 200 * MiB
    for _ in range(60):
        name = rng.choice(["app.resize", "app.leaky", "app.ocr", "app.mail"])
        level += (30 * MiB if name == "app.leaky" else 0) + rng.randint(-3 * MiB, 3 * MiB)
        det.observe(name, level)
    assert det.suspect() == "app.leaky"
    assert det.attributed["app.leaky"] > 10 * max(abs(v) for k, v in det.attributed.items() if k != "app.leaky")


def test_no_suspect_when_nothing_grew() -> None:
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=4)
    assert det.suspect() is None
    for v in (100, 90, 80):
        det.observe("shrinks", v * MiB)
    assert det.suspect() is None


def test_window_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        LeakDetector(8 * MiB, window=1)


# --- HygieneGuard -------------------------------------------------------------------------


class FakeMemory:
    """A process whose memory is ``live + garbage``; trimming drops the garbage."""

    def __init__(self, live: int = 100 * MiB) -> None:
        self.live = live
        self.garbage = 0
        self.trims = 0

    def read(self) -> int:
        return self.live + self.garbage

    def trim(self) -> None:
        self.trims += 1
        self.garbage = 0


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, reason: str, detail: str = "", suspect_task: str | None = None) -> bool:
        self.calls.append((reason, suspect_task))
        return True


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    config = load_config({"rmq_hygiene_margin": "16MiB", "rmq_leak_slope": "8MiB", "rmq_leak_window": 4}, {})
    rt = Runtime(config, app=None, runtime_dir=str(tmp_path), ledger=None, redis_url=None)  # type: ignore[arg-type]
    runtime.set_current(rt)
    yield rt
    runtime.set_current(None)


def run_task(guard: HygieneGuard, rt: Runtime, name: str, body) -> None:  # type: ignore[no-untyped-def]
    ctx = TaskContext(task_name=name, task_id="id", declaration=TaskDeclaration(), config=rt.config)
    guard.enter(ctx)
    body()
    guard.exit(ctx, failed=False)


def test_applies_only_when_hygiene_is_on() -> None:
    guard = HygieneGuard()
    assert guard.applies(TaskDeclaration(hygiene=True))
    assert not guard.applies(TaskDeclaration(hygiene=False))


def test_without_a_runtime_nothing_is_read() -> None:
    def probe() -> int:
        raise AssertionError("read outside a worker")

    guard = HygieneGuard(memory_probe=probe, trim=probe)
    config = load_config({}, {})
    ctx = TaskContext(task_name="t", task_id="1", declaration=TaskDeclaration(), config=config)
    guard.enter(ctx)
    guard.exit(ctx, failed=False)


def test_small_growth_does_not_trim(rt: Runtime) -> None:
    mem = FakeMemory()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=Recorder())

    def body() -> None:
        mem.garbage += 5 * MiB

    run_task(guard, rt, "small", body)
    assert mem.trims == 0
    assert "runs" not in rt.stats.counters.get("hygiene", {})
    assert rt.stats.gauges["hygiene"]["baseline_bytes"] == 105 * MiB


def test_growth_past_the_margin_trims_and_counts_what_came_back(rt: Runtime) -> None:
    mem = FakeMemory()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=Recorder())

    def body() -> None:
        mem.garbage += 50 * MiB

    for _ in range(3):
        run_task(guard, rt, "fragmenter", body)
    assert mem.trims == 3
    assert rt.stats.counters["hygiene"] == {"runs": 3, "bytes_returned": 150 * MiB}
    g = rt.stats.gauges["hygiene"]
    assert g["baseline_bytes"] == 100 * MiB
    assert g["growth_bytes"] == 0
    assert g["returned_bytes"] == 150 * MiB
    assert g["last_task_growth_bytes"] == 50 * MiB


def test_small_growths_add_up_to_a_trim(rt: Runtime) -> None:
    mem = FakeMemory()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=Recorder())

    def body() -> None:
        mem.garbage += 6 * MiB

    for _ in range(3):
        run_task(guard, rt, "drip", body)
    assert mem.trims == 1, "6+6+6 MiB since the last trim passed the 16 MiB margin"


def test_a_leaking_task_is_recycled_once_and_named(rt: Runtime) -> None:
    mem = FakeMemory()
    recycle = Recorder()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=recycle)

    def leak() -> None:
        mem.live += 30 * MiB
        mem.garbage += 20 * MiB

    def clean() -> None:
        mem.garbage += 20 * MiB

    for i in range(12):
        run_task(guard, rt, "app.leaky" if i % 2 else "app.clean", leak if i % 2 else clean)
    assert recycle.calls == [("slope", "app.leaky")]
    g = rt.stats.gauges["hygiene"]
    assert g["suspect_task"] == "app.leaky"
    assert g["recycling"] == "slope"
    assert g["growth_bytes"] > 100 * MiB


def test_models_held_by_the_cache_are_not_a_leak(rt: Runtime) -> None:
    # Given a process that loads a 30 MiB model on each of its first tasks (cache filling up)
    mem = FakeMemory()
    models = {"bytes": 0}
    recycle = Recorder()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=recycle, model_bytes=lambda: models["bytes"])

    def load_model() -> None:
        mem.live += 30 * MiB
        models["bytes"] += 30 * MiB

    for _ in range(10):
        run_task(guard, rt, "app.predict", load_model)
    # Then the baseline (models excluded) stays flat and nothing is recycled
    assert recycle.calls == []
    assert rt.stats.gauges["hygiene"]["baseline_bytes"] == 100 * MiB


def test_request_recycle_outside_a_pool_says_so(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rmq.memory.hygiene"):
        assert request_recycle("slope", detail="grew", suspect_task="app.leaky") is False
    assert "app.leaky" in caplog.text and "not a prefork pool process" in caplog.text
    assert rt.stats.counters["hygiene"] == {"recycle_unavailable": 1}


def test_guard_keeps_serving_when_recycling_is_unavailable(rt: Runtime) -> None:
    mem = FakeMemory()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=request_recycle)

    def leak() -> None:
        mem.live += 30 * MiB

    for _ in range(6):
        run_task(guard, rt, "app.leaky", leak)
    assert rt.stats.counters["hygiene"]["recycle_unavailable"] == 1, "said once, not after every task"
    assert rt.stats.gauges["hygiene"]["recycling"] is None


def test_gauges_reach_the_process_file(rt: Runtime, tmp_path: Path) -> None:
    mem = FakeMemory()
    guard = HygieneGuard(memory_probe=mem.read, trim=mem.trim, recycle=Recorder())
    run_task(guard, rt, "t", lambda: None)
    rt.stats.flush(force=True)
    data = json.loads(next(tmp_path.glob("proc-*.json")).read_text())
    assert data["gauges"]["hygiene"]["baseline_bytes"] == 100 * MiB


def test_rss_probe_sees_an_allocation() -> None:
    before = rss_bytes()
    block = bytearray(b"\x01") * (40 * MiB)
    assert rss_bytes() - before >= 35 * MiB
    del block


def test_ceiling_counts_the_garbage_a_task_leaves_until_hygiene() -> None:
    det = LeakDetector(slope_bytes_per_task=1 << 40, window=50, ceiling_bytes=400 * MiB)
    peaks = []
    for i in range(20):
        baseline = 60 * MiB + i * 30 * MiB
        peaks.append(baseline + 50 * MiB)
        det.observe("leaky", baseline, peak_bytes=peaks[-1])
        if det.should_recycle()[0]:
            break
    assert det.should_recycle() == (True, "ceiling")
    assert max(peaks) < 400 * MiB and det.baselines[-1] + 80 * MiB >= 400 * MiB
    assert "peaking 80.0MiB above it" in det.explain("ceiling")


def test_a_big_transient_without_growth_never_recycles() -> None:
    det = LeakDetector(slope_bytes_per_task=8 * MiB, window=8, ceiling_bytes=150 * MiB)
    for _ in range(30):
        det.observe("t", 100 * MiB, peak_bytes=160 * MiB)
        assert det.should_recycle() == (False, "")
