"""The snapshot's memory section: the ladder's lines in bytes and the kernel's OOM kills, whatever the
governor reports of them."""

from __future__ import annotations

import os
import types
from pathlib import Path

from rmq.core.config import load_config
from rmq.memory.budget import Budget
from rmq.memory.probes import CgroupMemory
from rmq.monitoring.snapshot import SnapshotBuilder

MiB = 1 << 20


class _Governor:
    def __init__(self, memory: dict) -> None:
        self.memory = memory
        self.budget = Budget(1000 * MiB, "configured", 2000 * MiB)
        self.actuator = types.SimpleNamespace(pool_pids=lambda: [os.getpid()])

    def memory_snapshot(self) -> dict:
        return dict(self.memory)


def _builder(memory: dict, tmp_path: Path, oom_kills: int | None) -> SnapshotBuilder:
    rt = types.SimpleNamespace(config=load_config({}, environ={}))
    builder = SnapshotBuilder(rt, _Governor(memory), "w1")  # type: ignore[arg-type]
    if oom_kills is None:
        builder._cgroup = None
    else:  # a cgroup v2 directory whose memory.events counts kernel OOM kills
        (tmp_path / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom 2\noom_kill {oom_kills}\n")
        builder._cgroup = CgroupMemory(2, tmp_path, None)
    return builder


def test_lines_follow_the_governors_own_ratios_when_it_reports_them(tmp_path):
    governor_lines = {"admit": 0.96, "unload": 0.9, "pause": 0.97, "resume": 0.93, "kill": 0.985}
    memory = _builder({"line_ratios": governor_lines, "oom_kills": None}, tmp_path, 4)._memory()
    assert memory["lines"] == {name: int(1000 * MiB * r) for name, r in governor_lines.items()}
    # the governor reports no count without a limited cgroup: the worker's cgroup, limited or not, answers
    assert memory["oom_kills"] == 4


def test_lines_come_from_the_config_when_the_governor_has_none(tmp_path):
    memory = _builder({}, tmp_path, None)._memory()
    assert memory["lines"]["kill"] == int(1000 * MiB * 0.95) and memory["lines"]["unload_target"] == 700 * MiB
    assert memory["oom_kills"] == 0  # no cgroup at all: nothing was killed by its OOM killer


def test_a_count_the_governor_reports_is_kept(tmp_path):
    assert _builder({"oom_kills": 7}, tmp_path, 4)._memory()["oom_kills"] == 7
