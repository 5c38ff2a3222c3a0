"""This process's resident set size, cheaply enough to read several times per task.

Opening ``/proc/self/statm`` costs about 40 us; re-reading a descriptor kept open with
``os.pread`` costs about 2 us. ``/proc/self`` is resolved when the file is opened, so a forked
child must not reuse its parent's descriptor: the descriptor is re-opened whenever the pid changes.
"""

from __future__ import annotations

import os

from . import forks

__all__ = ["own_rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm_pid = -1
_statm_fd = -1


def _reopen(pid: int) -> int:
    # No lock (a lock held at fork time would deadlock the child): two threads racing here at most
    # open one descriptor too many. An inherited descriptor belongs to the parent's /proc entry.
    global _statm_pid, _statm_fd
    _statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    _statm_pid = pid
    return _statm_fd


def own_rss_bytes() -> int:
    """This process's RSS in bytes (``/proc/self/statm``; psutil where there is no ``/proc``)."""
    try:
        pid = forks.pid()
        fd = _statm_fd if _statm_pid == pid else _reopen(pid)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil

        return int(psutil.Process().memory_info().rss)
