"""A task's whole process tree: its pool process and every descendant (docs/design.md#task-trees).

Read under a ``/proc`` root, so unit tests point it at a fake tree. Descendants are found through
``/proc/<pid>/task/<tid>/children`` (one small read per thread, no scan of ``/proc``). A process that
leaves the tree by double-forking is reparented to the worker's main process, which is made a child
subreaper for that: it then shows among the main process's children, and keeps its owner because
the tracker saw it under the pool process before, or because it carries the pool process's
``_RMQ_TASK_TREE`` marker in the environment it was started with.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["TREE_ENV", "ProcFS", "ProcStat", "Trees", "TreeTracker", "set_child_subreaper"]

#: environment variable each pool process sets to its pid, so that what its tasks exec carries it
TREE_ENV = "_RMQ_TASK_TREE"

_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Make this process a child subreaper: orphans of its descendants come to it, not to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` the tracker needs."""

    state: str
    ppid: int
    start_ticks: int


class ProcFS:
    """Reads processes under ``root`` (``/`` normally). ``/proc/<pid>/statm`` descriptors are kept
    open, so a process's RSS costs one ``pread``; a kept descriptor of a dead process fails instead
    of reading a process that reused its pid."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.proc = os.path.join(os.fspath(root), "proc")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._statm: dict[int, int] = {}

    def _read(self, path: str, size: int = 65536) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.read(fd, size)
        except OSError:
            return None
        finally:
            os.close(fd)

    def children(self, pid: int) -> list[int]:
        """Direct children of ``pid``, over all its threads (a thread may have started one)."""
        base = f"{self.proc}/{pid}/task"
        try:
            tids = os.listdir(base)
        except OSError:
            return []
        found: list[int] = []
        for tid in tids:
            data = self._read(f"{base}/{tid}/children")
            if data:
                found.extend(int(x) for x in data.split())
        return found

    def stat(self, pid: int) -> ProcStat | None:
        """State, parent and start time (clock ticks since boot), or ``None`` when gone."""
        data = self._read(f"{self.proc}/{pid}/stat", 1024)
        if not data:
            return None
        fields = data[data.rfind(b")") + 2:].split()
        try:
            return ProcStat(fields[0].decode(), int(fields[1]), int(fields[19]))
        except (IndexError, ValueError):
            return None

    def rss(self, pid: int) -> int | None:
        """RSS in bytes, or ``None`` when the process is gone."""
        fd = self._statm.get(pid)
        try:
            if fd is None:
                fd = self._statm[pid] = os.open(f"{self.proc}/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(fd, 128, 0).split()[1]) * self.page
        except (OSError, IndexError, ValueError):
            self.forget(pid)
            return None

    def private(self, pid: int) -> tuple[int, int] | None:
        """``(rss, private)`` from ``smaps_rollup``: private pages are those no other process maps
        (USS). About 1 ms; the meter refreshes it every ``rmq_uss_interval``."""
        data = self._read(f"{self.proc}/{pid}/smaps_rollup")
        if data is None:
            return None
        rss = private = 0
        for line in data.splitlines():
            key, _, rest = line.partition(b":")
            if key == b"Rss":
                rss = int(rest.split()[0]) * 1024
            elif key in (b"Private_Clean", b"Private_Dirty", b"Private_Hugetlb"):
                private += int(rest.split()[0]) * 1024
        return rss, private

    def tree_marker(self, pid: int) -> int | None:
        """The pool pid in the ``_RMQ_TASK_TREE`` of the environment ``pid`` was exec'd with."""
        data = self._read(f"{self.proc}/{pid}/environ", 1 << 20)
        key = TREE_ENV.encode() + b"="
        for item in (data or b"").split(b"\0"):
            if item.startswith(key):
                try:
                    return int(item[len(key):])
                except ValueError:
                    return None
        return None

    def forget(self, pid: int) -> None:
        """Close what is kept open for ``pid``."""
        fd = self._statm.pop(pid, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def kept(self) -> set[int]:
        """Pids with a kept descriptor."""
        return set(self._statm)


@dataclass
class Trees:
    """One look at the worker's processes.

    Attributes:
        members: pool pid -> its live descendants (the pool process itself excluded).
        strays: live processes under the main process that belong to no live pool process: pid ->
            the pool pid they came from (a pool process that died or was killed), 0 when unknown.
        zombies: zombie children of the main process that are not pool processes (reparented
            descendants that ended); the main process must reap them.
    """

    members: dict[int, list[int]] = field(default_factory=dict)
    strays: dict[int, int] = field(default_factory=dict)
    zombies: list[int] = field(default_factory=list)


class TreeTracker:
    """Finds each pool process's descendants and remembers whose they are across reparenting."""

    def __init__(self, fs: ProcFS, main_pid: int) -> None:
        self.fs = fs
        self.main_pid = main_pid
        #: pid -> (owning pool pid, start ticks), as of the last scan
        self.owner: dict[int, tuple[int, int]] = {}
        self._pool_start: dict[int, int] = {}  # pool pid -> start ticks, kept after it ends
        self._pools: set[int] = set()
        self._marker: dict[int, tuple[int, int]] = {}  # pid -> (start ticks, marked owner or 0)

    def _walk(self, root: int, seen: set[int]) -> list[int]:
        found: list[int] = []
        stack = self.fs.children(root)
        while stack:
            pid = stack.pop()
            if pid in seen or pid == self.main_pid:
                continue
            seen.add(pid)
            found.append(pid)
            stack.extend(self.fs.children(pid))
        return found

    def _start(self, pid: int) -> int | None:
        st = self.fs.stat(pid)
        return st.start_ticks if st is not None else None

    def _owner_of(self, pid: int, start: int) -> int:
        known = self.owner.get(pid)
        if known is not None and known[1] == start:
            return known[0]
        cached = self._marker.get(pid)
        if cached is None or cached[0] != start:
            marked = self.fs.tree_marker(pid) or 0
            # the marker names a pool process that existed when this one started (pids are reused)
            if marked and not (marked in self._pool_start and self._pool_start[marked] <= start):
                marked = 0
            cached = self._marker[pid] = (start, marked)
        return cached[1]

    def scan(self, pool_pids: Iterable[int]) -> Trees:
        """Walk every pool process's tree and the main process's other children."""
        pools = [p for p in pool_pids if p != self.main_pid]
        for pid in pools:
            if pid not in self._pools:  # new, or a pid reused by a new pool process
                start = self._start(pid)
                if start is not None:
                    self._pool_start[pid] = start
        self._pools = set(pools)
        trees = Trees(members={p: [] for p in pools})
        seen: set[int] = set(pools)
        owner: dict[int, tuple[int, int]] = {}
        for pool in pools:
            for pid in self._walk(pool, seen):
                trees.members[pool].append(pid)
                known = self.owner.get(pid)
                start = known[1] if known is not None and known[0] == pool else self._start(pid)
                if start is not None:
                    owner[pid] = (pool, start)
        for child in self.fs.children(self.main_pid):
            if child in seen:
                continue
            st = self.fs.stat(child)
            if st is None:
                continue
            seen.add(child)
            if st.state == "Z":
                trees.zombies.append(child)
                continue
            root_owner = self._owner_of(child, st.start_ticks)
            for pid in [child, *self._walk(child, seen)]:
                known = self.owner.get(pid)
                start = st.start_ticks if pid == child else (known[1] if known else self._start(pid))
                if start is None:
                    continue
                who = known[0] if known is not None and known[1] == start else root_owner
                if who in trees.members:
                    trees.members[who].append(pid)
                else:
                    trees.strays[pid] = who
                if who:
                    owner[pid] = (who, start)
        self.owner = owner
        for pid in [p for p in self._marker if p not in seen]:
            del self._marker[pid]
        return trees

    def tree_now(self, pool_pid: int) -> list[int]:
        """``pool_pid``'s descendants read again now, with the processes the last scan gave it that
        were reparented since (for a kill: what to stop and end)."""
        seen = {pool_pid}
        found = self._walk(pool_pid, seen)
        for pid, (who, _) in self.owner.items():
            if who == pool_pid and pid not in seen:
                seen.add(pid)
                found.append(pid)
                found.extend(self._walk(pid, seen))
        return found
