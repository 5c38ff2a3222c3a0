"""The reservation ledger shared by all processes of one worker, and the governor's control block.

One file, memory-mapped by every process of the worker: a header the governor writes
(its latest readings and the unload signal) and a table of reservations (running tasks,
resident models). Changes to the table happen under an ``fcntl.flock`` taken on a lock
file that each process opens itself, so the kernel releases it when a holder is
SIGKILLed (a multiprocessing/billiard Lock would stay locked forever). Reservations of
dead processes are released by the governor (:meth:`Ledger.release_dead`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from rmq.core import forks

__all__ = ["Ledger", "Entry", "Control", "Reserved", "LedgerFull", "KIND_TASK", "KIND_MODEL"]

KIND_TASK = 1
KIND_MODEL = 2
_MAGIC = b"RMQLEDG1"
# magic, unload generation, unload bytes, worker bytes, budget, admit line, idle bytes,
# sample time, zone, cpu slots, paused, disk reserved (unused, kept for layout)
_HEADER = struct.Struct("<8sQqqqqqdiiiq")
# in use, kind, pid, memory, cpu slots, disk, started, used, start rss, peak used, task id, name
_SLOT_NUMBERS = "<BBxxiqiqxxxxdqqq"
_SLOT = struct.Struct(_SLOT_NUMBERS + "48s96s")
_SUMMED = struct.Struct("<xBxxxxxxqiqxxxx8xq8xq")  # of those numbers: kind, memory, cpu, disk, used, peak
_EMPTY_SLOT = bytes(_SLOT.size)
_OWNER = struct.Struct("<BBxxi")  # in use, kind, pid: the head of a slot
_INT64 = struct.Struct("<q")
_USED_AT = struct.calcsize("<BBxxiqiqxxxxd")  # offsets in a slot of the fields the governor writes
_PEAK_AT = struct.calcsize("<BBxxiqiqxxxxdqq")
_TASK_ID_AT = struct.calcsize(_SLOT_NUMBERS)
_SLOTS = 128
_REQUEST = struct.Struct("<Qq")  # unload requests from pool processes: generation, bytes
_REQUEST_OFFSET = 96
_HEADER_SIZE = 128
_FLAGS = slice(_HEADER_SIZE, _HEADER_SIZE + _SLOTS * _SLOT.size, _SLOT.size)  # in-use byte of each slot
_SIZE = _HEADER_SIZE + _SLOT.size * _SLOTS

ZONES = ("ok", "unload", "pause", "kill")


def _fit(text: str, n: int) -> str:
    """``text`` cut to the ``n`` bytes a slot stores (on a character boundary)."""
    if len(text) <= n and text.isascii():  # the common case, without encoding
        return text
    return text.encode()[:n].decode("utf-8", "ignore")


def _unused(kind: int, memory_bytes: int, used_bytes: int, peak_used_bytes: int) -> int:
    # A model's memory stays once loaded, so its peak counts; a task may free and grow again.
    return max(0, memory_bytes - (peak_used_bytes if kind == KIND_MODEL else used_bytes))


class LedgerFull(RuntimeError):
    """More reservations than the ledger has slots (128)."""


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

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Reserved:
        """The sums over ``entries``."""
        entries = list(entries)
        return cls(len(entries), sum(e.unused_bytes for e in entries), sum(e.cpu_slots for e in entries),
                   sum(e.disk_bytes for e in entries))


class _Flock:
    """``with``-able exclusive ``flock`` on one descriptor (cheaper than a generator context manager)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


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


class Ledger:
    """The shared table of reservations of one worker.

    Args:
        directory: the worker's runtime directory (tmpfs when available).
        create: True in the worker's main process (makes and zeroes the file).
    """

    def __init__(self, directory: str, create: bool = False) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "ledger")
        self.lock_path = os.path.join(directory, "ledger.lock")
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with open(self.path, "wb") as fh:
                fh.write(_MAGIC + b"\0" * (_SIZE - len(_MAGIC)))
            open(self.lock_path, "a").close()
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._flock: _Flock | None = None  # this process's lock, on a descriptor of its own
        forks.forget_in_children(self)

    # locking -------------------------------------------------------------
    def _forget_inherited(self) -> None:
        # An inherited descriptor shares the parent's open file, and with it the parent's flock:
        # each process locks through a descriptor of its own.
        self._close_lock()

    def _close_lock(self) -> None:
        if self._flock is not None:
            try:
                os.close(self._flock.fd)
            except OSError:
                pass
            self._flock = None

    def locked(self) -> _Flock:
        """``with ledger.locked():`` holds the ledger's lock (released by the kernel if this process dies)."""
        if self._flock is None:
            self._flock = _Flock(os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600))
        return self._flock

    # control block -------------------------------------------------------
    def read_control(self) -> Control:
        """The governor's latest readings (no lock: a single writer)."""
        v = _HEADER.unpack_from(self._map, 0)
        # unload generation, unload bytes, worker bytes, budget, admit line, idle bytes, sample time
        return Control(*v[1:8], ZONES[v[8]] if 0 <= v[8] < len(ZONES) else "ok", v[9], bool(v[10]))

    def admission_readings(self) -> tuple[int, int, int, int, int]:
        """What admission weighs of the governor's readings, without building a :class:`Control`
        (read for every task): ``(worker bytes, idle bytes, admit line, budget, CPU slots)``."""
        v = _HEADER.unpack_from(self._map, 0)
        return v[3], v[6], v[5], v[4], v[9]

    def write_control(self, c: Control) -> None:
        """Publish readings (governor only)."""
        _HEADER.pack_into(
            self._map,
            0,
            _MAGIC,
            c.unload_generation,
            c.unload_bytes,
            c.worker_bytes,
            c.budget_bytes,
            c.admit_line_bytes,
            c.idle_bytes,
            c.sample_time,
            ZONES.index(c.zone),
            c.cpu_slots,
            int(c.paused),
            0,
        )

    def request_unload(self, bytes_wanted: int) -> None:
        """A pool process asks every process to unload models (the governor relays it)."""
        with self.locked():
            generation, _ = _REQUEST.unpack_from(self._map, _REQUEST_OFFSET)
            _REQUEST.pack_into(self._map, _REQUEST_OFFSET, generation + 1, bytes_wanted)

    def read_unload_request(self) -> tuple[int, int]:
        """``(generation, bytes)`` of the latest request from a pool process."""
        generation, wanted = _REQUEST.unpack_from(self._map, _REQUEST_OFFSET)
        return generation, wanted

    # table ---------------------------------------------------------------
    def _read_slot(self, i: int) -> Entry | None:
        v = _SLOT.unpack_from(self._map, _HEADER_SIZE + i * _SLOT.size)
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

    def _write_slot(self, i: int, e: Entry | None) -> None:
        offset = _HEADER_SIZE + i * _SLOT.size
        if e is None:
            self._map[offset : offset + _SLOT.size] = _EMPTY_SLOT
            return
        _SLOT.pack_into(
            self._map,
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

    def entries_unlocked(self) -> list[Entry]:
        """All reservations; call under :meth:`locked` for a consistent view."""
        flags = self._map[_FLAGS]  # the in-use byte of every slot: a C-speed slice, not a loop
        out = []
        i = flags.find(1)
        while i >= 0:
            e = self._read_slot(i)
            if e is not None:
                out.append(e)
            i = flags.find(1, i + 1)
        return out

    def reserved_unlocked(self) -> Reserved:
        """The sums over all reservations, read without decoding them; call under :meth:`locked`."""
        m = self._map
        flags = m[_FLAGS]
        unpack, size, find = _SUMMED.unpack_from, _SLOT.size, flags.find  # locals: this runs per task, per slot
        n = unused = cpu = disk = 0
        i = find(1)
        while i >= 0:
            kind, memory, slots, disk_bytes, used, peak = unpack(m, _HEADER_SIZE + i * size)
            n += 1
            unused += max(0, memory - (peak if kind == KIND_MODEL else used))  # _unused, inlined
            cpu += slots
            disk += disk_bytes
            i = find(1, i + 1)
        return Reserved(n, unused, cpu, disk)

    def entries(self) -> list[Entry]:
        """All reservations, read under the lock."""
        with self.locked():
            return self.entries_unlocked()

    def running(self, task_id: str, other_than: int = -1) -> bool:
        """Whether a process other than ``other_than`` holds a task reservation for ``task_id``."""
        key = _fit(task_id, 48)
        return any(e.kind == KIND_TASK and e.task_id == key and e.pid != other_than for e in self.entries())

    def add_unlocked(self, e: Entry) -> Entry:
        """Store a reservation (caller holds the lock); returns it with its slot."""
        i = self._map[_FLAGS].find(0)
        if i < 0:
            raise LedgerFull("the ledger has no free slot (128 reservations)")
        e.slot = i
        e.task_id, e.name = _fit(e.task_id, 48), _fit(e.name, 96)
        if not e.started:
            e.started = time.time()
        self._write_slot(i, e)
        return e

    def try_add(self, e: Entry, fits: Callable[[Reserved], bool]) -> bool:
        """Atomically add ``e`` if ``fits(what the current reservations hold)`` says so."""
        with self.locked():
            if not fits(self.reserved_unlocked()):
                return False
            self.add_unlocked(e)
            return True

    def update(self, e: Entry) -> None:
        """Rewrite a reservation in place (same slot, same owner)."""
        with self.locked():
            current = self._read_slot(e.slot)
            if current is not None and current.pid == e.pid and current.task_id == _fit(e.task_id, 48):
                self._write_slot(e.slot, e)

    def remove(self, e: Entry) -> Entry | None:
        """Release one reservation; returns it as stored (with the governor's readings), or None if
        it was already gone."""
        with self.locked():
            current = self._read_slot(e.slot)
            if current is not None and current.pid == e.pid and current.task_id == _fit(e.task_id, 48):
                self._write_slot(e.slot, None)
                return current
        return None

    def release(self, e: Entry) -> int | None:
        """Release a reservation this process added, without the lock; returns the peak use the
        governor recorded for it, or None if it was already gone.

        Only its owner releases a live reservation (the governor drops those of dead processes),
        and the governor's usage writes leave a slot's in-use byte alone, so clearing that one byte
        races with no other writer: a reader under the lock sees the reservation whole or gone.
        """
        offset = _HEADER_SIZE + e.slot * _SLOT.size
        in_use, _, pid = _OWNER.unpack_from(self._map, offset)
        start = offset + _TASK_ID_AT
        if not in_use or pid != e.pid or self._map[start : start + 48].rstrip(b"\0") != e.task_id.encode():
            return None
        peak: int = _INT64.unpack_from(self._map, offset + _PEAK_AT)[0]
        self._map[offset] = 0
        return peak

    def release_dead(self, alive: Callable[[int], bool]) -> list[Entry]:
        """Drop reservations whose process is gone; returns what was dropped."""
        dropped = []
        with self.locked():
            for e in self.entries_unlocked():
                if not alive(e.pid):
                    self._write_slot(e.slot, None)
                    dropped.append(e)
        return dropped

    def publish(self, control: Control, usage: Iterable[tuple[Entry, int]]) -> None:
        """Write the governor's readings and the usage of each reservation in one locked step,
        so admission never pairs a new usage figure with an old memory reading."""
        with self.locked():
            self.write_control(control)
            self._set_usage_unlocked(usage)

    def set_usage(self, usage: Iterable[tuple[Entry, int]]) -> None:
        """Record the bytes each reservation uses now, and its peak (governor only)."""
        with self.locked():
            self._set_usage_unlocked(usage)

    def _set_usage_unlocked(self, usage: Iterable[tuple[Entry, int]]) -> None:
        # Only the two usage fields are written: the owner may clear the in-use byte meanwhile
        # (:meth:`release`), and a whole-slot write would bring its reservation back.
        for e, used in usage:
            current = self._read_slot(e.slot)
            if current is None or current.pid != e.pid or current.task_id != _fit(e.task_id, 48):
                continue
            offset = _HEADER_SIZE + e.slot * _SLOT.size
            _INT64.pack_into(self._map, offset + _USED_AT, used)
            _INT64.pack_into(self._map, offset + _PEAK_AT, max(current.peak_used_bytes, used))

    def close(self) -> None:
        """Unmap and close this process's handles."""
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        self._close_lock()
