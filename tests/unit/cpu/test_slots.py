"""CPU slot detection on fake /proc + /sys trees."""

from __future__ import annotations

import os
from pathlib import Path

from rmq.cpu.slots import CpuProbe, detect_cpu_slots

V2_MOUNT = "30 23 0:26 {root} /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def tree(root: Path, files: dict[str, str]) -> CpuProbe:
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return CpuProbe(root=root, cpu_count=lambda: 8)


def v2(root: Path, cgroup: str, mount_root: str = "/", **cpu_max: str) -> CpuProbe:
    files = {"/proc/self/cgroup": f"0::{cgroup}\n", "/proc/self/mountinfo": V2_MOUNT.format(root=mount_root)}
    for rel, value in cpu_max.items():
        files[f"/sys/fs/cgroup/{rel.replace('__', '/')}/cpu.max".replace("//", "/")] = value
    return tree(root, files)


def test_v2_quota_is_rounded_up_to_whole_slots(tmp_path):
    probe = v2(tmp_path, "/kubepods/pod1/ctr", kubepods__pod1__ctr="150000 100000\n",
               kubepods__pod1="max 100000\n")
    assert detect_cpu_slots(probe) == (2, "cgroup-v2")


def test_v2_an_ancestors_tighter_quota_wins(tmp_path):
    probe = v2(tmp_path, "/kubepods/pod1/ctr", kubepods__pod1__ctr="400000 100000\n",
               kubepods__pod1="100000 100000\n")
    assert detect_cpu_slots(probe) == (1, "cgroup-v2")


def test_v2_without_quota_uses_the_cpus_the_process_may_run_on(tmp_path):
    probe = v2(tmp_path, "/user/session", user__session="max 100000\n")
    assert detect_cpu_slots(probe) == (8, "affinity")


def test_v2_quota_above_the_cpus_is_capped_by_them(tmp_path):
    probe = v2(tmp_path, "/big", big="1600000 100000\n")
    assert detect_cpu_slots(probe) == (8, "affinity")


def test_v2_inside_a_cgroup_namespace(tmp_path):
    probe = tree(tmp_path, {"/proc/self/cgroup": "0::/\n", "/proc/self/mountinfo": V2_MOUNT.format(root="/"),
                            "/sys/fs/cgroup/cpu.max": "300000 100000\n"})
    assert detect_cpu_slots(probe) == (3, "cgroup-v2")


def test_v2_without_a_namespace_strips_the_hidden_part_of_the_path(tmp_path):
    # docker without cgroupns: the host path, and the container's cgroup mounted at /sys/fs/cgroup
    probe = v2(tmp_path, "/system.slice/docker-abc.scope", mount_root="/system.slice/docker-abc.scope")
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("200000 100000\n")
    assert detect_cpu_slots(probe) == (2, "cgroup-v2")


def test_v2_without_mountinfo_tries_the_usual_mount_point(tmp_path):
    probe = tree(tmp_path, {"/proc/self/cgroup": "0::/app\n", "/sys/fs/cgroup/app/cpu.max": "50000 100000\n"})
    assert detect_cpu_slots(probe) == (1, "cgroup-v2")


def _v1(root: Path, quota: str, cgroup: str = "/docker/abc", mount_root: str = "/") -> CpuProbe:
    base = "/sys/fs/cgroup/cpu,cpuacct" + (cgroup if mount_root == "/" else "")
    return tree(root, {
        "/proc/self/cgroup": f"12:memory:{cgroup}\n4:cpu,cpuacct:{cgroup}\n1:name=systemd:/\n0::/\n",
        "/proc/self/mountinfo": V1_MOUNTS.format(root=mount_root),
        f"{base}/cpu.cfs_quota_us": quota, f"{base}/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/unified/cgroup.controllers": "\n",
    })


def test_v1_quota(tmp_path):
    assert detect_cpu_slots(_v1(tmp_path, "250000\n")) == (3, "cgroup-v1")


def test_v1_fraction_of_a_cpu_is_one_slot(tmp_path):
    assert detect_cpu_slots(_v1(tmp_path, "50000\n", mount_root="/docker/abc")) == (1, "cgroup-v1")


def test_v1_without_quota(tmp_path):
    assert detect_cpu_slots(_v1(tmp_path, "-1\n")) == (8, "affinity")


def test_no_cgroup_files_at_all(tmp_path):
    assert detect_cpu_slots(CpuProbe(root=tmp_path, cpu_count=lambda: 3)) == (3, "affinity")


def test_this_machine():
    slots, source = detect_cpu_slots()
    assert source in ("cgroup-v2", "cgroup-v1", "affinity")
    assert 1 <= slots <= len(os.sched_getaffinity(0))
