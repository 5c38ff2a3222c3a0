"""Memory of a worker's process tree, without counting copy-on-write pages once per child.

Forked pool children share the parent's pages until they write them; RSS counts those
pages in every child. The main process is counted at RSS; each pool process, and each of its
descendants (a subprocess a task runs, a forked helper), at RSS minus its shared part, where
the shared part (RSS - USS) is refreshed every ``uss_interval_s`` (USS reads ``smaps_rollup``,
about 1 ms a process) and RSS, which costs one ``pread`` on a kept descriptor, every tick.
Descendants are found by :class:`~rmq.memory.proctree.TreeTracker` (docs/design.md#task-trees).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rmq.memory.proctree import ProcFS, TreeTracker

__all__ = ["TreeReading", "ProcessTreeMeter"]


@dataclass
class TreeReading:
    """One sample.

    Attributes:
        worker_bytes: the whole worker: main process, pool processes' trees, strays.
        main_bytes: the main process's RSS.
        children: pool pid -> private bytes of its whole tree (itself and its descendants).
        rss: pid -> RSS, for the main process and the pool processes themselves.
        descendants: pool pid -> {descendant pid: private bytes}, for pool processes that have any.
        strays: live processes under the main process owned by no live pool process: pid ->
            private bytes (their former owner is in ``stray_owner``, 0 when unknown).
        stray_owner: stray pid -> the pool pid it came from, 0 when unknown.
        zombies: ended descendants reparented to the main process, for it to reap.
    """

    worker_bytes: int
    main_bytes: int
    children: dict[int, int] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)
    descendants: dict[int, dict[int, int]] = field(default_factory=dict)
    strays: dict[int, int] = field(default_factory=dict)
    stray_owner: dict[int, int] = field(default_factory=dict)
    zombies: list[int] = field(default_factory=list)

    def tree_bytes(self, pid: int) -> int:
        """What ``pid``'s descendants hold (0 for a pool process without any)."""
        return sum(self.descendants.get(pid, {}).values())


class ProcessTreeMeter:
    """Samples a main process, the pool children it is told about, and their descendants."""

    def __init__(
        self,
        main_pid: int,
        uss_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        proc_root: str | os.PathLike[str] = "/",
    ) -> None:
        self.main_pid = main_pid
        self.uss_interval_s = uss_interval_s
        self.clock = clock
        self.fs = ProcFS(proc_root)
        self.tracker = TreeTracker(self.fs, main_pid)
        self._shared: dict[int, int] = {}
        self._shared_at: dict[int, float] = {}
        #: more members of a pool process's tree, where the kernel keeps the list (its cgroup)
        self.extra_members: Callable[[int], list[int]] = lambda pool_pid: []

    def _private(self, pid: int, now: float) -> tuple[int, int] | None:
        """``(rss, private)`` of ``pid`` now, or ``None`` when it is gone."""
        if now - self._shared_at.get(pid, float("-inf")) >= self.uss_interval_s:
            full = self.fs.private(pid)
            if full is None:
                return None
            self._shared[pid] = max(0, full[0] - full[1])
            self._shared_at[pid] = now
        rss = self.fs.rss(pid)
        if rss is None:
            return None
        return rss, max(0, rss - self._shared.get(pid, 0))

    def sample(self, child_pids: Iterable[int]) -> TreeReading:
        """Read the tree now. Processes that vanished are skipped."""
        now = self.clock()
        pools = [p for p in dict.fromkeys(child_pids) if p != self.main_pid]
        trees = self.tracker.scan(pools)
        main_rss = self.fs.rss(self.main_pid) or 0
        reading = TreeReading(worker_bytes=main_rss, main_bytes=main_rss)
        reading.rss[self.main_pid] = main_rss
        live = {self.main_pid}
        for pid in pools:
            own = self._private(pid, now)
            if own is None:
                continue
            live.add(pid)
            tree: dict[int, int] = {}
            for member in trees.members.get(pid, ()):
                got = self._private(member, now)
                if got is not None:
                    tree[member] = got[1]
                    live.add(member)
            reading.rss[pid] = own[0]
            reading.children[pid] = own[1] + sum(tree.values())
            if tree:
                reading.descendants[pid] = tree
            reading.worker_bytes += reading.children[pid]
        for pid, owner in trees.strays.items():
            got = self._private(pid, now)
            if got is not None:
                live.add(pid)
                reading.strays[pid] = got[1]
                reading.stray_owner[pid] = owner
                reading.worker_bytes += got[1]
        reading.zombies = trees.zombies
        for gone in (self.fs.kept() | set(self._shared_at)) - live:
            self.fs.forget(gone)
            self._shared.pop(gone, None)
            self._shared_at.pop(gone, None)
        return reading

    def tree_now(self, pool_pid: int) -> list[int]:
        """``pool_pid``'s descendants, read again now (see :meth:`TreeTracker.tree_now`), with the
        processes of its cgroup under kernel accounting."""
        found = self.tracker.tree_now(pool_pid)
        more = [p for p in self.extra_members(pool_pid) if p != pool_pid and p not in found]
        return found + more
