"""This process's resident set size, cheaply enough to read several times per task, and its peak.

Opening ``/proc/self/statm`` costs about 40 us; re-reading a descriptor kept open with
``os.pread`` costs about 2 us. ``/proc/self`` is resolved when the file is opened, so a forked
child must not reuse its parent's descriptor: the child closes it right after the fork and opens
its own on first use.
"""

from __future__ import annotations

import os

__all__ = ["own_rss_bytes", "peak_rss_bytes", "reset_peak_rss"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm_fd = -1


def _open() -> int:
    # No lock (a lock held at fork time would deadlock the child): two threads racing here at most
    # open one descriptor too many.
    global _statm_fd
    _statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    return _statm_fd


def _forget_inherited() -> None:
    global _statm_fd
    if _statm_fd >= 0:
        try:
            os.close(_statm_fd)  # the parent's /proc entry
        except OSError:
            pass
        _statm_fd = -1


os.register_at_fork(after_in_child=_forget_inherited)


def own_rss_bytes() -> int:
    """This process's RSS in bytes (``/proc/self/statm``; psutil where there is no ``/proc``)."""
    try:
        fd = _statm_fd if _statm_fd >= 0 else _open()
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Start a new peak: the kernel's high-water mark of this process's RSS (``VmHWM``) is set to
    its RSS now (``5`` written to ``/proc/self/clear_refs``, Linux 4.0+). False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's RSS high-water mark (``VmHWM``, since the last :func:`reset_peak_rss`), or None."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None
