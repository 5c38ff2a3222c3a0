"""Memory cgroups for tests and benchmarks: a child of this process's own memory cgroup.

cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``) are both handled. Creating one
needs root and a writable hierarchy; :func:`can_create` says why not where it can't.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
import uuid
from pathlib import Path

import psutil

from rmq.memory.probes import CgroupMemory, HostProbe

__all__ = ["MemoryCgroup", "can_create"]

log = logging.getLogger("rmq.testing.cgroups")


class MemoryCgroup:
    """A child memory cgroup with a limit; processes join it through :meth:`wrap`."""

    def __init__(self, limit_bytes: int, name: str | None = None) -> None:
        parent = HostProbe().memory_cgroup()
        if parent is None:
            raise OSError("this process is in no memory cgroup hierarchy")
        self.version = parent.version
        self.path = parent.path / (name or f"rmq-test-{uuid.uuid4().hex[:8]}")
        self.path.mkdir()
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            try:  # no swap escape hatch
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
            except OSError:
                pass
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass
        self.limit_bytes = limit_bytes
        #: what :meth:`remove` found still inside after its grace and ended (:meth:`describe`), else ""
        self.ended_at_removal = ""

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self) -> list[str]:
        """An argv prefix that moves the process into this cgroup, then execs the rest."""
        return ["sh", "-c", f"echo $$ > {shlex.quote(str(self.procs_file))} && exec \"$@\"", "sh"]

    def cgroup_memory(self) -> CgroupMemory:
        """This cgroup as :class:`~rmq.memory.probes` describes one (version, path, limit)."""
        return CgroupMemory(self.version, self.path, self.limit_bytes)

    def oom_kills(self) -> int:
        """Kernel OOM kills inside this cgroup so far."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def peak_bytes(self) -> int | None:
        """The cgroup's peak usage where the kernel keeps one."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def usage_bytes(self) -> int | None:
        """The cgroup's usage now, page cache included (v1 ``memory.usage_in_bytes``, v2 ``memory.current``)."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def working_set_bytes(self) -> int | None:
        """Usage minus inactive file cache, as rmq's own probe reads it."""
        return CgroupMemory(self.version, self.path, self.limit_bytes).working_set_bytes()

    def reset_peak(self) -> bool:
        """Restart the kernel's peak from the usage now; False where the kernel cannot (v2 before 6.12)."""
        try:
            if self.version == 1:
                (self.path / "memory.max_usage_in_bytes").write_text("0")
            else:
                (self.path / "memory.peak").write_text("reset")
            return True
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The processes in the cgroup now."""
        try:
            return [int(line) for line in self.procs_file.read_text().split()]
        except (OSError, ValueError):
            return []

    def all_pids(self) -> list[int]:
        """The processes in this cgroup and in the cgroups made inside it (a worker's pool cgroups)."""
        pids: list[int] = []
        for procs in self.path.rglob("cgroup.procs"):
            try:
                pids += [int(line) for line in procs.read_text().split()]
            except (OSError, ValueError):
                pass
        return pids

    def remove(self, timeout: float = 20.0, grace: float = 5.0) -> bool:
        """Remove the cgroup, and the cgroups a worker made in it (those of a worker killed before it
        could sweep its own), once their processes are gone; True when it is gone (else a warning says
        what keeps it).

        A process still inside after ``grace`` seconds (a pool process or a task's subprocess that
        its stopped worker left behind) is sent SIGKILL by pid, read from the cgroup's own lists:
        only what :meth:`wrap` started, and its descendants, ever runs in a cgroup of this class.
        What was ended is kept in :attr:`ended_at_removal` (a test may report it)."""
        start = time.monotonic()
        while True:
            try:
                for child in sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    child.rmdir()  # deepest first
                self.path.rmdir()
                return True
            except OSError:  # busy, or a cgroup inside went meanwhile
                if not self.path.exists():
                    return True
            waited = time.monotonic() - start
            if waited > timeout:
                log.warning("%s left behind after %.0f s: %s", self.path, waited, self.describe())
                return False
            if waited >= grace:
                if not self.ended_at_removal:
                    self.ended_at_removal = self.describe()
                for pid in self.all_pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.1)

    def describe(self) -> str:
        """What keeps the cgroup: its processes (pid and command line) and the cgroups inside it."""
        procs = []
        for pid in self.all_pids():
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                cmd = "?"
            procs.append(f"{pid} {cmd[:120]!r}")
        inside = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_dir()]
        return f"processes {procs or 'none'}, cgroups inside {inside or 'none'}"


def can_create() -> str | None:
    """``None`` when a child memory cgroup can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "creating memory cgroups needs root"
    try:
        cg = MemoryCgroup(256 * 1024 * 1024)
    except OSError as exc:
        return f"cannot create a memory cgroup here: {exc}"
    cg.remove()
    return None
