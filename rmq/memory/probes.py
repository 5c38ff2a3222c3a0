"""Readings of the machine: memory cgroups, physical RAM, process memory.

Everything reads through a :class:`HostProbe` rooted at a directory (``/`` normally), so
unit tests point it at a fake ``/proc`` and ``/sys`` tree instead of monkeypatching.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["CgroupMemory", "HostProbe", "UNLIMITED", "read_cgroup_file", "write_cgroup_file", "forget_cgroup_files",
           "working_set_of"]

#: cgroup v1 reports "no limit" as a huge page-aligned number; anything above this is unlimited
UNLIMITED = 1 << 60

#: where the kernel's cgroup filesystems are mounted: their files are read through kept descriptors
CGROUP_MOUNT = "/sys/fs/cgroup/"
#: kept descriptors at most (the oldest is closed): a worker reads about twenty files, a few per pool
_KEPT_MAX = 256

#: path -> a descriptor kept open on it. Opening a cgroup file costs 35-50 us here, a ``pread`` at
#: offset 0 on a kept one 1.5-9 us (the kernel writes the file anew each time), and the governor
#: reads about twenty of them a tick, each pool process a few per task. The lock makes a read and
#: the closing of its descriptor exclusive: a descriptor closed under a reader could be reused by
#: another file meanwhile.
_kept: OrderedDict[str, int] = OrderedDict()
_kept_lock = threading.Lock()


def _new_lock_in_child() -> None:
    global _kept_lock
    _kept_lock = threading.Lock()  # another thread may have held it at the fork; the descriptors stay valid


os.register_at_fork(after_in_child=_new_lock_in_child)


def _kept_descriptor(key: str, path: str, flags: int) -> int:
    """The descriptor kept under ``key``, opened on ``path`` first if none is (call under
    ``_kept_lock``); the oldest kept one is closed past ``_KEPT_MAX``."""
    fd = _kept.get(key)
    if fd is None:
        fd = os.open(path, flags | os.O_CLOEXEC)
        _kept[key] = fd
        if len(_kept) > _KEPT_MAX:
            os.close(_kept.popitem(last=False)[1])
    return fd


def read_cgroup_file(path: Path | str) -> str:
    """The text of a cgroup file, through a descriptor kept open when it lives in the kernel's cgroup
    filesystem (never replaced, only removed with its cgroup); any other file (a test's fake tree) is
    read afresh. Raises ``OSError`` as reading it would, and once its cgroup is gone."""
    key = str(path)
    if not key.startswith(CGROUP_MOUNT):
        with open(key) as fh:
            return fh.read()
    with _kept_lock:
        fd = _kept_descriptor(key, key, os.O_RDONLY)
        try:
            return os.pread(fd, 65536, 0).decode()
        except OSError:  # its cgroup was removed (ENODEV); one made since under the same path is opened anew
            del _kept[key]
            os.close(fd)
            raise


#: the key suffix of a descriptor kept for writing (under the file's path, so that
#: :func:`forget_cgroup_files` finds it with the readers)
_WRITE = "#w"


def write_cgroup_file(path: Path | str, text: str) -> None:
    """Write ``text`` to a cgroup file, through a descriptor kept open (as :func:`read_cgroup_file`
    keeps one for reading) when it lives in the kernel's cgroup filesystem: opening one costs
    35-50 us, and a pool process resets its cgroup's high-water mark before every task. Any other
    file (a test's fake tree) is written afresh. Raises ``OSError`` as writing it would."""
    path = str(path)
    if not path.startswith(CGROUP_MOUNT):
        with open(path, "w") as fh:
            fh.write(text)
        return
    key = path + _WRITE
    with _kept_lock:
        fd = _kept_descriptor(key, path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())  # a cgroup file takes each write whole, whatever the offset
        except OSError:
            del _kept[key]
            os.close(fd)
            raise


def working_set_of(usage: str, stat: str, version: int) -> int:
    """Usage minus inactive file cache (the kubelet's formula), from the texts of the usage file and
    ``memory.stat``. The counter is looked up, not parsed line by line: v1 has it near the end of
    about 40 lines, and pool processes read it before every task."""
    key = "\ntotal_inactive_file " if version == 1 else "\ninactive_file "
    at = ("\n" + stat).find(key)  # at a line's start: v1 also has a "inactive_file" line of its own
    inactive = 0
    if at >= 0:
        start = at + len(key) - 1  # the stat text without the leading "\n"
        end = stat.find("\n", start)
        inactive = int(stat[start:end if end >= 0 else len(stat)])
    return max(0, int(usage) - inactive)


def forget_cgroup_files(directory: Path | str) -> None:
    """Close the kept descriptors of the files of ``directory`` (a cgroup being removed)."""
    prefix = str(directory).rstrip("/") + "/"
    with _kept_lock:
        for key in [k for k in _kept if k.startswith(prefix)]:
            os.close(_kept.pop(key))


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
            return read_cgroup_file(self.path / name)
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
        return working_set_of(usage, stat or "", self.version)

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
