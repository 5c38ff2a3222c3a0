"""Kernel accounting: each pool process in a child memory cgroup of the worker's own
(docs/design.md#kernel-accounting).

The kernel then counts each task's whole tree exactly: the pool process, every subprocess it
starts (they inherit the cgroup, however they fork), and the page cache they dirty, with no
double counting of pages shared copy-on-write with the main process. The worker's cgroup keeps
its limit and charges its children hierarchically, so the worker's total is still one file.

The pool cgroups live in one cgroup of their own, ``rmq-<main>-pools``, whose limit leaves the
main process room under the worker's: when the pools together reach it, it is there that the
kernel holds them (the OOM killer held off, v1; ``memory.high``, v2) while the governor, in the
main process and so never held, chooses whom to kill.

cgroup v1 lets a cgroup hold processes and children at once. cgroup v2 forbids that ("no
internal processes"): the processes of the worker's cgroup move to a leaf (``rmq-<main>-main``)
before the memory controller is enabled for its children. Everything here reads and writes under
one directory, so unit tests run it on fake trees.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from rmq.memory.probes import (
    UNLIMITED,
    CgroupMemory,
    forget_cgroup_files,
    read_cgroup_file,
    working_set_of,
    write_cgroup_file,
)

__all__ = ["PoolCgroups", "Accounting", "choose_accounting"]

log = logging.getLogger("rmq.memory.pool_cgroups")


@dataclass(frozen=True)
class Accounting:
    """How the worker's memory is counted, and why.

    Attributes:
        mode: ``"cgroup-v1"``, ``"cgroup-v2"`` (a child cgroup per pool process) or ``"proc"``
            (process trees read from ``/proc``).
        reason: one sentence for ``inspect stats`` and ``rmq doctor``.
        pools: the pool cgroups in a kernel mode, else ``None``.
    """

    mode: str
    reason: str
    pools: PoolCgroups | None = None

    @property
    def kernel(self) -> bool:
        return self.pools is not None


class PoolCgroups:
    """The child memory cgroups of one worker's pool processes.

    Args:
        worker: the worker's memory cgroup (the one whose limit is the budget).
        main_pid: the worker's main process, which names the children so that two workers in one
            cgroup never share one.
    """

    def __init__(self, worker: CgroupMemory, main_pid: int) -> None:
        self.worker = worker
        self.version = worker.version
        self.main_pid = main_pid
        self.prefix = "pool-"
        #: the cgroup every pool cgroup lives in
        self.root = worker.path / f"rmq-{main_pid}-pools"
        self._peak_files: dict[int, int] = {}
        #: pool pid -> its cgroup's usage, stat and high-water mark files, as strings: a ``Path``
        #: join costs about 2.5 us, and these are read around every task
        self._files: dict[int, tuple[str, str, str]] = {}
        #: the process that :meth:`adopt` last moved, in this process's copy (a pool process asks
        #: whether it is in its cgroup before each task)
        self.adopted_pid = 0

    # setting up ---------------------------------------------------------
    def check(self) -> None:
        """What :meth:`prepare` needs, without changing anything (for ``rmq doctor``). Raises
        ``OSError`` with the reason."""
        path = self.worker.path
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "not writable by this user", str(path))
        if self.version == 2:
            if "memory" not in (path / "cgroup.controllers").read_text().split():
                raise OSError(f"the memory controller is not available in {path}")
            if not os.access(path / "cgroup.subtree_control", os.W_OK):
                raise PermissionError(13, "cgroup.subtree_control is not writable", str(path))

    def prepare(self) -> None:
        """Make the worker's cgroup able to hold pool cgroups (v2: move its processes to a leaf and
        enable the memory controller for children), after ending what dead workers left in it
        (:meth:`reclaim_dead_workers`). Raises ``OSError`` when the kernel refuses."""
        self.reclaim_dead_workers()
        if self.version == 2:
            controllers = (self.worker.path / "cgroup.controllers").read_text().split()
            if "memory" not in controllers:
                raise OSError(f"the memory controller is not available in {self.worker.path}")
            if "memory" not in (self.worker.path / "cgroup.subtree_control").read_text().split():
                leaf = self.worker.path / f"rmq-{self.main_pid}-main"
                leaf.mkdir(exist_ok=True)
                for pid in (self.worker.path / "cgroup.procs").read_text().split():
                    try:
                        (leaf / "cgroup.procs").write_text(pid)
                    except ProcessLookupError:
                        continue
                (self.worker.path / "cgroup.subtree_control").write_text("+memory")
        self.root.mkdir(exist_ok=True)
        if self.version == 2:
            (self.root / "cgroup.subtree_control").write_text("+memory")

    def reclaim_dead_workers(self, timeout_s: float = 2.0) -> dict[int, list[int]]:
        """End what workers that died in this cgroup left in their pool cgroups, and remove those.

        A worker killed outright (SIGKILL, a crash) cannot tidy up. Celery's pool processes die with
        it (their parent-death signal), but a subprocess a task started (an encoder) lives on in its
        pool cgroup, governed by nobody, holding memory the next worker's budget counts; on v1, at
        the pools' cap with the kernel's OOM killer held off, it waits there for ever. Its task is
        delivered again (``acks_late``), so the leftover is ended as a memory kill would have ended
        it: its hold released, every process SIGKILLed, the cgroups removed once empty (each waited
        for up to ``timeout_s``). A worker whose main process still runs in this cgroup (two
        workers may share one) is left alone, and so is what a dead v2 worker's ``rmq-<pid>-main``
        leaf holds (the processes it found in the cgroup: removed only when empty). Returns {dead
        main pid: pids killed}.
        """
        reclaimed: dict[int, list[int]] = {}
        try:
            names = sorted(os.listdir(self.worker.path))
        except OSError:
            return reclaimed
        living = self._processes_here()
        for name in names:
            found = re.fullmatch(r"rmq-(\d+)-(pools|main)", name)
            if found is None:
                continue
            dead_pid, dead = int(found[1]), self.worker.path / name
            if dead_pid == self.main_pid or dead_pid in living:
                continue
            if found[2] == "main":  # v2's leaf for the processes it found (a supervisor, say): never killed
                try:
                    dead.rmdir()
                except OSError:
                    pass
                continue
            if self.version == 1:
                try:  # a process at the cap then leaves the OOM wait on its own kill
                    (dead / "memory.oom_control").write_text("0")
                except OSError:
                    pass
            cgroups = sorted((p.parent for p in dead.rglob("cgroup.procs")), key=lambda p: -len(p.parts))
            killed = [pid for cg in cgroups for pid in _pids_of(cg)]
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = time.monotonic() + timeout_s
            for cg in cgroups:  # the deepest first: a cgroup is removed once its children are
                while _pids_of(cg) and time.monotonic() < deadline:
                    time.sleep(0.01)
                try:
                    forget_cgroup_files(cg)
                    cg.rmdir()
                except OSError as exc:
                    log.warning("rmq could not remove %s, left by dead worker pid %d: %s", cg, dead_pid, exc)
            reclaimed[dead_pid] = killed
            if killed:
                log.warning("rmq killed %d process(es) %s left in %s by dead worker pid %d", len(killed),
                            sorted(killed), dead, dead_pid)
        return reclaimed

    def _processes_here(self) -> set[int]:
        """Every process of the worker's cgroup and its children now."""
        return {pid for procs in self.worker.path.rglob("cgroup.procs") for pid in _pids_of(procs.parent)}

    @property
    def pools_cgroup(self) -> CgroupMemory:
        """The cgroup of all pool cgroups (where the kernel holds a burst, and wakes the governor)."""
        return CgroupMemory(self.version, self.root, self.pools_limit())

    def pools_limit(self) -> int | None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        try:
            text = read_cgroup_file(self.root / name).strip()
        except OSError:
            return None
        return None if text == "max" or int(text) >= UNLIMITED else int(text)

    def set_pools_limit(self, limit_bytes: int) -> bool:
        """Cap the pools together at ``limit_bytes`` (the worker's limit less the main process's
        share); ``False`` when the kernel refuses (under what they use now, say)."""
        if self.version == 2:
            files = ["memory.max"]
        else:  # v1 keeps memory+swap >= memory at every step: raise it first, lower it last
            current = self.pools_limit()  # None: unlimited, so this lowers it
            raising = current is not None and current < limit_bytes
            files = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
            files = files if raising else files[::-1]
        for name in files:
            try:
                (self.root / name).write_text(str(limit_bytes))
            except OSError as exc:
                if name == "memory.memsw.limit_in_bytes":  # no swap accounting here: nothing to hide in
                    continue
                log.debug("rmq could not cap the pools' cgroup at %d: %s", limit_bytes, exc)
                return False
        return True

    def path_for(self, pool_pid: int) -> Path:
        return self.root / f"{self.prefix}{pool_pid}"

    def adopt(self, pool_pid: int) -> None:
        """Move ``pool_pid`` into a fresh child cgroup of its own. Called by the pool process on
        start, before its first task, so that nothing a task allocates is charged elsewhere."""
        path = self.path_for(pool_pid)
        path.mkdir(exist_ok=True)
        if self.version == 2:
            try:  # the worker's limit stops the tree: none of its own, and no swap to hide in
                (path / "memory.swap.max").write_text("0")
            except OSError:
                pass
        (path / "cgroup.procs").write_text(str(pool_pid))
        self.adopted_pid = pool_pid

    def adopt_at_fork(self, parent_pid: int) -> None:
        """Have each process that ``parent_pid`` (the worker's main process) forks from now on move
        into its own cgroup at once, in the child, before it runs any of the pool's start-up.

        Pages are charged to the cgroup of the process that first touches them, and cgroups never
        move a charge later: a pool process that moved itself only on its first task left its
        start-up (about 6 MiB each, copied on write from the main process: 35 MiB for 6 processes)
        charged beside the main process, outside the pools' cap, where it came and went as the pool
        replaced processes and ate the room above the kill line. A process its pool process forks (a
        task's subprocess) stays in the pool's cgroup: only children of ``parent_pid`` move."""

        def _moved_in_child() -> None:
            if os.getppid() != parent_pid:
                return
            try:
                self.adopt(os.getpid())
            except OSError:  # the pool process tries again on start, and says why it could not
                pass

        os.register_at_fork(after_in_child=_moved_in_child)

    # readings -------------------------------------------------------------
    def _files_of(self, pool_pid: int) -> tuple[str, str, str]:
        files = self._files.get(pool_pid)
        if files is None:
            path = str(self.path_for(pool_pid))
            if self.version == 1:
                names = ("memory.usage_in_bytes", "memory.stat", "memory.max_usage_in_bytes")
            else:
                names = ("memory.current", "memory.stat", "memory.peak")
            files = self._files[pool_pid] = (f"{path}/{names[0]}", f"{path}/{names[1]}", f"{path}/{names[2]}")
        return files

    def usage(self, pool_pid: int) -> int | None:
        """The working set of ``pool_pid``'s whole tree as the kernel counts it, or ``None``."""
        usage, stat, _ = self._files_of(pool_pid)
        try:
            return working_set_of(read_cgroup_file(usage), read_cgroup_file(stat), self.version)
        except (OSError, ValueError):
            return None

    def members(self, pool_pid: int) -> list[int]:
        """Every live process of ``pool_pid``'s cgroup: its tree, double-forked ones included."""
        return _pids_of(self.path_for(pool_pid))

    def begin_task(self, pool_pid: int) -> tuple[int, int] | None:
        """Start a new high-water mark of the tree's usage before a task; returns the usage it
        starts from and the working set now (what the task's use is counted from), or ``None``.

        v1 resets ``memory.max_usage_in_bytes`` by writing 0; v2 (6.12 and later) resets
        ``memory.peak`` for the file descriptor it is written through, kept open for :meth:`peak`.
        Every file goes through a kept descriptor: a pool process does this before each task, and
        opening a cgroup file costs more than all the rest (docs/guarantees.md#p1).
        """
        usage, stat, peak = self._files_of(pool_pid)
        try:
            if self.version == 1:
                write_cgroup_file(peak, "0")
            else:
                fd = self._peak_files.get(pool_pid)
                if fd is None:
                    fd = self._peak_files[pool_pid] = os.open(peak, os.O_RDWR | os.O_CLOEXEC)
                try:
                    os.write(fd, b"reset\n")  # again through the same descriptor: a new mark for it
                except OSError:
                    del self._peak_files[pool_pid]
                    os.close(fd)
                    return None
            now = read_cgroup_file(usage)
            return int(now), working_set_of(now, read_cgroup_file(stat), self.version)
        except (OSError, ValueError):
            return None

    def peak(self, pool_pid: int) -> int | None:
        """The tree's high-water mark since :meth:`begin_task`, or ``None``."""
        try:
            if self.version == 1:
                return int(read_cgroup_file(self._files_of(pool_pid)[2]))
            fd = self._peak_files.get(pool_pid)
            if fd is None:
                return None
            return int(os.pread(fd, 64, 0).decode())
        except (OSError, ValueError):
            return None

    # tidying ----------------------------------------------------------------
    def existing(self) -> list[int]:
        """Pool pids that have a cgroup of this worker now."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        for name in names:
            if name.startswith(self.prefix) and name[len(self.prefix):].isdigit():
                out.append(int(name[len(self.prefix):]))
        return out

    def sweep(self, keep: set[int]) -> list[int]:
        """Remove the cgroups of pool processes not in ``keep`` whose processes are all gone."""
        removed = []
        for pid in self.existing():
            if pid in keep or self.members(pid):
                continue
            try:
                self._files.pop(pid, None)
                forget_cgroup_files(self.path_for(pid))
                self.path_for(pid).rmdir()
                removed.append(pid)
            except OSError as exc:
                log.debug("rmq could not remove %s yet: %s", self.path_for(pid), exc)
        return removed

    def remove(self) -> None:
        """Remove every pool cgroup whose processes are gone, then the pools' cgroup if empty."""
        self.sweep(set())
        try:
            forget_cgroup_files(self.root)
            self.root.rmdir()
        except OSError as exc:
            log.debug("rmq could not remove %s: %s", self.root, exc)


def _pids_of(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def choose_accounting(worker: CgroupMemory | None, main_pid: int, enabled: bool = True,
                      budget_from_cgroup: bool = True, dry_run: bool = False) -> Accounting:
    """Kernel accounting where the machine allows it, else ``/proc`` trees, with the reason.

    Args:
        worker: the worker's memory cgroup (``None``: not in one we can read).
        enabled: ``rmq_kernel_accounting``; off keeps ``/proc`` trees.
        budget_from_cgroup: whether that cgroup's limit is the budget. A cgroup without a limit is
            usually shared (a session, a whole machine), and its total would not be the worker's.
        dry_run: only check that it could (``rmq doctor``): nothing is created or moved.
    """
    if not enabled:
        return Accounting("proc", "kernel accounting is turned off (rmq_kernel_accounting)")
    if worker is None:
        return Accounting("proc", "the worker is in no memory cgroup rmq can read")
    if not budget_from_cgroup or worker.limit_bytes is None:
        return Accounting("proc", f"the worker's memory cgroup {worker.path} has no limit of its own "
                                  "(the budget comes from elsewhere)")
    pools = PoolCgroups(worker, main_pid)
    try:
        pools.check() if dry_run else pools.prepare()
    except OSError as exc:
        return Accounting("proc", f"cannot create pool cgroups in {worker.path} (cgroup v{worker.version}): "
                                  f"{exc.strerror or exc}")
    return Accounting(f"cgroup-v{worker.version}",
                      f"each pool process in its own child of {worker.path} (cgroup v{worker.version})", pools)
