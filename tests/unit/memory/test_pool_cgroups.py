"""Kernel accounting on fake cgroup v1 and v2 trees: choosing it, pool cgroups, readings, cleanup,
and the lines it brings (docs/design.md#kernel-accounting)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from rmq.core.config import load_config
from rmq.memory.lines import KERNEL, POLLING, lines_for
from rmq.memory.pool_cgroups import PoolCgroups, choose_accounting
from rmq.memory.probes import CgroupMemory

MiB = 1 << 20


def v1_tree(tmp_path: Path) -> CgroupMemory:
    cg = tmp_path / "memory" / "worker"
    cg.mkdir(parents=True)
    (cg / "memory.limit_in_bytes").write_text(str(1536 * MiB))
    (cg / "cgroup.procs").write_text("100\n")
    return CgroupMemory(1, cg, 1536 * MiB)


def v2_tree(tmp_path: Path) -> CgroupMemory:
    cg = tmp_path / "unified" / "worker"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(str(1536 * MiB))
    (cg / "cgroup.controllers").write_text("cpu memory pids\n")
    (cg / "cgroup.subtree_control").write_text("\n")
    (cg / "cgroup.procs").write_text("100\n101\n")
    return CgroupMemory(2, cg, 1536 * MiB)


def fill(path: Path, version: int, usage: int, inactive: int = 0, peak: int | None = None) -> None:
    """What the kernel would show in a pool cgroup."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ("memory.usage_in_bytes" if version == 1 else "memory.current")).write_text(str(usage))
    (path / "memory.stat").write_text(f"{'total_inactive_file' if version == 1 else 'inactive_file'} {inactive}\n")
    if peak is not None:
        (path / ("memory.max_usage_in_bytes" if version == 1 else "memory.peak")).write_text(str(peak))


def test_v1_pools_live_under_one_capped_cgroup_of_the_worker(tmp_path) -> None:
    acc = choose_accounting(v1_tree(tmp_path), 100)
    assert acc.mode == "cgroup-v1" and acc.kernel
    pools = acc.pools
    assert pools is not None and pools.root.is_dir() and pools.root.name == "rmq-100-pools"
    # a pool process moves itself into a cgroup of its own
    pools.adopt(4242)
    assert (pools.root / "pool-4242" / "cgroup.procs").read_text() == "4242"
    assert pools.members(4242) == [4242]
    # the pools together are capped (memory+swap too, where the kernel has it)
    assert pools.set_pools_limit(1400 * MiB)
    assert (pools.root / "memory.limit_in_bytes").read_text() == str(1400 * MiB)
    assert pools.pools_cgroup.limit_bytes == 1400 * MiB


def test_v2_moves_the_workers_processes_to_a_leaf_and_enables_memory_for_children(tmp_path) -> None:
    worker = v2_tree(tmp_path)
    acc = choose_accounting(worker, 100)
    assert acc.mode == "cgroup-v2"
    leaf = worker.path / "rmq-100-main"
    # "no internal processes": every process of the worker's cgroup went to the leaf, one write each
    assert (leaf / "cgroup.procs").read_text() == "101"  # the fake file keeps the last write
    assert (worker.path / "cgroup.subtree_control").read_text() == "+memory"
    assert acc.pools is not None
    assert (acc.pools.root / "cgroup.subtree_control").read_text() == "+memory"
    acc.pools.adopt(7)
    assert (acc.pools.root / "pool-7" / "memory.swap.max").read_text() == "0"


@pytest.mark.parametrize("version", [1, 2])
def test_a_pool_cgroups_reading_is_its_working_set_and_its_peak_since_admission(tmp_path, version) -> None:
    worker = v1_tree(tmp_path) if version == 1 else v2_tree(tmp_path)
    pools = PoolCgroups(worker, 100)
    pools.prepare()
    fill(pools.path_for(9), version, usage=400 * MiB, inactive=50 * MiB, peak=900 * MiB)
    assert pools.usage(9) == 350 * MiB
    # a task starts: the usage the peak starts from, and the working set its use is counted from
    assert pools.begin_task(9) == (400 * MiB, 350 * MiB)
    if version == 1:
        # v1 resets the high-water mark by writing 0
        assert (pools.path_for(9) / "memory.max_usage_in_bytes").read_text() == "0"
        (pools.path_for(9) / "memory.max_usage_in_bytes").write_text(str(700 * MiB))
        assert pools.peak(9) == 700 * MiB
    else:
        # v2 resets memory.peak through a descriptor it keeps (a plain file takes the write)
        peak_file = pools.path_for(9) / "memory.peak"
        assert peak_file.read_text().startswith("reset\n")
        peak_file.write_text(str(650 * MiB))  # what the kernel shows after
        assert pools.peak(9) == 650 * MiB
        # the next task resets through the same descriptor: the kernel's mark is per descriptor
        fd = pools._peak_files[9]
        assert pools.begin_task(9) is not None
        assert pools._peak_files[9] == fd


def test_a_pool_cgroup_that_cannot_be_read_begins_no_kernel_measured_task(tmp_path) -> None:
    pools = PoolCgroups(v1_tree(tmp_path), 100)
    pools.prepare()
    pools.path_for(9).mkdir()  # no files: its cgroup is going away
    assert pools.begin_task(9) is None and pools.usage(9) is None


def test_only_empty_pool_cgroups_of_gone_processes_are_removed(tmp_path) -> None:
    pools = PoolCgroups(v1_tree(tmp_path), 100)
    pools.prepare()
    for pid in (1, 2, 3):
        pools.path_for(pid).mkdir()
    (pools.path_for(2) / "cgroup.procs").write_text("")  # gone, empty
    (pools.path_for(3) / "cgroup.procs").write_text("77\n")  # a daemon of pid 3 still runs in it
    # real cgroup directories are removed with rmdir even with their files; the fake needs them gone
    for pid in (1, 2):
        for f in pools.path_for(pid).iterdir():
            f.unlink()
    assert sorted(pools.sweep(keep={1})) == [2]
    assert pools.path_for(1).is_dir() and pools.path_for(3).is_dir()


def test_accounting_falls_back_to_proc_trees_with_the_reason(tmp_path) -> None:
    assert choose_accounting(None, 1).mode == "proc"
    off = choose_accounting(v1_tree(tmp_path / "a"), 1, enabled=False)
    assert off.mode == "proc" and "rmq_kernel_accounting" in off.reason
    shared = choose_accounting(v1_tree(tmp_path / "b"), 1, budget_from_cgroup=False)
    assert shared.mode == "proc" and "no limit of its own" in shared.reason
    worker = v2_tree(tmp_path / "c")
    (worker.path / "cgroup.controllers").write_text("cpu pids\n")
    no_memory = choose_accounting(worker, 1)
    assert no_memory.mode == "proc" and "memory controller" in no_memory.reason
    assert not (worker.path / "rmq-1-main").exists()


def test_a_dry_run_changes_nothing(tmp_path) -> None:
    worker = v2_tree(tmp_path)
    acc = choose_accounting(worker, 100, dry_run=True)
    assert acc.mode == "cgroup-v2"
    assert sorted(p.name for p in worker.path.iterdir()) == [
        "cgroup.controllers", "cgroup.procs", "cgroup.subtree_control", "memory.max"]


def test_kernel_lines_apply_unless_the_user_chose_lines() -> None:
    assert lines_for(load_config({}, {}), kernel=True) == KERNEL
    assert lines_for(load_config({}, {}), kernel=False) == POLLING
    # one line set: exactly the user's lines, polling defaults for the rest, never a mix
    mine = lines_for(load_config({"rmq_kill_ratio": 0.97}, {}), kernel=True)
    assert (mine.kill, mine.admit, mine.pause, mine.source) == (0.97, 0.85, 0.85, "configured")
    # the budget counts as a line: a user's 80 % stays 80 %
    assert lines_for(load_config({}, {"RMQ_MEMORY_BUDGET": "80%"}), kernel=True).budget_percent == 0.80


def test_a_small_worker_keeps_48_mib_above_its_kernel_kill_line_and_between_it_and_admission() -> None:
    assert lines_for(load_config({}, {}), kernel=True, limit_bytes=8 << 30) == KERNEL
    small = lines_for(load_config({}, {}), kernel=True, limit_bytes=768 * MiB)
    # 1.5 % of 768 MiB is 11.5 MiB: too little for the main process's growth while the pools are held
    assert round((1 - small.kill) * 768) == 48 and round((small.kill - small.admit) * 768) == 48
    assert small.unload_target < small.unload < small.admit < small.pause < small.kill
    # a user's lines stay the user's, whatever the size
    assert lines_for(load_config({"rmq_kill_ratio": 0.97}, {}), kernel=True, limit_bytes=768 * MiB).kill == 0.97


_FORKS = """
import os, sys
from pathlib import Path
from rmq.memory.pool_cgroups import choose_accounting
from rmq.memory.probes import CgroupMemory

cg = Path(sys.argv[1])
pools = choose_accounting(CgroupMemory(1, cg, 1536 << 20), os.getpid()).pools
pools.adopt_at_fork(os.getpid())
child = os.fork()
if child == 0:  # a pool process: it forks a task's subprocess in turn
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(0)
    os.waitpid(grandchild, 0)
    print(grandchild, flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(child, flush=True)
"""


def test_processes_the_main_process_forks_move_into_their_own_cgroup_at_once_and_theirs_stay(tmp_path) -> None:
    import subprocess
    import sys

    cg = v1_tree(tmp_path).path
    # a process of its own: the fork hook cannot be taken back, and must not follow this test's process
    out = subprocess.run([sys.executable, "-c", _FORKS, str(cg)], capture_output=True, text=True, timeout=30,
                         check=True).stdout.split()
    grandchild, child = int(out[0]), int(out[1])
    pools = next(cg.glob("rmq-*-pools"))
    # the pool process was moved in the child, before anything it ran could be charged beside the main
    # process; the subprocess it forked is not moved out of its pool's cgroup
    assert (pools / f"pool-{child}" / "cgroup.procs").read_text() == str(child)
    assert not (pools / f"pool-{grandchild}").exists()


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"])


def _gone_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.mark.parametrize("version", [1, 2])
def test_what_a_dead_worker_left_in_its_pool_cgroups_is_killed_and_its_hold_released(tmp_path, version) -> None:
    worker = v1_tree(tmp_path) if version == 1 else v2_tree(tmp_path)
    dead = _gone_pid()
    left, found = _sleeper(), _sleeper()  # a dead worker's task subprocess; what its v2 leaf holds
    alive = worker.path / "rmq-100-pools" / "pool-7"  # a live worker's (pid 100, in the worker's cgroup)
    try:
        leftover = worker.path / f"rmq-{dead}-pools" / "pool-9"
        leftover.mkdir(parents=True)
        (leftover / "cgroup.procs").write_text(f"{left.pid}\n")
        (leftover.parent / "memory.oom_control").write_text("oom_kill_disable 1\nunder_oom 1\n")
        (worker.path / f"rmq-{dead}-main").mkdir()
        (worker.path / f"rmq-{dead}-main" / "cgroup.procs").write_text(f"{found.pid}\n")
        alive.mkdir(parents=True)
        (alive / "cgroup.procs").write_text(f"{found.pid}\n")

        reclaimed = PoolCgroups(worker, 200).reclaim_dead_workers(timeout_s=0.05)

        assert reclaimed == {dead: [left.pid]}
        assert left.wait(5) == -signal.SIGKILL
        if version == 1:  # the kernel's OOM killer back, for anything the kill could not end
            assert (leftover.parent / "memory.oom_control").read_text() == "0"
        # nothing of a live worker, nor what a dead v2 worker's leaf holds (a supervisor, say), is touched
        assert found.poll() is None and alive.is_dir()
    finally:
        for proc in (left, found):
            proc.kill()
            proc.wait()
