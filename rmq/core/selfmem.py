"""This process's resident set size, cheaply enough to read several times per task, and its peak.

Opening a file of ``/proc/self`` costs about 40 us (5-10 us hot, more in a busy pool process); a
descriptor kept open and re-read with ``os.pread`` (``statm`` about 1 us, ``status`` about 3 us hot,
12 us in a busy pool process) or written with ``os.write`` (``clear_refs``, under 1 us) costs a
system call. Each read at offset 0 makes the kernel generate the file again. ``/proc/self`` is
resolved when the file is opened, so a forked child must not reuse its parent's descriptors: the
child closes them right after the fork and opens its own on first use.

The peak: in a process forked from this interpreter (a pool process), ``getrusage``'s
``ru_maxrss`` (0.3 us) is the kernel's high-water mark of this process's RSS, which
``clear_refs`` resets, as ``VmHWM`` is: the kernel takes the larger of the two with the
process's ``signal->maxrss``, which starts at 0 in a forked child and changes only at an
``exec`` or when the last thread exits. ``ru_maxrss`` reads the RSS counters without summing
their per-CPU parts, so it can be up to about 200 KiB under ``VmHWM``. A process that was
``exec``'d (the worker's main process) keeps the image before the ``exec`` in ``signal->maxrss``
and reads ``VmHWM``.
"""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["own_rss_bytes", "peak_rss_bytes", "reset_peak_rss"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: path -> descriptor of this process (not of a parent it was forked from)
_fds: dict[str, int] = {}
_STATM, _STATUS, _CLEAR_REFS = "/proc/self/statm", "/proc/self/status", "/proc/self/clear_refs"
#: ``/proc/self/status`` is about 1.4 KiB; its ``VmHWM`` line is in the first half
_STATUS_READ = 8192


def _fd(path: str, flags: int) -> int:
    # No lock (a lock held at fork time would deadlock the child): two threads racing here at most
    # open one descriptor too many.
    fd = _fds.get(path, -1)
    if fd < 0:
        fd = os.open(path, flags | os.O_CLOEXEC)
        _fds[path] = fd
    return fd


#: this process was forked from this interpreter: ``ru_maxrss`` is its own peak (see above)
_forked = False
_RUSAGE_PEAK = sys.platform.startswith("linux")  # ru_maxrss in KiB, and clear_refs resets it


def _forget_inherited() -> None:
    global _forked
    _forked = True
    for fd in list(_fds.values()):
        try:
            os.close(fd)  # the parent's /proc entries
        except OSError:
            pass
    _fds.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def own_rss_bytes() -> int:
    """This process's RSS in bytes (``/proc/self/statm``; psutil where there is no ``/proc``)."""
    try:
        fd = _fds.get(_STATM, -1)  # _fd() inlined: read twice per governed task
        return int(os.pread(fd if fd >= 0 else _fd(_STATM, os.O_RDONLY), 128, 0).split()[1]) * _PAGE
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Start a new peak: the kernel's high-water mark of this process's RSS (``VmHWM``) is set to
    its RSS now (``5`` written to ``/proc/self/clear_refs``, Linux 4.0+). False where it cannot be."""
    try:
        fd = _fds.get(_CLEAR_REFS, -1)  # _fd() inlined: written once per governed task
        os.write(fd if fd >= 0 else _fd(_CLEAR_REFS, os.O_WRONLY), b"5")
        return True
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int | None:
    """This process's RSS high-water mark (``VmHWM``, since the last :func:`reset_peak_rss`), or None."""
    if _forked and _RUSAGE_PEAK:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        text = os.pread(_fd(_STATUS, os.O_RDONLY), _STATUS_READ, 0)
        at = text.index(b"VmHWM:")
        return int(text[at + 6:text.index(b"\n", at)].split()[0]) * 1024
    except (OSError, IndexError, ValueError, AttributeError):
        return None
