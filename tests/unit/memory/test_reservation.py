"""The admission guard in a pool process: reservations in a real ledger, peaks for the learner."""

from __future__ import annotations

import time

import pytest

from rmq.concern import TaskContext
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.ledger import Control, Ledger
from rmq.core.runtime import Runtime, set_current
from rmq.memory.reservation import AdmissionGuard

MiB = 1 << 20


class RecordingLearner:
    def __init__(self, peaks: dict[str, int] | None = None) -> None:
        self.observed: list[tuple[str, int]] = []
        self.peaks = peaks or {}

    def learned(self, name: str) -> int:
        return self.peaks.get(name, 0)

    def observe(self, name: str, peak: int) -> None:
        self.observed.append((name, peak))


@pytest.fixture
def rt(tmp_path):
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    runtime = Runtime(load_config({}, environ={}), app=None, runtime_dir=str(tmp_path / "rt"), ledger=ledger,
                      redis_url=None)
    runtime._local["learner"] = RecordingLearner()
    set_current(runtime)
    yield runtime
    set_current(None)


def run(rt: Runtime, name: str, failed: bool = False, **declared) -> TaskContext:
    ctx = TaskContext(name, f"{name}-1", parse_declaration(**declared), rt.config)
    guard = AdmissionGuard()
    guard.enter(ctx)
    assert [e.task_id for e in rt.ledger.entries()] == [ctx.task_id]  # reserved while it runs
    ctx.rss_after = ctx.rss_before + 5 * MiB  # the body grew the process by 5 MiB
    guard.exit(ctx, failed)
    assert rt.ledger.entries() == []  # released after
    return ctx


def test_an_unknown_undeclared_task_takes_half_the_idle_worker_and_records_its_peak(rt) -> None:
    # no declaration and no learned peak: it holds half of what an idle worker admits (3500 - 100 MiB)
    ctx = run(rt, "app.undeclared")
    assert ctx.memory_bytes == 1700 * MiB
    assert rt.made("learner").observed == [("app.undeclared", 5 * MiB)]


def test_an_unknown_undeclared_task_takes_the_default_with_no_share(tmp_path) -> None:
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    runtime = Runtime(load_config({"rmq_unknown_share": 0}, environ={}), app=None,
                      runtime_dir=str(tmp_path / "rt"), ledger=ledger, redis_url=None)
    runtime._local["learner"] = RecordingLearner()
    ctx = TaskContext("app.undeclared", "u-1", parse_declaration(), runtime.config, runtime=runtime)
    AdmissionGuard().enter(ctx)
    assert ctx.memory_bytes == runtime.config.default_task_memory
    ledger.close()


def test_a_learned_peak_refines_a_declaration_both_ways(rt) -> None:
    # a generous ceiling (400 MiB, 300 used) frees the rest; a lying one (100 MiB) reserves the truth
    rt._local["learner"] = RecordingLearner({"app.generous": 300 * MiB, "app.lying": 300 * MiB})
    assert run(rt, "app.generous", memory="400MiB").memory_bytes == 300 * MiB
    assert run(rt, "app.lying", memory="100MiB").memory_bytes == 300 * MiB
    # without a learned peak, the declaration
    assert run(rt, "app.declared", memory="64MiB").memory_bytes == 64 * MiB


def test_a_rerun_after_a_memory_kill_reserves_at_least_what_the_kill_saw(rt) -> None:
    ctx = TaskContext("app.lying", "l-1", parse_declaration(memory="100MiB"), rt.config, min_memory_bytes=250 * MiB)
    AdmissionGuard().enter(ctx)
    assert ctx.memory_bytes == 250 * MiB
    AdmissionGuard().exit(ctx, failed=True)


def test_a_declared_task_records_its_peak_too(rt) -> None:
    ctx = run(rt, "app.declared", memory="64MiB")
    assert ctx.memory_bytes == 64 * MiB
    assert rt.made("learner").observed == [("app.declared", 5 * MiB)]


def test_a_failed_run_records_no_peak(rt) -> None:
    run(rt, "app.undeclared", failed=True)
    assert rt.made("learner").observed == []


def test_a_peak_between_two_governor_readings_is_still_learned(rt) -> None:
    # Given an undeclared task whose body takes 64 MiB and gives it back before it returns, with no
    # governor reading in between (nothing writes the reservation's usage here)
    ctx = TaskContext("app.spike", "spike-1", parse_declaration(), rt.config)
    guard = AdmissionGuard()
    guard.enter(ctx)
    block = b"x" * (64 * MiB)  # written, so resident
    del block
    # When it ends
    guard.exit(ctx, failed=False)
    # Then the learner gets the spike, from the kernel's high-water mark since admission
    [(name, peak)] = rt.made("learner").observed
    assert name == "app.spike" and peak >= 60 * MiB, peak / MiB
    assert ctx.rss_after is not None and ctx.rss_after - ctx.rss_before < 32 * MiB  # the RSS alone missed it


def test_a_waited_for_subprocess_counts_for_the_task_it_ran_in_only_with_one_read_a_task(rt, monkeypatch) -> None:
    from rmq.memory import reservation

    # Given a pool process whose waited-for children's high-water mark (getrusage) is scripted
    children = {"peak": 10 * MiB, "reads": 0}

    def children_peak() -> int:
        children["reads"] += 1
        return children["peak"]

    monkeypatch.setattr(reservation, "_children_peak", children_peak)
    monkeypatch.setattr(reservation, "_children_seen", None)
    guard = AdmissionGuard()

    def task(name: str, child_peak: int | None = None, failed: bool = False) -> None:
        ctx = TaskContext(name, f"{name}-1", parse_declaration(), rt.config)
        guard.enter(ctx)
        if child_peak is not None:  # the body ran an encoder subprocess and waited for it
            children["peak"] = max(children["peak"], child_peak)
        ctx.rss_after = ctx.rss_before_body() + 5 * MiB
        guard.exit(ctx, failed)

    # When a task runs a 300 MiB subprocess, one fails after a 900 MiB one, and two run none
    task("app.first")
    task("app.encode", child_peak=300 * MiB)
    task("app.after")
    task("app.crash", child_peak=900 * MiB, failed=True)
    task("app.next")
    # Then only the task that ran the subprocess learns it, on top of its own growth; the failed
    # task's subprocess is charged to no one
    assert rt.made("learner").observed == [
        ("app.first", 5 * MiB), ("app.encode", 305 * MiB), ("app.after", 5 * MiB), ("app.next", 5 * MiB),
    ]
    # and the children's mark is read once a task (the first also before its body)
    assert children["reads"] == 5 + 1


class GrownLearner(RecordingLearner):
    """Peaks learned on a bigger worker: more than this one's admit line."""

    def learned(self, name: str) -> int:
        return 5000 * MiB


def test_a_learned_peak_larger_than_this_worker_admits_runs_alone_and_is_learned_here(rt) -> None:
    # Given an undeclared task whose peaks, learned on a bigger worker sharing this Redis, pass this
    # worker's admit line (3500 MiB, idle worker 100 MiB)
    rt._local["learner"] = GrownLearner()
    # When it arrives at an idle worker, it runs, holding all an idle worker can admit (it runs alone)
    ctx = run(rt, "app.grown")
    assert ctx.memory_bytes == 3400 * MiB
    # and its peak here is learned, so the learned value comes down to what this worker saw
    assert rt.made("learner").observed == [("app.grown", 5 * MiB)]


def test_a_learned_peak_larger_than_this_worker_admits_waits_for_the_worker_to_be_idle(tmp_path) -> None:
    from rmq.core.errors import Defer
    from rmq.core.ledger import KIND_TASK, Entry

    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    runtime = Runtime(load_config({"rmq_admission_wait": "0s"}, environ={}), app=None,
                      runtime_dir=str(tmp_path / "rt"), ledger=ledger, redis_url=None)
    runtime._local["learner"] = GrownLearner()
    # Given a neighbour task that holds 64 MiB
    assert ledger.try_add(Entry(KIND_TASK, 1, 64 * MiB, task_id="neighbour", name="app.small"), lambda _: True)
    # When the grown task arrives, it is deferred (not failed): it runs once the worker is idle
    ctx = TaskContext("app.grown", "grown-1", parse_declaration(), runtime.config, runtime=runtime)
    with pytest.raises(Defer) as caught:
        AdmissionGuard().enter(ctx)
    assert caught.value.kind == "memory"
    assert [e.task_id for e in ledger.entries()] == ["neighbour"]
    ledger.close()


def test_a_model_load_that_finds_the_ledger_full_waits_instead_of_failing(rt) -> None:
    from rmq.core.ledger import KIND_TASK, Entry, LedgerFull
    from rmq.models.reserver import LedgerModelReserver

    # Given a ledger whose every slot is held
    with rt.ledger.locked(), pytest.raises(LedgerFull):
        for i in range(10_000):
            rt.ledger.add_unlocked(Entry(KIND_TASK, 1, 0, task_id=f"t{i}", name="app.t"))
    freed: list[int] = []
    # When a model load asks for room, it unloads here, waits, and answers "not now" (the cache defers)
    reserver = LedgerModelReserver(rt, poll_s=0.01)
    assert reserver.admit("model:m", 10 * MiB, 0.05, lambda n: freed.append(n) or 0) is False
    assert freed == [10 * MiB]


def test_a_task_that_finds_the_ledger_full_is_deferred_not_failed(tmp_path) -> None:
    from rmq.core.errors import Defer
    from rmq.core.ledger import KIND_TASK, Entry, LedgerFull

    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    runtime = Runtime(load_config({"rmq_admission_wait": "0.05s"}, environ={}), app=None,
                      runtime_dir=str(tmp_path / "rt"), ledger=ledger, redis_url=None)
    runtime._local["learner"] = RecordingLearner()
    with ledger.locked(), pytest.raises(LedgerFull):
        for i in range(10_000):
            ledger.add_unlocked(Entry(KIND_TASK, 1, 0, task_id=f"t{i}", name="app.t"))
    ctx = TaskContext("app.task", "task-1", parse_declaration(memory="64MiB"), runtime.config, runtime=runtime)
    with pytest.raises(Defer) as caught:
        AdmissionGuard().enter(ctx)
    assert caught.value.kind == "ledger"
    assert ledger.read_unload_request()[0] == 1  # resident models are asked to make room
    ledger.close()


def test_an_unknown_task_on_a_worker_full_of_pinned_models_waits_instead_of_failing(tmp_path) -> None:
    from rmq.core.errors import Defer
    from rmq.core.ledger import KIND_MODEL, Entry

    ledger = Ledger(str(tmp_path / "rt"), create=True)
    # idle worker 100 MiB, admit line 3500 MiB, and a resident model reserving all the rest
    ledger.write_control(Control(0, 0, 3500 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    assert ledger.try_add(Entry(KIND_MODEL, 1, 3400 * MiB, task_id="model:m", name="model:m"), lambda _: True)
    runtime = Runtime(load_config({"rmq_admission_wait": "0s"}, environ={}), app=None,
                      runtime_dir=str(tmp_path / "rt"), ledger=ledger, redis_url=None)
    runtime._local["learner"] = RecordingLearner()
    ctx = TaskContext("app.unknown", "u-1", parse_declaration(), runtime.config, runtime=runtime)
    with pytest.raises(Defer) as caught:  # not BudgetExceeded for an absurd size: no room now
        AdmissionGuard().enter(ctx)
    assert caught.value.kind == "memory"
    ledger.close()


class StuckPools:
    """Pool cgroups the kernel will not make yet (``ENOMEM`` beside pools held at their cap)."""

    adopted_pid = 0

    def __init__(self) -> None:
        self.tries = 0

    def adopt(self, pid: int) -> None:
        self.tries += 1
        raise OSError(12, "Cannot allocate memory")


def test_a_pool_process_outside_its_cgroup_defers_its_task_instead_of_running_it_uncapped(rt) -> None:
    from rmq.core.errors import Defer
    from rmq.memory.pool_cgroups import Accounting

    pools = StuckPools()
    rt.accounting = Accounting("cgroup-v1", "fake", pools)  # type: ignore[arg-type]
    ctx = TaskContext("media.encode", "e-1", parse_declaration(memory="64MiB"), rt.config)
    with pytest.raises(Defer) as raised:
        AdmissionGuard().enter(ctx)
    # it tried again, reserved nothing, and the task waits in the queue (counted as deferred.cgroup)
    assert pools.tries == 1 and raised.value.kind == "cgroup" and "Cannot allocate memory" in raised.value.reason
    assert rt.ledger.entries() == []


def test_read_afresh_a_running_tasks_use_is_counted_once_and_only_for_the_run_it_was_read_of(rt) -> None:
    from rmq.core.ledger import KIND_TASK, Entry
    from rmq.memory.admission import Need
    from rmq.memory.reservation import _try_once

    # Given a task just admitted (1500 MiB reserved, 10 MiB in its cgroup then), which the governor
    # has not sampled since (its use reads 0): the kernel's fresh count of the worker holds its 1500 MiB
    rt.ledger.try_add(Entry(KIND_TASK, 11, 1500 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                      lambda _: True)

    def attempt(task_id: str):
        entry = Entry(KIND_TASK, 12, 1800 * MiB, task_id="next", name="media.a")
        return _try_once(rt.ledger, entry, Need(1800 * MiB, 0, 0), None, True, 1.0,
                         lambda: (1600 * MiB, {(11, task_id): 1510 * MiB}))

    # When a waiting task reads that run's own count with the worker's, the run's 1500 MiB count once,
    # and the next task fits under the admit line (3500 MiB): 1600 + 0 + 1800
    refused = attempt("b")  # a count read of another run of that pool process: not this run's use
    assert not refused.admitted and "reserved-unused 1.5GiB" in refused.reason, refused.reason
    assert attempt("a").admitted


def test_under_kernel_accounting_the_pool_cgroups_high_water_mark_is_the_peak_and_nothing_else_is_read(
        rt, tmp_path, monkeypatch) -> None:
    from rmq.core import forks
    from rmq.memory import reservation
    from rmq.memory.pool_cgroups import Accounting, PoolCgroups
    from rmq.memory.probes import CgroupMemory

    # Given a pool process in its own (fake, v1) cgroup: 400 MiB charged, 50 MiB of it inactive cache
    worker = tmp_path / "worker"
    pools = PoolCgroups(CgroupMemory(1, worker, 4096 * MiB), 100)
    pool = pools.path_for(forks.pid())
    pool.mkdir(parents=True)
    (pool / "memory.usage_in_bytes").write_text(str(400 * MiB))
    (pool / "memory.stat").write_text(f"inactive_file 0\ntotal_inactive_file {50 * MiB}\n")
    (pool / "memory.max_usage_in_bytes").write_text(str(900 * MiB))
    pools.adopted_pid = forks.pid()
    rt.accounting = Accounting("cgroup-v1", "fake", pools)  # type: ignore[assignment]

    def not_read(*args: object) -> None:
        raise AssertionError("the process's own peak is read under kernel accounting")

    for name in ("reset_peak_rss", "peak_rss_bytes", "_children_peak"):
        monkeypatch.setattr(reservation, name, not_read)
    ctx = TaskContext("media.encode", "e-1", parse_declaration(), rt.config)
    guard = AdmissionGuard()
    # When a task starts: the cgroup's mark is reset, and its use counts from the working set
    guard.enter(ctx)
    assert (pool / "memory.max_usage_in_bytes").read_text() == "0"
    [entry] = rt.ledger.entries()
    assert entry.start_rss == 350 * MiB
    # and its tree (an encoder subprocess, say) peaks 300 MiB above the start while the process
    # itself ends 5 MiB larger
    (pool / "memory.max_usage_in_bytes").write_text(str(700 * MiB))
    ctx.rss_after = ctx.rss_before_body() + 5 * MiB
    guard.exit(ctx, failed=False)
    # Then the learner gets the tree's peak, from the cgroup's high-water mark alone
    assert rt.made("learner").observed == [("media.encode", 300 * MiB)]
