"""Machine readings through a fake /proc and /sys tree: cgroup v1, v2, none (docs/design.md#budget)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from rmq.memory.probes import CgroupMemory, HostProbe

MiB = 1024**2
GiB = 1024**3
V1_UNLIMITED = 9223372036854771712
MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"
PHYSICAL = 16384000 * 1024


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def v1_tree(root: Path, limit: int | None = 2 * GiB, mount: str = "sys/fs/cgroup/memory",
            mountinfo: bool = True, cg: str = "/x") -> Path:
    """A hybrid host whose memory controller is v1 (like most Docker hosts before 2021)."""
    write(root, "proc/meminfo", MEMINFO)
    write(root, "proc/self/cgroup", f"9:pids:/\n4:memory:{cg}\n3:cpu,cpuacct:/\n0::/\n")
    if mountinfo:
        write(root, "proc/self/mountinfo",
              "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
              "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
              f"35 31 0:32 / /{mount} rw,nosuid,relatime - cgroup cgroup rw,memory\n"
              "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    d = root / mount / cg.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{V1_UNLIMITED if limit is None else limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{700 * MiB}\n")
    (d / "memory.stat").write_text(
        f"cache 300\nrss 400\ninactive_file {5 * MiB}\nactive_file 0\n"
        f"total_cache 300\ntotal_inactive_file {200 * MiB}\ntotal_active_file 0\n"
    )
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    return d


def v2_tree(root: Path, limit: str = str(GiB), cg: str = "/x", mount: str = "sys/fs/cgroup") -> Path:
    """A cgroup v2 (unified) host."""
    write(root, "proc/meminfo", MEMINFO)
    write(root, "proc/self/cgroup", f"0::{cg}\n")
    write(root, "proc/self/mountinfo",
          f"30 23 0:26 / /{mount} rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n")
    d = root / mount / cg.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{600 * MiB}\n")
    (d / "memory.stat").write_text(
        f"anon {400 * MiB}\nfile {200 * MiB}\nactive_file {50 * MiB}\ninactive_file {150 * MiB}\n"
    )
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
    return d


# --- physical memory ---------------------------------------------------------------------------------
def test_physical_memory_from_meminfo(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert HostProbe(tmp_path).physical_memory_bytes() == PHYSICAL


def test_physical_memory_falls_back_to_psutil(tmp_path: Path) -> None:
    assert HostProbe(tmp_path).physical_memory_bytes() == psutil.virtual_memory().total


def test_real_host_physical_memory_matches_psutil() -> None:
    assert HostProbe().physical_memory_bytes() == psutil.virtual_memory().total


def test_no_cgroup_file_means_no_cgroup(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert HostProbe(tmp_path, pid="self").memory_cgroup() is None


# --- cgroup v1 ---------------------------------------------------------------------------------------
def test_v1_limit(tmp_path: Path) -> None:
    d = v1_tree(tmp_path, limit=2 * GiB)
    cg = HostProbe(tmp_path, pid="self").memory_cgroup()
    assert cg == CgroupMemory(1, d, 2 * GiB)


def test_v1_unlimited(tmp_path: Path) -> None:
    v1_tree(tmp_path, limit=None)
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg is not None and cg.version == 1 and cg.limit_bytes is None


def test_v1_working_set_is_usage_minus_total_inactive_file(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg.working_set_bytes() == 700 * MiB - 200 * MiB


def test_v1_oom_kills(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    assert HostProbe(tmp_path).memory_cgroup().oom_kills() == 3


def test_v1_mount_point_comes_from_mountinfo(tmp_path: Path) -> None:
    d = v1_tree(tmp_path, mount="cgroups/mem")
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg is not None and cg.path == d and cg.limit_bytes == 2 * GiB


def test_v1_default_mount_point_without_mountinfo(tmp_path: Path) -> None:
    d = v1_tree(tmp_path, mountinfo=False)
    assert HostProbe(tmp_path).memory_cgroup().path == d


def test_v1_inside_a_cgroup_namespace_uses_the_mount_root(tmp_path: Path) -> None:
    # Given /proc/self/cgroup names a path that is not visible inside the container's mount
    mount = v1_tree(tmp_path, cg="/")
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/docker/abc123\n")
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg is not None and cg.path == mount and cg.limit_bytes == 2 * GiB


def test_pid_selects_the_process(tmp_path: Path) -> None:
    v1_tree(tmp_path)
    (tmp_path / "proc/self").rename(tmp_path / "proc/1234")
    assert HostProbe(tmp_path, pid=1234).memory_cgroup().limit_bytes == 2 * GiB
    assert HostProbe(tmp_path, pid="self").memory_cgroup() is None


# --- cgroup v2 ---------------------------------------------------------------------------------------
def test_v2_limit(tmp_path: Path) -> None:
    d = v2_tree(tmp_path, limit=str(GiB))
    assert HostProbe(tmp_path).memory_cgroup() == CgroupMemory(2, d, GiB)


def test_v2_max_is_unlimited(tmp_path: Path) -> None:
    v2_tree(tmp_path, limit="max")
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg is not None and cg.version == 2 and cg.limit_bytes is None


def test_v2_working_set_is_current_minus_inactive_file(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    assert HostProbe(tmp_path).memory_cgroup().working_set_bytes() == 600 * MiB - 150 * MiB


def test_v2_oom_kills_from_memory_events(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    assert HostProbe(tmp_path).memory_cgroup().oom_kills() == 2


def test_v2_mount_point_comes_from_mountinfo(tmp_path: Path) -> None:
    d = v2_tree(tmp_path, mount="run/cg2", cg="/system.slice/worker.service")
    cg = HostProbe(tmp_path).memory_cgroup()
    assert cg is not None and cg.path == d


def test_v2_without_memory_controller_is_no_cgroup(tmp_path: Path) -> None:
    d = v2_tree(tmp_path)
    (d / "memory.max").unlink()
    assert HostProbe(tmp_path).memory_cgroup() is None


# --- readings that went away -------------------------------------------------------------------------
def test_working_set_unreadable_is_none(tmp_path: Path) -> None:
    d = v2_tree(tmp_path)
    cg = HostProbe(tmp_path).memory_cgroup()
    (d / "memory.current").unlink()
    assert cg.working_set_bytes() is None


def test_working_set_without_stat_is_usage(tmp_path: Path) -> None:
    d = v2_tree(tmp_path)
    (d / "memory.stat").unlink()
    assert HostProbe(tmp_path).memory_cgroup().working_set_bytes() == 600 * MiB


def test_oom_kills_without_a_counter_is_zero(tmp_path: Path) -> None:
    d = v1_tree(tmp_path)
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # kernels before 4.13
    assert HostProbe(tmp_path).memory_cgroup().oom_kills() == 0


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_directory_gone(tmp_path: Path, version: int) -> None:
    cg = CgroupMemory(version, tmp_path / "gone", GiB)
    assert cg.working_set_bytes() is None
    assert cg.oom_kills() == 0


# --- kept descriptors (read_cgroup_file) --------------------------------------------------------------
def _as_cgroup_mount(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    from rmq.memory import probes

    monkeypatch.setattr(probes, "CGROUP_MOUNT", str(root) + "/")
    monkeypatch.setattr(probes, "_kept", probes.OrderedDict())


def test_a_cgroup_file_is_read_through_one_kept_descriptor_that_sees_each_new_value(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rmq.memory import probes

    _as_cgroup_mount(monkeypatch, tmp_path)
    usage = tmp_path / "pool" / "memory.usage_in_bytes"
    usage.parent.mkdir()
    usage.write_text("100\n")
    assert probes.read_cgroup_file(usage) == "100\n"
    fd = probes._kept[str(usage)]
    usage.write_text("2000\n")  # the kernel writes the file anew for each read at offset 0
    assert probes.read_cgroup_file(usage) == "2000\n"
    assert probes._kept == {str(usage): fd}
    # the cgroup is removed: its descriptors are closed
    probes.forget_cgroup_files(usage.parent)
    assert probes._kept == {}
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_kept_descriptor_that_fails_is_dropped_and_the_failure_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rmq.memory import probes

    _as_cgroup_mount(monkeypatch, tmp_path)
    stat = tmp_path / "memory.stat"
    stat.write_text("total_inactive_file 0\n")
    probes.read_cgroup_file(stat)

    def gone(fd: int, n: int, offset: int) -> bytes:
        raise OSError(19, "No such device")  # what a removed cgroup's files answer

    monkeypatch.setattr(probes.os, "pread", gone)
    with pytest.raises(OSError):
        probes.read_cgroup_file(stat)
    assert probes._kept == {}
    assert CgroupMemory(1, tmp_path, None).working_set_bytes() is None


def test_files_outside_the_cgroup_mount_are_read_afresh_and_never_kept(tmp_path: Path) -> None:
    from rmq.memory import probes

    f = tmp_path / "memory.usage_in_bytes"
    f.write_text("7\n")
    before = dict(probes._kept)
    assert probes.read_cgroup_file(f) == "7\n"
    f.unlink()
    f.write_text("8\n")  # a fake tree may replace a file: read afresh, the new one is seen
    assert probes.read_cgroup_file(f) == "8\n"
    assert probes._kept == before


def test_kept_descriptors_are_bounded_the_oldest_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rmq.memory import probes

    _as_cgroup_mount(monkeypatch, tmp_path)
    monkeypatch.setattr(probes, "_KEPT_MAX", 3)
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}"
        f.write_text(str(i))
        files.append(f)
        assert probes.read_cgroup_file(f) == str(i)
    assert list(probes._kept) == [str(f) for f in files[2:]]
    probes.forget_cgroup_files(tmp_path)


def test_a_cgroup_file_is_written_through_one_kept_descriptor_closed_with_its_cgroup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rmq.memory import probes

    _as_cgroup_mount(monkeypatch, tmp_path)
    peak = tmp_path / "pool" / "memory.max_usage_in_bytes"
    peak.parent.mkdir()
    peak.write_text("")
    opened = []
    real_open = probes.os.open
    monkeypatch.setattr(probes.os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    probes.write_cgroup_file(peak, "0")
    probes.write_cgroup_file(peak, "0")  # before the next task: no second open
    assert opened == [str(peak)]
    assert peak.read_text() == "00"  # a plain file keeps both writes; the kernel's takes each whole
    assert probes.read_cgroup_file(peak) == "00"  # its reader is a descriptor of its own
    assert len(probes._kept) == 2
    probes.forget_cgroup_files(peak.parent)
    assert probes._kept == {}


def test_a_cgroup_file_outside_the_mount_is_written_afresh(tmp_path: Path) -> None:
    from rmq.memory import probes

    f = tmp_path / "memory.max_usage_in_bytes"
    f.write_text(str(700 * MiB))
    before = dict(probes._kept)
    probes.write_cgroup_file(f, "0")
    assert f.read_text() == "0" and probes._kept == before


@pytest.mark.parametrize(("version", "stat", "working_set"), [
    # v1: the hierarchical total counts, not the cgroup's own line before it
    (1, f"cache 1\ninactive_file {5 * MiB}\nactive_file 0\ntotal_inactive_file {200 * MiB}\ntotal_active_file 0\n",
     500 * MiB),
    # v2: "inactive_file" at a line's start, not inside "active_file"'s neighbours; last line without "\n"
    (2, f"anon 1\nactive_file {50 * MiB}\ninactive_file {150 * MiB}", 550 * MiB),
    (2, f"inactive_file {100 * MiB}\nactive_file 0\n", 600 * MiB),  # the first line
    (1, "cache 0\n", 700 * MiB),  # no counter: the usage
])
def test_the_working_set_is_found_in_memory_stat_wherever_its_line_is(version: int, stat: str,
                                                                        working_set: int) -> None:
    from rmq.memory.probes import working_set_of

    assert working_set_of(f"{700 * MiB}\n", stat, version) == working_set
