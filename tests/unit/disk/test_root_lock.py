"""The root's removal lock across fork: a child neither keeps the parent's lock nor releases it."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from rmq.disk.session_root import SessionRoot


def test_a_child_forked_while_another_thread_holds_the_root_lock_does_not_keep_it(tmp_path):
    # The worker's cleanup thread holds the lock while the main thread forks a pool process:
    # the child must neither keep the lock nor deadlock when it takes the lock itself.
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with SessionRoot(tmp_path, create=True) as sr, sr.lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: take the lock once the parent lets go, then exit 0
        try:
            with SessionRoot(tmp_path) as sr, sr.lock():
                pass
            os._exit(0)
        except BaseException:
            os._exit(1)
    try:
        release.set()
        thread.join(10)
        deadline = time.monotonic() + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "the forked child deadlocked on the root lock"
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
        # and this process can take the lock again
        with SessionRoot(tmp_path) as sr, sr.lock():
            pass
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_child_forked_while_holding_the_lock_releases_nothing_of_the_parent(tmp_path):
    with SessionRoot(tmp_path, create=True) as sr, sr.lock():
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # closing the child's copy must not unlock the parent
        os.waitpid(pid, 0)
        fd = os.open(tmp_path / ".rmq" / "lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
