"""A task's memory is its pool process plus every descendant: counted, admitted against, killed
whole, and reaped (docs/design.md#task-trees). Real workers on a real Redis."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from rmq.testing.worker import wait_until

from .conftest import pids_in, rmq_stats_of, running, taskapp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _zombies_under(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)
                if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def _end(pids: list[int]) -> None:
    """Stop what a test's tasks started, by PID, whatever the outcome (the worker's pool is stopped by
    its fixture)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _worker(start_worker, app, redis_url, concurrency: int = 2, **rmq):
    env = taskapp_env(redis_url, **rmq)
    return start_worker(app, app="treeapp", env=env, concurrency=concurrency)


def test_a_subprocesss_memory_is_in_the_reading_and_admission_waits_for_it(redis_url, tree_app, start_worker):
    # Given a worker with a 1 GiB budget (admit line 870 MiB) and a task that declares 64 MiB but
    # holds 500 MiB in a subprocess it runs
    w = _worker(start_worker, tree_app, redis_url, memory_budget="1GiB")
    wait_until(lambda: rmq_stats_of(tree_app, w)["memory"]["idle_bytes"] > 0, 10, what="an idle reading")
    idle = rmq_stats_of(tree_app, w)["memory"]["idle_bytes"]
    holder = tree_app.tasks["tree.sub_hold"].delay(500, 4.0)

    # When the subprocess holds its memory
    def tree_seen():
        mem = rmq_stats_of(tree_app, w)["memory"]
        trees = [sum(t.values()) for t in (mem.get("descendants") or {}).values()]
        return mem if trees and max(trees) > 450 * MiB else None

    mem = wait_until(tree_seen, 15, interval=0.1, what="the subprocess in the worker's reading")
    # Then the worker's reading, the pool process's figure and the reservation's use all count it
    assert mem["worker_bytes"] > idle + 450 * MiB, mem
    assert max(mem["children"].values()) > 450 * MiB, mem
    res = [r for r in rmq_stats_of(tree_app, w)["reservations"] if r["task_id"] == holder.id]
    assert res and res[0]["used_bytes"] > 450 * MiB, res
    # and a 400 MiB task that does not fit beside it waits until the subprocess's 4 s hold is over (its
    # memory is gone as the subprocess exits, a moment before the holder's body returns)
    second = tree_app.tasks["tree.declared"].delay(0.1)
    first, then = holder.get(timeout=30), second.get(timeout=30)
    assert then["started"] >= first["started"] + 4.0, (first, then)


def test_a_runaway_subprocess_fails_its_task_and_nothing_of_its_tree_is_left(
    redis_url, tree_app, start_worker, tmp_path
):
    # Given a task declaring 100 MiB whose subprocess grows by 40 MiB every 50 ms
    w = _worker(start_worker, tree_app, redis_url, memory_budget="1GiB", memory_kill_retries=1,
                kill_backoff="0.2s")
    pid_file = tmp_path / "pids"
    bad = tree_app.tasks["tree.sub_grow"].delay(str(pid_file))
    try:
        # When it runs into the kill line (twice: one re-run)
        bad.get(timeout=60, propagate=False)
        # Then it ends as a memory kill
        assert bad.state == "FAILURE"
        assert type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)
        # and no process of either run's tree runs any more, nor waits as a zombie under the worker
        pids = pids_in(pid_file)
        assert len(pids) == 4, pids  # two pool processes, two subprocesses
        wait_until(lambda: not any(running(p) for p in pids), 5, what=f"the tree {pids} to be gone")
        wait_until(lambda: not _zombies_under(w.pid), 5, what="no zombie under the worker")
        assert rmq_stats_of(tree_app, w)["counters"]["killed"] == 2
    finally:
        _end(pids_in(pid_file))


def test_a_daemon_that_leaves_its_session_and_double_forks_is_killed_with_its_task(
    redis_url, tree_app, start_worker, tmp_path
):
    # Given an undeclared task that starts a daemon (setsid, double fork) which grows without bound
    w = _worker(start_worker, tree_app, redis_url, memory_budget="1GiB", memory_kill_retries=1,
                kill_backoff="0.2s")
    pid_file = tmp_path / "pids"
    bad = tree_app.tasks["tree.sub_daemon"].delay(str(pid_file))
    try:
        # When the daemon runs into the kill line
        bad.get(timeout=60, propagate=False)
        # Then the task ends as a memory kill, and the daemons of both runs are dead and reaped
        assert bad.state == "FAILURE"
        assert type(bad.result).__name__ == "MemoryBudgetExceeded", repr(bad.result)
        pids = pids_in(pid_file)
        assert len(pids) == 6, pids  # per run: the pool process, the launcher, the daemon
        wait_until(lambda: not any(running(p) for p in pids), 5, what=f"the tree {pids} to be gone")
        wait_until(lambda: not _zombies_under(w.pid), 5, what="no zombie under the worker")
    finally:
        _end(pids_in(pid_file))


def test_daemons_a_task_leaves_are_adopted_by_the_worker_and_reaped_when_they_end(
    redis_url, tree_app, start_worker, tmp_path
):
    # Given tasks that each leave a daemon behind (setsid, double fork) living 1.5 s
    w = _worker(start_worker, tree_app, redis_url)
    pid_file = tmp_path / "pids"
    try:
        assert [tree_app.tasks["tree.short_daemon"].delay(str(pid_file), 1.5).get(timeout=30)
                for _ in range(3)] == [0, 0, 0]
        daemon_file = Path(f"{pid_file}.daemon")
        daemons = wait_until(lambda: len(p := pids_in(daemon_file)) == 3 and p, 5, what="the daemons")
        # Then while they run they belong to the worker (its main process is their subreaper)
        alive = [p for p in daemons if running(p)]
        assert alive, "the daemons ended before the check"
        assert all(psutil.Process(p).ppid() == w.pid for p in alive), [
            (p, psutil.Process(p).ppid()) for p in alive]
        # and once they end, the worker reaps them: nothing is left, not even a zombie
        wait_until(lambda: not any(psutil.pid_exists(p) for p in daemons), 10, what="the daemons to be reaped")
        wait_until(lambda: not _zombies_under(w.pid), 5, what="no zombie under the worker")
        assert rmq_stats_of(tree_app, w)["counters"]["reaped"] >= 3
    finally:
        _end(pids_in(pid_file) + pids_in(Path(f"{pid_file}.daemon")))
