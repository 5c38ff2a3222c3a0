"""CPU slots and native thread caps (SPEC C4).

- :func:`detect_cpu_slots` reads the CPUs a worker may use: the cgroup CPU quota (v2 ``cpu.max``,
  v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the tightest along the cgroup's ancestors),
  else the CPUs this process may run on.
- :class:`ThreadCaps` caps BLAS/OpenMP pools (threadpoolctl), torch, and the thread-count
  environment variables of subprocesses to a task's slots while it runs.
- :class:`ThreadCapGuard` applies the caps around a governed task and records its CPU seconds.

CPU slot admission itself is the ledger's job.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rmq.core import runtime
from rmq.concern import Concern, TaskContext

__all__ = ["THREAD_ENV_VARS", "CpuProbe", "ThreadCapGuard", "ThreadCaps", "default_threads", "detect_cpu_slots"]

#: environment variables that size the thread pools of subprocesses a task starts
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
log = logging.getLogger(__name__)
_OCTAL = re.compile(r"\\([0-7]{3})")


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuProbe:
    """Where CPU readings come from; tests point ``root`` at a fake ``/proc`` + ``/sys`` tree.

    Attributes:
        root: directory that stands for ``/``.
        cpu_count: how many CPUs this process may run on.
    """

    root: Path | str = Path("/")
    cpu_count: Callable[[], int] = field(default=_affinity_count)

    def read(self, path: str | Path) -> str | None:
        """Text of an absolute path under ``root``, or ``None`` when unreadable."""
        try:
            return self.host(path).read_text()
        except OSError:
            return None

    def host(self, path: str | Path) -> Path:
        """An absolute path under ``root``."""
        return Path(self.root) / str(path).lstrip("/")


def _unescape(field_: str) -> str:
    """mountinfo writes spaces and the like as octal escapes (``\\040``)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_)


def _mounts(probe: CpuProbe) -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount in mountinfo."""
    out = []
    for line in (probe.read("/proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields_, tail = left.split(), right.split()
        if not sep or len(fields_) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        out.append((_unescape(fields_[3]), _unescape(fields_[4]), tail[0], set(tail[2].split(","))))
    return out


def _holds_cpu(version: int, fstype: str, options: set[str]) -> bool:
    return fstype == "cgroup2" if version == 2 else (fstype == "cgroup" and "cpu" in options)


def _cgroup_dirs(probe: CpuProbe, version: int) -> tuple[Path, Path] | None:
    """(the process's cgroup directory, its mount point) in the hierarchy holding the cpu controller."""
    own: str | None = None
    for line in (probe.read("/proc/self/cgroup") or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        v2 = hid == "0" and controllers == ""
        if (version == 2 and v2) or (version == 1 and "cpu" in controllers.split(",")):
            own = path
    mounts = [(root, point) for root, point, fstype, opts in _mounts(probe) if _holds_cpu(version, fstype, opts)]
    if not mounts:  # no mountinfo: the usual places
        usual = ["/sys/fs/cgroup"] if version == 2 else ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"]
        mounts = [("/", p) for p in usual if probe.host(p).is_dir()][:1]
    if own is None or not mounts:
        return None
    mount_root, point = mounts[0]
    mount = probe.host(point)
    # Without a cgroup namespace the path is the host's: strip the part the mount hides.
    if mount_root == "/":
        rel = own
    elif own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
        rel = own[len(mount_root):]
    else:
        rel = ""
    leaf = mount / rel.lstrip("/")
    return (leaf if leaf.is_dir() else mount), mount


def _quota(probe: CpuProbe, version: int) -> float | None:
    """The tightest CPU quota (in CPUs) from the cgroup up to its mount, or ``None``."""
    dirs = _cgroup_dirs(probe, version)
    if dirs is None:
        return None
    leaf, mount = dirs
    best: float | None = None
    for directory in [leaf, *leaf.parents]:
        if not directory.is_relative_to(mount):
            break
        try:
            if version == 2:
                quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
                cpus = None if quota == "max" else int(quota) / int(period or 100000)
            else:
                q = int((directory / "cpu.cfs_quota_us").read_text())
                cpus = q / int((directory / "cpu.cfs_period_us").read_text()) if q > 0 else None
        except (OSError, ValueError, ZeroDivisionError):
            cpus = None
        if cpus is not None and cpus > 0:
            best = cpus if best is None else min(best, cpus)
        if directory == mount:
            break
    return best


def detect_cpu_slots(probe: CpuProbe | None = None) -> tuple[int, str]:
    """CPU slots of this worker and where the figure came from.

    The cgroup quota is rounded up (1.5 CPUs of quota is 2 slots) and never exceeds the CPUs
    the process may run on.

    Returns:
        ``(slots, source)`` with source ``"cgroup-v2"``, ``"cgroup-v1"`` or ``"affinity"``.
    """
    probe = probe or CpuProbe()
    cpus = max(1, probe.cpu_count())
    for version in (2, 1):
        quota = _quota(probe, version)
        if quota is not None:
            slots = max(1, math.ceil(quota - 1e-9))
            if slots <= cpus:
                return slots, f"cgroup-v{version}"
            break
    return cpus, "affinity"


# Variables each library reads once, when it is loaded, to size its pool (first set one wins);
# without any, BLIS runs one thread and the others one per CPU.
_LOAD_VARS = {
    "openblas": ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
    "mkl": ("MKL_NUM_THREADS", "OMP_NUM_THREADS"),
    "blis": ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"),
    "flexiblas": ("FLEXIBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
    "openmp": ("OMP_NUM_THREADS",),
    "torch": ("OMP_NUM_THREADS",),
}


def default_threads(library: str, environ: Any = os.environ, cpu_count: Callable[[], int] = _affinity_count) -> int:
    """The threads ``library`` (a threadpoolctl ``internal_api``, or ``"torch"``) starts with in ``environ``."""
    for name in _LOAD_VARS.get(library, ("OMP_NUM_THREADS",)):
        head = (environ.get(name) or "").split(",")[0].strip()
        if head.isdigit() and int(head) > 0:
            return int(head)
    return 1 if library == "blis" else max(1, cpu_count())


class ThreadCaps:
    """Caps native thread pools to ``n`` threads while the block runs, then restores them.

    Covers BLAS/OpenMP libraries loaded in the process (threadpoolctl), torch when it is already
    imported, and :data:`THREAD_ENV_VARS` for subprocesses. The environment is process-wide:
    meant for the prefork pool, where a process runs one task at a time.

    A library first loaded inside the block sized its pool from the capped variables; on exit it
    is set to what it would have started with outside the block (:func:`default_threads`).
    """

    def __init__(self, n: int, cpu_count: Callable[[], int] = _affinity_count) -> None:
        if n < 1:
            raise ValueError(f"thread cap must be >= 1, got {n}")
        self.n = n
        self.cpu_count = cpu_count
        self._env: dict[str, str | None] = {}
        self._limits: Any = None
        self._known: set[str] | None = None
        self._modules = 0
        self._torch_threads: int | None = None

    def __enter__(self) -> Self:
        self._env = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
        os.environ.update({name: str(self.n) for name in THREAD_ENV_VARS})
        self._modules = len(sys.modules)
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController()
            self._known = {lib.filepath for lib in controller.lib_controllers}
            self._limits = controller.limit(limits=self.n)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:  # a cap never fails the task
            log.warning("rmq: could not cap native thread pools to %d: %s", self.n, exc)
        torch = sys.modules.get("torch")
        self._torch_threads = None
        if torch is not None:
            try:
                self._torch_threads = torch.get_num_threads()
                torch.set_num_threads(self.n)
            except (RuntimeError, ValueError) as exc:
                log.warning("rmq: could not cap torch threads to %d: %s", self.n, exc)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env = {}
        torch = sys.modules.get("torch")
        if torch is not None:
            threads = self._torch_threads or default_threads("torch", os.environ, self.cpu_count)
            try:
                torch.set_num_threads(threads)
            except (RuntimeError, ValueError) as err:
                log.warning("rmq: could not restore torch threads to %d: %s", threads, err)
        self._torch_threads = None
        if self._limits is not None:
            self._limits.restore_original_limits()
            self._limits = None
        if self._known is not None and len(sys.modules) != self._modules:
            self._reset_new_libraries(self._known)  # an import may have loaded a native pool
        self._known = None

    def _reset_new_libraries(self, known: set[str]) -> None:
        try:
            from threadpoolctl import ThreadpoolController

            for lib in ThreadpoolController().lib_controllers:
                if lib.filepath not in known:
                    lib.set_num_threads(default_threads(lib.internal_api, os.environ, self.cpu_count))
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            log.warning("rmq: could not reset thread pools loaded under a cap of %d: %s", self.n, exc)


def _cpu_seconds() -> float:
    """CPU time of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ThreadCapGuard(Concern):
    """Caps a task's native threads to its ``cpu=`` slots and records the CPU seconds it used.

    Counters: ``cpu.task_seconds`` (all tasks) and ``cpu.by_task.<task name>``.
    """

    name = "thread_caps"

    def __init__(self, clock: Callable[[], float] = _cpu_seconds) -> None:
        self.clock = clock

    def applies(self, declaration: Any) -> bool:
        return declaration.cpu_slots > 0

    def enter(self, ctx: TaskContext) -> None:
        caps = ThreadCaps(ctx.declaration.cpu_slots)
        caps.__enter__()
        ctx.state[self.name] = (caps, self.clock(), time.monotonic())

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        entry = ctx.state.pop(self.name, None)
        if entry is None:
            return
        caps, cpu_start, wall_start = entry
        caps.__exit__(None, None, None)
        used = max(0.0, self.clock() - cpu_start)
        ctx.state["cpu_seconds"] = used
        ctx.state["wall_seconds"] = time.monotonic() - wall_start
        rt = ctx.runtime or runtime.current()
        if rt is not None:
            rt.stats.incr("cpu", "task_seconds", n=used)
            rt.stats.incr("cpu", "by_task", ctx.task_name, n=used)
