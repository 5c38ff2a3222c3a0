"""The worker's main process keeps its heap shared with the pool processes it forks.

Celery's prefork pool runs a full ``gc.collect()`` in the main process before each fork
(``AsynPool._create_worker_process``). A full collection writes to the header of every object the
collector tracks, so it copies, page by page, every heap page still shared with the pool processes
forked earlier: the copy is charged to the main process, and the original stays alive (and charged)
for the children that still map it. Each fork thus adds another copy of the main process's heap to what the worker
holds outside its pools. Measured on a 768 MiB worker with 6 pool processes
(``tests/integration/test_kernel_accounting.py``'s app): 205 MiB outside the pools' cgroups, and
up to 21 MiB more within 30 ms of a pool process being replaced, close to the 24 MiB rmq then kept
between its kill line and the kernel's limit.

``gc.freeze()`` right before each fork (after Celery's collection, so nothing collectable is frozen)
moves every object the main process has into the collector's permanent generation, which later
collections skip: the pages stay shared. The same run held 85 MiB outside the pools, growing at most
3 MiB within 30 ms of a replacement. Each child also inherits the frozen generation, so its own
collections leave the inherited pages shared too.

The price: an object frozen while alive that later becomes part of a garbage cycle is not collected.
Once every ``thaw_every_s`` the main process unfreezes and collects everything before the fork,
which copies its heap once more (one fork's worth) and bounds what stays uncollected.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

__all__ = ["keep_heap_shared", "SharedHeap"]

#: how often, at most, the main process unfreezes its heap and collects all of it before a fork
THAW_EVERY_S = 3600.0


class SharedHeap:
    """Freezes ``parent_pid``'s heap before each of its forks; see the module docstring."""

    def __init__(self, parent_pid: int, thaw_every_s: float = THAW_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if thaw_every_s <= 0:
            raise ValueError(f"thaw_every_s must be > 0, got {thaw_every_s!r}")
        self.parent_pid = parent_pid
        self.thaw_every_s = thaw_every_s
        self.clock = clock
        self.thawed_at = clock()
        self.forks = 0
        self.thaws = 0

    def before_fork(self) -> None:
        # a process forked by a pool process (a task's subprocess) is none of the main process's
        if os.getpid() != self.parent_pid:
            return
        now = self.clock()
        if now - self.thawed_at >= self.thaw_every_s:
            gc.unfreeze()
            gc.collect()
            self.thawed_at = now
            self.thaws += 1
        gc.freeze()
        self.forks += 1


def keep_heap_shared(parent_pid: int, thaw_every_s: float = THAW_EVERY_S) -> SharedHeap:
    """Freeze the heap of ``parent_pid`` (the worker's main process) before each of its forks from now on."""
    heap = SharedHeap(parent_pid, thaw_every_s)
    os.register_at_fork(before=heap.before_fork)
    return heap
