"""The session root's removal lock, ``.rmq/lock``, which a forked child never keeps.

A ``flock`` belongs to the open file, and a fork copies descriptors. A pool process forked while the
worker's cleanup thread holds the lock would hold it too without knowing it: the lock would outlive
the thread's release for as long as the child lives, and the child would wait on itself the first
time it took the lock. So this module records every descriptor that holds the lock, and a forked
child closes its copies at once; the parent keeps its lock, since closing one copy of an open file
releases nothing while another is open. The fork hook is registered on first use: importing this
module does nothing.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["hold_root_lock"]

# Descriptors holding a root lock in this process; a forked child closes its copies.
_lock_fds: set[int] = set()
_lock_fds_guard = threading.Lock()
_fork_hooked = False


@contextmanager
def hold_root_lock(state_fd: int) -> Iterator[None]:
    """Hold the exclusive lock on the file ``lock`` in the directory ``state_fd`` (blocking)."""
    fd = _open_lock_fd(state_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _close_lock_fd(fd)


def _open_lock_fd(state_fd: int) -> int:
    global _fork_hooked
    with _lock_fds_guard:
        if not _fork_hooked:  # registered on first use: nothing happens on import
            os.register_at_fork(
                before=_lock_fds_guard.acquire,
                after_in_parent=_lock_fds_guard.release,
                after_in_child=_drop_inherited_locks,
            )
            _fork_hooked = True
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=state_fd)
        _lock_fds.add(fd)
    return fd


def _close_lock_fd(fd: int) -> None:
    with _lock_fds_guard:  # a fork between close and discard would close a reused number
        _lock_fds.discard(fd)
        os.close(fd)


def _drop_inherited_locks() -> None:
    for fd in _lock_fds:
        try:
            os.close(fd)  # the parent's lock stays: flock is per open file, we drop one reference
        except OSError:
            pass
    _lock_fds.clear()
    _lock_fds_guard.release()  # acquired by the forking thread in ``before``
