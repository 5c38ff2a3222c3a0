"""The ledger file's layout: where each figure sits, and the records its bytes decode to.

The file is a 128-byte header followed by the reservation slots: 128, or more for a large pool
(:func:`slots_for`); a process that opens the file reads their number from its size. The header holds the governor's
control block (its latest readings, written by the governor alone) and, at offset 96, the unload
requests of pool processes. A slot holds one reservation: an in-use byte first, then the figures,
then the task id (48 bytes) and name (96 bytes), cut to fit. The in-use bytes of all slots are read
as one slice (:data:`FLAGS`) to find the used slots without a loop; a few fields have offsets of
their own because some writers touch only them (:class:`rmq.core.ledger.Ledger` says who and why).

Nothing here locks or maps the file: that is :mod:`rmq.core.ledger`.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "KIND_MODEL", "KIND_TASK", "ZONES", "Control", "Entry", "LedgerFull", "Reserved", "fit", "read_slot", "slots_for",
    "write_slot",
]

KIND_TASK = 1
KIND_MODEL = 2
#: the governor's zones, stored by index in the header
ZONES = ("ok", "unload", "pause", "kill")

MAGIC = b"RMQLEDG1"
# magic, unload generation, unload bytes, worker bytes, budget, admit line, idle bytes,
# sample time, zone, cpu slots, paused, disk reserved (unused, kept for layout)
HEADER = struct.Struct("<8sQqqqqqdiiiq")
# in use, kind, pid, memory, cpu slots, disk, started, used, start rss, peak used, task id, name
SLOT_NUMBERS = "<BBxxiqiqxxxxdqqq"
SLOT = struct.Struct(SLOT_NUMBERS + "48s96s")
SUMMED = struct.Struct("<xBxxxxxxqiqxxxx8xq8xq")  # of those numbers: kind, memory, cpu, disk, used, peak
EMPTY_SLOT = bytes(SLOT.size)
OWNER = struct.Struct("<BBxxi")  # in use, kind, pid: the head of a slot
INT64 = struct.Struct("<q")
USED_AT = struct.calcsize("<BBxxiqiqxxxxd")  # offsets in a slot of the fields the governor writes
PEAK_AT = struct.calcsize("<BBxxiqiqxxxxdqq")
TASK_ID_AT = struct.calcsize(SLOT_NUMBERS)
SLOTS = 128  # the fewest slots a ledger has
REQUEST = struct.Struct("<Qq")  # unload requests from pool processes: generation, bytes
REQUEST_OFFSET = 96
HEADER_SIZE = 128


def slots_for(processes: int) -> int:
    """The slots a worker of ``processes`` pool processes needs: one running task and up to three
    resident models for each, and never fewer than :data:`SLOTS`."""
    return max(SLOTS, 4 * processes)


def size_of(slots: int) -> int:
    """The file size of a ledger with ``slots`` slots."""
    return HEADER_SIZE + SLOT.size * slots


def slots_in(size: int) -> int:
    """The number of slots of a ledger file of ``size`` bytes."""
    return (size - HEADER_SIZE) // SLOT.size


def flags_of(slots: int) -> slice:
    """The in-use byte of each of ``slots`` slots, as one strided slice of the map."""
    return slice(HEADER_SIZE, HEADER_SIZE + slots * SLOT.size, SLOT.size)


def fit(text: str, n: int) -> str:
    """``text`` cut to the ``n`` bytes a slot stores (on a character boundary)."""
    if len(text) <= n and text.isascii():  # the common case, without encoding
        return text
    return text.encode()[:n].decode("utf-8", "ignore")


def _unused(kind: int, memory_bytes: int, used_bytes: int, peak_used_bytes: int) -> int:
    # A model's memory stays once loaded, so its peak counts; a task may free and grow again.
    return max(0, memory_bytes - (peak_used_bytes if kind == KIND_MODEL else used_bytes))


class LedgerFull(RuntimeError):
    """More reservations than the ledger has slots: admission and model loads treat it as "not now"."""


@dataclass(slots=True)  # made for every task: quicker to build and to read
class Entry:
    """One reservation. Sizes in bytes."""

    kind: int
    pid: int
    memory_bytes: int
    cpu_slots: int = 0
    disk_bytes: int = 0
    task_id: str = ""
    name: str = ""
    started: float = 0.0
    used_bytes: int = 0
    start_rss: int = 0
    peak_used_bytes: int = 0
    slot: int = -1

    @property
    def unused_bytes(self) -> int:
        """The part of the declaration not yet in use (what may still come)."""
        return _unused(self.kind, self.memory_bytes, self.used_bytes, self.peak_used_bytes)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form, for the snapshot."""
        return {
            "pid": self.pid,
            "task_id": self.task_id,
            "task_name": self.name,
            "kind": "task" if self.kind == KIND_TASK else "model",
            "memory_bytes": self.memory_bytes,
            "cpu_slots": self.cpu_slots,
            "disk_bytes": self.disk_bytes,
            "used_bytes": self.used_bytes,
        }


class Reserved(NamedTuple):
    """What all reservations hold together: the sums admission weighs. Sizes in bytes."""

    reservations: int = 0
    unused_bytes: int = 0
    cpu_slots: int = 0
    disk_bytes: int = 0
    #: what resident models reserve: an idle worker still holds them
    model_bytes: int = 0

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Reserved:
        """The sums over ``entries``."""
        entries = list(entries)
        return cls(len(entries), sum(e.unused_bytes for e in entries), sum(e.cpu_slots for e in entries),
                   sum(e.disk_bytes for e in entries), sum(e.memory_bytes for e in entries if e.kind == KIND_MODEL))


class Control(NamedTuple):
    """The governor's latest readings, as pool processes see them (read several times per task)."""

    unload_generation: int
    unload_bytes: int
    worker_bytes: int
    budget_bytes: int
    admit_line_bytes: int
    idle_bytes: int
    sample_time: float
    zone: str
    cpu_slots: int
    paused: bool


def read_slot(buf: mmap.mmap, i: int) -> Entry | None:
    """The reservation in slot ``i`` of the mapped file ``buf``, or None if the slot is free."""
    v = SLOT.unpack_from(buf, HEADER_SIZE + i * SLOT.size)
    if not v[0]:
        return None
    return Entry(
        kind=v[1],
        pid=v[2],
        memory_bytes=v[3],
        cpu_slots=v[4],
        disk_bytes=v[5],
        started=v[6],
        used_bytes=v[7],
        start_rss=v[8],
        peak_used_bytes=v[9],
        task_id=v[10].rstrip(b"\0").decode("utf-8", "replace"),
        name=v[11].rstrip(b"\0").decode("utf-8", "replace"),
        slot=i,
    )


def write_slot(buf: mmap.mmap, i: int, e: Entry | None) -> None:
    """Store ``e`` in slot ``i`` of ``buf`` (None frees the slot)."""
    offset = HEADER_SIZE + i * SLOT.size
    if e is None:
        buf[offset : offset + SLOT.size] = EMPTY_SLOT
        return
    SLOT.pack_into(
        buf,
        offset,
        1,
        e.kind,
        e.pid,
        e.memory_bytes,
        e.cpu_slots,
        e.disk_bytes,
        e.started,
        e.used_bytes,
        e.start_rss,
        e.peak_used_bytes,
        e.task_id.encode()[:48],
        e.name.encode()[:96],
    )
