"""Per-process handles notice a fork without a system call per read (rmq.core.forks)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os

from rmq.core import forks
from rmq.core.config import load_config
from rmq.core.ledger import Ledger
from rmq.core.runtime import Runtime
from rmq.core.selfmem import own_rss_bytes


def in_forked_child(check) -> int:
    """Run ``check()`` in a child made by ``os.fork``; its exit code (0 when it returned True)."""
    child = os.fork()
    if child == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_pid_is_this_process_s_own_before_and_after_a_fork() -> None:
    assert forks.pid() == os.getpid()
    assert in_forked_child(lambda: forks.pid() == os.getpid()) == 0
    assert forks.pid() == os.getpid()


def _report_pid(queue) -> None:
    queue.put((forks.pid(), os.getpid()))


def test_pid_is_renewed_in_a_multiprocessing_fork_child() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_report_pid, args=(queue,))
    proc.start()
    seen, real = queue.get(timeout=30)
    proc.join(30)
    assert seen == real == proc.pid != os.getpid()


def test_runtime_handles_are_made_again_in_a_forked_child(tmp_path) -> None:
    rt = Runtime(load_config({}, environ={}), app=None, runtime_dir=str(tmp_path), ledger=None,  # type: ignore[arg-type]
                 redis_url=None)
    parent_handle = rt.local("thing", object)
    parent_stats = rt.stats
    assert rt.local("thing", object) is parent_handle and not rt.in_pool_process

    def child_sees_its_own() -> bool:
        mine = rt.local("thing", object)
        return (mine is not parent_handle and rt.local("thing", object) is mine
                and rt.stats is not parent_stats and rt.in_pool_process)

    assert in_forked_child(child_sees_its_own) == 0
    assert rt.local("thing", object) is parent_handle and rt.stats is parent_stats


def test_a_forked_child_locks_the_ledger_through_its_own_descriptor(tmp_path) -> None:
    ledger = Ledger(str(tmp_path), create=True)
    with ledger.locked():  # the parent opened its descriptor and holds the lock across the fork

        def child_is_shut_out() -> bool:
            try:
                fcntl.flock(ledger.locked().fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # it shared the parent's lock: no exclusion between the two

        assert in_forked_child(child_is_shut_out) == 0
    with ledger.locked():  # and the parent's lock still works after the child closed its copy
        pass


def test_own_rss_follows_the_process_across_a_fork() -> None:
    before = own_rss_bytes()
    block = bytearray(64 * 1024 * 1024)  # zero-filled by Python: every page touched
    assert own_rss_bytes() - before > 48 * 1024 * 1024
    del block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must read its own statm, not the parent's through an inherited descriptor
        start = own_rss_bytes()
        grown = bytearray(64 * 1024 * 1024)
        os.write(write, str(own_rss_bytes() - start > 48 * 1024 * 1024).encode())
        del grown
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"True"
