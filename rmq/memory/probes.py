"""Readings of the machine: memory cgroups, physical RAM, process memory.

Everything reads through a :class:`HostProbe` rooted at a directory (``/`` normally), so
unit tests point it at a fake ``/proc`` and ``/sys`` tree instead of monkeypatching.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["CgroupMemory", "HostProbe", "UNLIMITED"]

#: cgroup v1 reports "no limit" as a huge page-aligned number; anything above this is unlimited
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The memory cgroup this process lives in.

    Attributes:
        version: 1 or 2.
        path: the cgroup's directory.
        limit_bytes: its memory limit, or ``None`` when unlimited.
    """

    version: int
    path: Path
    limit_bytes: int | None

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def usage_bytes(self) -> int | None:
        """What the kernel charges to the cgroup now, page cache included (what its limit caps)."""
        text = self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    def working_set_bytes(self) -> int | None:
        """Usage minus inactive file cache (the kubelet's formula), or ``None`` if unreadable."""
        usage = self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes")
        stat = self._read("memory.stat")
        if usage is None:
            return None
        inactive_key = "inactive_file" if self.version == 2 else "total_inactive_file"
        inactive = 0
        for line in (stat or "").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
        return max(0, int(usage) - inactive)

    def oom_kills(self) -> int:
        """Kernel OOM kills counted by this cgroup (0 where the file has no counter)."""
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


class HostProbe:
    """Reads cgroup files and physical memory under ``root`` (``/`` by default)."""

    def __init__(self, root: str | os.PathLike[str] = "/", pid: int | str = "self") -> None:
        self.root = Path(root)
        self.pid = pid

    def _text(self, *parts: str) -> str | None:
        try:
            return self.root.joinpath(*parts).read_text()
        except OSError:
            return None

    def physical_memory_bytes(self) -> int:
        """Total RAM from ``/proc/meminfo`` (psutil when the file is missing)."""
        text = self._text("proc", "meminfo")
        for line in (text or "").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
        return int(psutil.virtual_memory().total)

    def memory_cgroup(self) -> CgroupMemory | None:
        """The process's memory cgroup (v2 unified, else v1 memory controller), or ``None``."""
        text = self._text("proc", str(self.pid), "cgroup")
        if text is None:
            return None
        v1_path = v2_path = None
        for line in text.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            hid, controllers, path = parts
            if hid == "0" and controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = path
        if v1_path is not None:
            mount = self._mount_for("cgroup", "memory") or self.root / "sys/fs/cgroup/memory"
            cg = self._existing(mount, v1_path)
            if cg is not None:
                raw = self._read_int(cg / "memory.limit_in_bytes")
                limit = None if raw is None or raw >= UNLIMITED else raw
                return CgroupMemory(1, cg, limit)
        if v2_path is not None:
            mount = self._mount_for("cgroup2", None) or self.root / "sys/fs/cgroup"
            cg = self._existing(mount, v2_path)
            if cg is not None and (cg / "memory.max").exists():
                raw_text = (cg / "memory.max").read_text().strip()
                limit = None if raw_text == "max" else int(raw_text)
                return CgroupMemory(2, cg, limit)
        return None

    @staticmethod
    def _read_int(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _existing(mount: Path, rel: str) -> Path | None:
        """``mount/rel``; inside a cgroup namespace the path may be relative to the mount itself."""
        candidate = mount / rel.lstrip("/")
        if candidate.is_dir():
            return candidate
        return mount if mount.is_dir() else None

    def _mount_for(self, fstype: str, option: str | None) -> Path | None:
        text = self._text("proc", str(self.pid), "mountinfo")
        for line in (text or "").splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or not rfields or rfields[0] != fstype:
                continue
            if option is None or option in (rfields[-1].split(",") if len(rfields) >= 3 else []):
                return self.root / fields[4].lstrip("/")
        return None
