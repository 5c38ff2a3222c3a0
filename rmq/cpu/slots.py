"""The CPU slots of a worker: how many CPUs its tasks may keep busy together.

:func:`detect_cpu_slots` reads the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, the tightest along the cgroup's ancestors), else the CPUs this process may run
on. Readings come through a :class:`CpuProbe`, so tests point it at a fake ``/proc`` + ``/sys`` tree.
Tasks reserve slots with ``cpu=N``; admission checks them against the ledger (docs/design.md#cpu).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuProbe", "affinity_count", "detect_cpu_slots"]

_OCTAL = re.compile(r"\\([0-7]{3})")


def affinity_count() -> int:
    """How many CPUs this process may run on."""
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
    cpu_count: Callable[[], int] = field(default=affinity_count)

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
