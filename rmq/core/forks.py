"""What a forked child must not reuse from its parent, noticed once at the fork.

Per-process handles (Redis clients, descriptors, caches, counters) must be made again in a
child forked from the process that made them. Checking ``os.getpid()`` on every use costs a
system call each time, several times per task; instead, an ``os.register_at_fork`` hook
(run by ``os.fork``, hence by billiard's prefork pool and multiprocessing's fork start method)
renews :func:`pid` and calls ``_forget_inherited()`` on every registered object in the child.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["pid", "forget_in_children", "Inheritable"]

_pid = os.getpid()


class Inheritable(Protocol):
    def _forget_inherited(self) -> None:
        """Drop what was inherited from the parent (runs in the child, right after the fork)."""


_registered: weakref.WeakSet[Inheritable] = weakref.WeakSet()


def forget_in_children(obj: Inheritable) -> None:
    """Call ``obj._forget_inherited()`` in every child forked from now on (``obj`` is held weakly)."""
    _registered.add(obj)


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    for obj in list(_registered):
        obj._forget_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def pid() -> int:
    """This process's pid, without a system call."""
    return _pid
