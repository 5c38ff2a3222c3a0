"""The worker's memory budget and where it comes from."""

from __future__ import annotations

from dataclasses import dataclass

from rmq.core.config import RmqConfig
from rmq.memory.probes import CgroupMemory, HostProbe

__all__ = ["Budget", "detect_budget"]


@dataclass(frozen=True)
class Budget:
    """A memory budget with its lines, all in bytes.

    Attributes:
        budget_bytes: what the worker may use.
        source: ``"configured"``, ``"cgroup-v2"``, ``"cgroup-v1"`` or ``"physical"``.
        limit_bytes: the detected limit the budget was taken from (container or RAM).
        cgroup: the memory cgroup when its limit is the source, for working-set readings.
    """

    budget_bytes: int
    source: str
    limit_bytes: int
    cgroup: CgroupMemory | None = None

    def line(self, ratio: float) -> int:
        """``ratio`` of the budget, in bytes."""
        return int(self.budget_bytes * ratio)


def detect_budget(config: RmqConfig, probe: HostProbe | None = None, percent: float | None = None) -> Budget:
    """The budget from ``rmq_memory_budget``: a size, or a percentage of the detected limit.

    The detected limit is the memory cgroup's limit when one is set (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``), else physical RAM. A configured size above the
    detected limit is capped to it. ``percent`` replaces a percentage the user did not set (the
    lines' own, :mod:`rmq.memory.lines`).
    """
    probe = probe or HostProbe()
    physical = probe.physical_memory_bytes()
    cgroup = probe.memory_cgroup()
    if cgroup is not None and cgroup.limit_bytes is not None and cgroup.limit_bytes < physical:
        limit, source = cgroup.limit_bytes, f"cgroup-v{cgroup.version}"
    else:
        limit, source, cgroup = physical, "physical", None
    kind, value = config.memory_budget
    if kind == "percent" and percent is not None and "memory_budget" not in config.explicit:
        value = percent
    if kind == "percent":
        return Budget(int(limit * value), source, limit, cgroup)
    return Budget(min(int(value), limit), "configured", limit, cgroup)
