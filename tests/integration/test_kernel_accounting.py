"""Kernel accounting on real workers in real memory cgroups (docs/design.md#kernel-accounting):
each pool process in a cgroup of its own, the kernel's count of each task tree, its wake-ups, and
the burst held at the kill line while rmq chooses the victim. Skipped, with the reason, where this
machine cannot create memory cgroups."""

from __future__ import annotations

import os
import signal
import warnings

import pytest

from rmq.memory.probes import CgroupMemory
from rmq.testing.cgroups import MemoryCgroup, can_create
from rmq.testing.worker import wait_until

from .conftest import pids_in, rmq_stats_of, running, taskapp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

_why_not = can_create()


@pytest.fixture
def cgroup_of():
    """Memory cgroups for workers; removed after the test's workers have stopped (request this
    fixture before ``start_worker``: fixtures are torn down in reverse order)."""
    made: list[MemoryCgroup] = []

    def make(limit_mib: int) -> MemoryCgroup:
        cg = MemoryCgroup(limit_mib * MiB)
        made.append(cg)
        return cg

    yield make
    for cg in made:  # the worker fixture has stopped the workers by then
        removed = cg.remove()
        assert removed, f"{cg.path} left behind: {cg.describe()}"
        if cg.ended_at_removal:  # the workers had stopped: say what outlived them (the run goes on)
            warnings.warn(f"{cg.path} still held, ended at removal: {cg.ended_at_removal}", stacklevel=1)


def _worker(start_worker, app, redis_url, cg: MemoryCgroup | None, concurrency: int, **rmq):
    env = taskapp_env(redis_url, **rmq)
    return start_worker(app, app="treeapp", env=env, concurrency=concurrency, prefix=cg.wrap() if cg else ())


needs_cgroups = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


@needs_cgroups
def test_each_pool_process_is_counted_by_the_kernel_with_its_subprocess(redis_url, tree_app, cgroup_of,
                                                                        start_worker):
    # Given a worker inside its own 1 GiB memory cgroup
    cg = cgroup_of(1024)
    w = _worker(start_worker, tree_app, redis_url, cg, concurrency=2)
    accounting = rmq_stats_of(tree_app, w)["memory"]["accounting"]
    # Then it counts memory with the kernel and is woken by it, holding bursts at the kill line
    assert accounting["mode"] == "cgroup-v1" and accounting["wakeups"] == "eventfd", accounting
    assert accounting["oom_hold"] is True, accounting
    pools = cg.path / f"rmq-{w.pid}-pools"
    for pid in w.pool_pids():
        assert str(pid) in (pools / f"pool-{pid}" / "cgroup.procs").read_text().split()
    # When a task's 250 MiB lives in a subprocess
    holder = tree_app.tasks["tree.sub_hold"].delay(250, 2.0)
    # Then the kernel's count of its pool process's tree holds it
    def tree_bytes() -> int:
        return max((int(v) for v in rmq_stats_of(tree_app, w)["memory"]["children"].values()), default=0)
    wait_until(lambda: tree_bytes() >= 240 * MiB, 10, what="the subprocess's 250 MiB in a pool's count")
    assert holder.get(timeout=30)["code"] == 0


@needs_cgroups
def test_an_undeclared_batch_that_does_not_fit_at_once_runs_without_a_kernel_oom_kill(
    redis_url, tree_app, cgroup_of, start_worker
):
    # Given 8 undeclared tasks holding 200 MiB each in a subprocess, and a 768 MiB worker of 4 processes
    cg = cgroup_of(768)
    w = _worker(start_worker, tree_app, redis_url, cg, concurrency=4)
    results = [tree_app.tasks["tree.sub_touch"].delay(200, 0.5) for _ in range(8)]
    # Then every one succeeds, the kernel never kills, and the cgroup never reached its limit
    assert all(r.get(timeout=60)["code"] == 0 for r in results)
    assert cg.oom_kills() == 0
    assert (cg.peak_bytes() or 0) < 768 * MiB
    # and the peak the first run taught (the subprocess's 200 MiB) let the others run three at once
    learned = rmq_stats_of(tree_app, w)["memory"]
    assert learned["accounting"]["kernel_oom_kills"] == 0


@needs_cgroups
def test_lying_declarations_are_rerun_at_their_learned_size_without_a_kernel_oom_kill(
    redis_url, tree_app, cgroup_of, start_worker
):
    import redis

    from rmq.core import keys

    # Given 12 tasks that declare 64 MiB but hold 200 MiB in a subprocess, on 6 processes in 768 MiB
    cg = cgroup_of(768)
    w = _worker(start_worker, tree_app, redis_url, cg, concurrency=6, kill_backoff="0.2s")
    results = [tree_app.tasks["tree.sub_hold"].delay(200, 0.5) for _ in range(12)]
    # Then every one succeeds: those crowded out by their neighbours ran again
    done = [r.get(timeout=90) for r in results]
    assert all(d["code"] == 0 for d in done), [d for d in done if d["code"] != 0]
    # the kernel never killed: rmq chose, and the burst waited at the kill line meanwhile
    assert cg.oom_kills() == 0
    stats = rmq_stats_of(tree_app, w)
    assert stats["counters"]["killed"] >= 1, stats["counters"]
    assert stats["memory"]["accounting"]["woken"].get("threshold", 0) >= 1
    # and what a run really takes is learned: later runs reserve it, not the declaration
    peaks = [int(v) for v in redis.Redis.from_url(redis_url).lrange(keys.learned_peaks("tree.sub_hold"), 0, -1)]
    assert peaks and max(peaks) >= 190 * MiB, peaks


@needs_cgroups
def test_a_runaway_subprocess_ends_as_a_memory_kill_with_its_whole_cgroup(
    redis_url, tree_app, cgroup_of, start_worker, tmp_path
):
    cg = cgroup_of(768)
    w = _worker(start_worker, tree_app, redis_url, cg, concurrency=2, memory_kill_retries=1, kill_backoff="0.2s")
    pid_file = tmp_path / "pids"
    bad = tree_app.tasks["tree.sub_grow"].delay(str(pid_file), 40, 0.05, 3000)
    try:
        bad.get(timeout=60, propagate=False)
        assert bad.state == "FAILURE" and type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)
        pids = pids_in(pid_file)
        assert len(pids) == 4, pids  # two runs: a pool process and its subprocess each
        wait_until(lambda: not any(running(p) for p in pids), 5, what=f"the trees {pids} to be gone")
        assert cg.oom_kills() == 0
        assert rmq_stats_of(tree_app, w)["counters"]["killed"] == 2
    finally:
        _kill_all(pids_in(pid_file))


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _outside_the_pools(cg: MemoryCgroup) -> int:
    """What the worker's cgroup holds outside its pools' cgroup: the main process's share."""
    pools = next(cg.path.glob("rmq-*-pools"))
    worker = cg.cgroup_memory().usage_bytes()
    held = CgroupMemory(cg.version, pools, None).usage_bytes()
    assert worker is not None and held is not None
    return worker - held


@needs_cgroups
def test_the_main_process_keeps_its_heap_shared_with_the_pool_processes_it_forks(
    redis_url, tree_app, cgroup_of, start_worker
):
    # Given two workers of 6 pool processes, one with rmq_share_heap off (Celery's own behaviour)
    workers = {share: (cg := cgroup_of(768), _worker(start_worker, tree_app, redis_url, cg, concurrency=6,
                                                     share_heap=share))
               for share in (True, False)}
    # When each has two of its pool processes replaced (Celery collects before every fork)
    for _, w in workers.values():
        for _ in range(2):
            before = wait_until(lambda w=w: len(kids := _children(w.pid)) == 6 and kids, 30, what="6 pool processes")
            os.kill(min(before), signal.SIGKILL)
            wait_until(lambda w=w, before=before: len(kids := _children(w.pid)) == 6 and kids != before, 30,
                       what="the pool process replaced")
    # Then the worker sharing its heap holds far less outside its pools: the pages of the main
    # process's heap were not copied once per fork (205 MiB against 85 MiB when measured)
    shared, copied = (_outside_the_pools(workers[share][0]) for share in (True, False))
    assert shared < copied - 60 * MiB, (shared // MiB, copied // MiB)
    for cg, _ in workers.values():
        assert cg.oom_kills() == 0


def test_without_a_cgroup_of_its_own_the_worker_counts_proc_trees_and_says_why(
    redis_url, tree_app, cgroup_of, start_worker
):
    # A worker whose memory cgroup has no limit of its own (here, the test's) falls back to /proc
    w = _worker(start_worker, tree_app, redis_url, None, concurrency=1)
    accounting = rmq_stats_of(tree_app, w)["memory"]["accounting"]
    assert accounting["mode"] == "proc" and accounting["wakeups"] == "polling", accounting
    assert accounting["reason"], accounting
    if _why_not is None:  # and so does one told not to use the kernel's, inside a cgroup
        cg = cgroup_of(512)
        w2 = _worker(start_worker, tree_app, redis_url, cg, concurrency=1, kernel_accounting=False)
        off = rmq_stats_of(tree_app, w2)["memory"]["accounting"]
        assert off["mode"] == "proc" and "rmq_kernel_accounting" in off["reason"], off
        assert not (cg.path / f"rmq-{w2.pid}-pools").exists()


@needs_cgroups
def test_the_pools_cap_follows_the_main_process_both_ways_swap_included(cgroup_of):
    from rmq.memory.pool_cgroups import PoolCgroups

    cg = cgroup_of(1024)
    pools = PoolCgroups(cg.cgroup_memory(), os.getpid())
    pools.prepare()
    try:
        for mib in (900, 950, 800, 990):  # down from unlimited, up, down, up
            assert pools.set_pools_limit(mib * MiB)
            caps = [int((pools.root / f).read_text()) for f in ("memory.limit_in_bytes",
                                                                "memory.memsw.limit_in_bytes")
                    if (pools.root / f).exists()]
            assert caps and all(c == mib * MiB for c in caps), (mib, caps)
    finally:
        pools.remove()


@needs_cgroups
def test_what_a_killed_worker_left_running_is_ended_by_the_next_worker_in_its_cgroup(redis_url, tree_app,
                                                                                     cgroup_of, start_worker,
                                                                                     tmp_path):
    import redis as redis_lib

    # Given a worker in its memory cgroup whose task runs a subprocess (an encoder) holding 50 MiB
    cg = cgroup_of(1024)
    w = _worker(start_worker, tree_app, redis_url, cg, concurrency=1)
    pid_file = tmp_path / "pids"
    tree_app.tasks["tree.sub_grow"].delay(str(pid_file), 10, 0.05, 50)
    wait_until(lambda: len(pids_in(pid_file)) == 2, 30, what="the task and its subprocess to start")
    pool_pid, encoder = pids_in(pid_file)
    left = cg.path / f"rmq-{w.pid}-pools"
    try:
        # When the worker is killed outright
        os.kill(w.pid, signal.SIGKILL)
        wait_until(lambda: not running(pool_pid), 10, what="the pool process to die with its worker")
        # Then the subprocess lives on in the dead worker's pool cgroup, governed by nobody
        assert running(encoder) and left.is_dir()
        # (its task is delivered again by then: not what this test is about)
        redis_lib.Redis.from_url(redis_url).flushdb()
        # And the next worker started in the cgroup ends it, and removes what the dead one left
        w2 = _worker(start_worker, tree_app, redis_url, cg, concurrency=1)
        wait_until(lambda: not running(encoder), 5, what=f"the leftover subprocess {encoder} to be ended")
        assert not left.exists()
        assert (cg.path / f"rmq-{w2.pid}-pools").is_dir()
        assert "left in" in w2.log() and f"dead worker pid {w.pid}" in w2.log()
    finally:
        _kill_all(pids_in(pid_file))
