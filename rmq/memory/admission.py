"""Admission policy: does a new task fit beside what already runs? Pure functions.

Memory: measured worker memory + the unused part of running declarations + the new
declaration must stay at or under the admit line, so that well-behaved tasks never push
the worker into the kill zone. CPU: declared slots must be free. Disk: the session root's
free space minus other reservations must cover the declaration. A task that could not fit
even on an idle worker (memory past the idle room, more CPU slots than the worker has, more
disk than the session root's filesystem holds) never fits: it fails instead of waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from rmq.core.ledger import Reserved
from rmq.core.units import format_bytes as fb

__all__ = ["Need", "Verdict", "judge", "percentile"]


class Need(NamedTuple):
    """What a task asks for. Sizes in bytes."""

    memory_bytes: int
    cpu_slots: int = 0
    disk_bytes: int = 0


class Verdict(NamedTuple):
    """The outcome of one admission check.

    Attributes:
        admitted: the task fits now.
        never: the task could not fit even on an idle worker (fail, don't defer).
        resource: the resource that did not fit (``"memory"``, ``"cpu"``, ``"disk"``) or ``""``.
        reason: a sentence with the figures, for logs and errors.
        declared / available / budget: figures of the resource that did not fit.
    """

    admitted: bool
    never: bool = False
    resource: str = ""
    reason: str = ""
    declared: int = 0
    available: int = 0
    budget: int = 0


def judge(
    need: Need,
    reserved: Reserved,
    worker_bytes: int,
    idle_bytes: int,
    admit_line_bytes: int,
    budget_bytes: int,
    cpu_slots: int,
    disk_free_bytes: int | None = None,
    disk_size_bytes: int | None = None,
) -> Verdict:
    """Decide whether ``need`` fits beside what the ``reserved`` reservations hold.

    Args:
        disk_free_bytes: free space of the session root's filesystem for this user, or ``None``
            (disk not checked).
        disk_size_bytes: the most that filesystem could ever hold for this user (used + free:
            blocks reserved for root left out), or ``None`` (no "never fits" test for disk).
    """

    room_idle = admit_line_bytes - idle_bytes
    if need.memory_bytes > room_idle:
        return Verdict(
            False, True, "memory",
            f"declares {fb(need.memory_bytes)} but an idle worker admits at most {fb(room_idle)}",
            need.memory_bytes, max(0, room_idle), budget_bytes,
        )
    if need.cpu_slots > cpu_slots:
        return Verdict(
            False, True, "cpu", f"declares cpu={need.cpu_slots} but the worker has {cpu_slots} slots",
            need.cpu_slots, cpu_slots, cpu_slots,
        )
    if need.disk_bytes and disk_size_bytes is not None and need.disk_bytes > disk_size_bytes:
        return Verdict(
            False, True, "disk",
            f"declares {fb(need.disk_bytes)} of disk but the session root's filesystem holds {fb(disk_size_bytes)}",
            need.disk_bytes, disk_size_bytes, disk_size_bytes,
        )
    unused = reserved.unused_bytes
    projected = worker_bytes + unused + need.memory_bytes
    if projected > admit_line_bytes:
        return Verdict(
            False, False, "memory",
            f"needs {fb(need.memory_bytes)}: worker {fb(worker_bytes)} + reserved-unused {fb(unused)} "
            f"would pass the admit line {fb(admit_line_bytes)}",
            need.memory_bytes, max(0, admit_line_bytes - worker_bytes - unused), budget_bytes,
        )
    if need.cpu_slots:
        used_slots = reserved.cpu_slots
        if used_slots + need.cpu_slots > cpu_slots:
            return Verdict(
                False, False, "cpu", f"needs {need.cpu_slots} CPU slots, {cpu_slots - used_slots} free",
                need.cpu_slots, cpu_slots - used_slots, cpu_slots,
            )
    if need.disk_bytes and disk_free_bytes is not None:
        available = disk_free_bytes - reserved.disk_bytes
        if need.disk_bytes > available:
            return Verdict(
                False, False, "disk",
                f"needs {fb(need.disk_bytes)} of disk, {fb(max(0, available))} free after reservations",
                need.disk_bytes, max(0, available), disk_free_bytes,
            )
    return _ADMITTED


_ADMITTED = Verdict(True)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values`` by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q * (len(ordered) - 1)))))
    return float(ordered[rank])
