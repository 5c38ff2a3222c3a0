"""The worker's memory budget and where it comes from (docs/design.md#budget)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmq.core.config import load_config
from rmq.memory.budget import Budget, detect_budget
from rmq.memory.probes import CgroupMemory, HostProbe

MiB = 1024**2
GiB = 1024**3
PHYSICAL = 16 * GiB


def host(root: Path, cgroup: str | None = None) -> HostProbe:
    """A fake host with 16 GiB of RAM and, optionally, a memory cgroup ("v1:<limit>" or "v2:<limit>")."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal: {PHYSICAL // 1024} kB\n")
    if cgroup is not None:
        version, limit = cgroup.split(":")
        if version == "v1":
            (root / "proc/self/cgroup").write_text("4:memory:/w\n0::/\n")
            (root / "proc/self/mountinfo").write_text(
                "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
            d = root / "sys/fs/cgroup/memory/w"
            d.mkdir(parents=True)
            (d / "memory.limit_in_bytes").write_text(limit)
            (d / "memory.usage_in_bytes").write_text(str(GiB))
            (d / "memory.stat").write_text(f"total_inactive_file {256 * MiB}\n")
        else:
            (root / "proc/self/cgroup").write_text("0::/w\n")
            (root / "proc/self/mountinfo").write_text("30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
            d = root / "sys/fs/cgroup/w"
            d.mkdir(parents=True)
            (d / "memory.max").write_text(limit)
            (d / "memory.current").write_text(str(GiB))
            (d / "memory.stat").write_text(f"inactive_file {256 * MiB}\n")
    return HostProbe(root, pid="self")


def budget_for(setting: str, probe: HostProbe) -> Budget:
    return detect_budget(load_config({"rmq_memory_budget": setting}, {}), probe)


def test_default_is_90_percent_of_physical_ram(tmp_path: Path) -> None:
    b = detect_budget(load_config({}, {}), host(tmp_path))
    assert b == Budget(int(PHYSICAL * 0.9), "physical", PHYSICAL, None)


@pytest.mark.parametrize(("version", "source"), [("v1", "cgroup-v1"), ("v2", "cgroup-v2")])
def test_percent_of_the_cgroup_limit(tmp_path: Path, version: str, source: str) -> None:
    b = budget_for("50%", host(tmp_path, f"{version}:{4 * GiB}"))
    assert (b.budget_bytes, b.source, b.limit_bytes) == (2 * GiB, source, 4 * GiB)
    assert isinstance(b.cgroup, CgroupMemory)
    # the governor reads the working set through it
    assert b.cgroup.working_set_bytes() == GiB - 256 * MiB


def test_unlimited_v1_falls_back_to_physical(tmp_path: Path) -> None:
    b = budget_for("90%", host(tmp_path, "v1:9223372036854771712"))
    assert (b.source, b.limit_bytes, b.cgroup) == ("physical", PHYSICAL, None)


def test_v2_max_falls_back_to_physical(tmp_path: Path) -> None:
    b = budget_for("90%", host(tmp_path, "v2:max"))
    assert (b.source, b.limit_bytes) == ("physical", PHYSICAL)


def test_a_cgroup_limit_above_ram_is_no_limit(tmp_path: Path) -> None:
    b = budget_for("50%", host(tmp_path, f"v2:{64 * GiB}"))
    assert (b.budget_bytes, b.source, b.limit_bytes) == (8 * GiB, "physical", PHYSICAL)


def test_configured_size(tmp_path: Path) -> None:
    b = budget_for("6GiB", host(tmp_path))
    assert (b.budget_bytes, b.source, b.limit_bytes) == (6 * GiB, "configured", PHYSICAL)


def test_configured_size_above_the_container_limit_is_capped(tmp_path: Path) -> None:
    b = budget_for("6GiB", host(tmp_path, f"v1:{4 * GiB}"))
    assert (b.budget_bytes, b.source, b.limit_bytes) == (4 * GiB, "configured", 4 * GiB)
    assert b.cgroup is not None and b.cgroup.version == 1


def test_configured_size_above_ram_is_capped(tmp_path: Path) -> None:
    b = budget_for("64GiB", host(tmp_path))
    assert (b.budget_bytes, b.source) == (PHYSICAL, "configured")


def test_env_override_reaches_the_budget(tmp_path: Path) -> None:
    cfg = load_config({"rmq_memory_budget": "6GiB"}, {"RMQ_MEMORY_BUDGET": "25%"})
    assert detect_budget(cfg, host(tmp_path)).budget_bytes == PHYSICAL // 4


def test_lines_are_fractions_of_the_budget() -> None:
    b = Budget(10 * GiB, "configured", 16 * GiB)
    assert b.line(0.85) == int(8.5 * GiB)
    assert b.line(1.0) == 10 * GiB


def test_real_host_budget_is_sane() -> None:
    b = detect_budget(load_config({}, {}))
    assert b.source in ("physical", "cgroup-v1", "cgroup-v2")
    assert 0 < b.budget_bytes < b.limit_bytes
