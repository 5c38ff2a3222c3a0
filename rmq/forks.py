"""This process's pid, kept current across forks without a system call per read.

``os.getpid()`` is a system call on current glibc. The per-process handles (Redis clients,
descriptors, caches, counters) compare pids several times per task to notice that a fork
handed them down from the parent; :func:`pid` reads a module global instead, which an
``os.register_at_fork`` hook renews in every child forked with ``os.fork`` (billiard's
prefork pool, multiprocessing's fork start method).
"""

from __future__ import annotations

import os

__all__ = ["pid"]

_pid = os.getpid()


def _renew() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew)


def pid() -> int:
    """This process's pid."""
    return _pid
