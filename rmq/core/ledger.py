"""The reservation ledger shared by all processes of one worker, and the governor's control block.

One file, memory-mapped by every process of the worker: a header the governor writes
(its latest readings and the unload signal) and a table of reservations (running tasks,
resident models). Changes to the table happen under an ``fcntl.flock`` taken on a lock
file that each process opens itself, so the kernel releases it when a holder is
SIGKILLed (a multiprocessing/billiard Lock would stay locked forever). A flock belongs to the
open file, which all threads of a process share, so the lock also takes a per-process
``threading.Lock`` first (made again in a forked child). Reservations of
dead processes are released by the governor (:meth:`Ledger.release_dead`). Where each figure
sits in the file, and the records it decodes to, is :mod:`rmq.core.ledger_layout`.
See docs/design.md#ledger.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rmq.core import forks, ledger_layout
from rmq.core.ledger_layout import (
    HEADER_SIZE,
    KIND_MODEL,
    KIND_TASK,
    MAGIC,
    PEAK_AT,
    REQUEST_OFFSET,
    SLOT,
    SLOTS,
    SUMMED,
    TASK_ID_AT,
    USED_AT,
    ZONES,
    Control,
    Entry,
    LedgerFull,
    Reserved,
    fit,
    flags_of,
    read_slot,
    size_of,
    slots_for,
    slots_in,
    write_slot,
)

# The records are part of the ledger's API: callers import them from here, not from ledger_layout.
__all__ = ["Ledger", "Entry", "Control", "Reserved", "LedgerFull", "KIND_TASK", "KIND_MODEL", "slots_for"]

# The structs whose methods run per task are bound here by assignment: CPython 3.11 compiles a method
# call on a name bound by ``import`` as an attribute load and a call (it takes the name for a module),
# which builds a bound method each time (+50 ns per call, measured).
_HEADER = ledger_layout.HEADER
_REQUEST = ledger_layout.REQUEST
_OWNER = ledger_layout.OWNER
_INT64 = ledger_layout.INT64


class _Lock:
    """``with``-able lock that excludes the other processes (an exclusive ``flock`` on a descriptor of
    this process's own) and the other threads of this process (a ``threading.Lock``, taken first:
    threads share the descriptor, and a flock does not exclude its own holder). Not re-entrant.
    Cheaper than a generator context manager."""

    __slots__ = ("path", "fd", "mutex")

    def __init__(self, path: str) -> None:
        self.path = path
        self.mutex = threading.Lock()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # made at a fork, maybe after the runtime directory went: open on first use
            self.fd = -1

    def _opened(self) -> int:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self.fd

    def __enter__(self) -> None:
        self.mutex.acquire()
        try:
            fcntl.flock(self._opened(), fcntl.LOCK_EX)
        except BaseException:
            self.mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.mutex.release()

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock if it can be had within ``timeout_s`` (0: only if free now); ``False``, holding
        nothing, when another holder keeps it longer. Released with ``__exit__``."""
        deadline = time.monotonic() + timeout_s
        if not self.mutex.acquire(timeout=max(0.0, timeout_s)):
            return False
        try:
            fd = self._opened()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        self.mutex.release()
                        return False
                    time.sleep(0.0005)
        except BaseException:
            self.mutex.release()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class Ledger:
    """The shared table of reservations of one worker.

    Args:
        directory: the worker's runtime directory (tmpfs when available).
        create: True in the worker's main process (makes and zeroes the file).
        slots: how many reservations the file holds, when ``create`` (default and least 128; see
            :func:`slots_for`); a process that opens an existing file reads it from the file's size.
    """

    def __init__(self, directory: str, create: bool = False, slots: int = SLOTS) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "ledger")
        self.lock_path = os.path.join(directory, "ledger.lock")
        if create:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with open(self.path, "wb") as fh:
                fh.write(MAGIC + b"\0" * (size_of(max(SLOTS, slots)) - len(MAGIC)))
            open(self.lock_path, "a").close()
        fd = os.open(self.path, os.O_RDWR)
        try:
            self.slots = slots_in(os.fstat(fd).st_size)
            self._map = mmap.mmap(fd, size_of(self.slots), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._flags = flags_of(self.slots)  # the in-use byte of every slot
        self._lock = _Lock(self.lock_path)  # this process's lock, on a descriptor of its own
        forks.forget_in_children(self)

    # locking -------------------------------------------------------------
    def _forget_inherited(self) -> None:
        # An inherited descriptor shares the parent's open file, and with it the parent's flock:
        # each process locks through a descriptor of its own. The thread lock is made again too:
        # a parent thread may have held it at the fork, and that thread does not exist here.
        self._lock.close()
        self._lock = _Lock(self.lock_path)

    def locked(self) -> _Lock:
        """``with ledger.locked():`` holds the ledger's lock against the other processes and the other
        threads of this one (released by the kernel if this process dies). Not re-entrant."""
        return self._lock

    @contextmanager
    def locked_within(self, timeout_s: float) -> Iterator[bool]:
        """``with ledger.locked_within(t) as locked:`` the lock when it can be had within ``t`` s, else
        nothing (``locked`` False). For the governor, which must act even while a pool process holds
        the lock and cannot let it go: stopped by the kernel at the pools' cap on a page it touched
        under the lock, it waits for the very kill the governor would wait for the lock to make."""
        got = self._lock.acquire(timeout_s)
        try:
            yield got
        finally:
            if got:
                self._lock.__exit__()

    # control block -------------------------------------------------------
    def read_control(self) -> Control:
        """The governor's latest readings (no lock: a single writer)."""
        v = _HEADER.unpack_from(self._map, 0)
        # unload generation, unload bytes, worker bytes, budget, admit line, idle bytes, sample time
        # (the ignore: mypy cannot count the items of a slice)
        return Control(*v[1:8], ZONES[v[8]] if 0 <= v[8] < len(ZONES) else "ok", v[9], bool(v[10]))  # type: ignore[call-arg]

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
            MAGIC,
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
            generation, _ = _REQUEST.unpack_from(self._map, REQUEST_OFFSET)
            _REQUEST.pack_into(self._map, REQUEST_OFFSET, generation + 1, bytes_wanted)

    def read_unload_request(self) -> tuple[int, int]:
        """``(generation, bytes)`` of the latest request from a pool process."""
        generation, wanted = _REQUEST.unpack_from(self._map, REQUEST_OFFSET)
        return generation, wanted

    # table ---------------------------------------------------------------
    def entries_unlocked(self) -> list[Entry]:
        """All reservations; call under :meth:`locked` for a consistent view."""
        flags = self._map[self._flags]  # the in-use byte of every slot: a C-speed slice, not a loop
        out = []
        i = flags.find(1)
        while i >= 0:
            e = read_slot(self._map, i)
            if e is not None:
                out.append(e)
            i = flags.find(1, i + 1)
        return out

    def reserved_unlocked(self) -> Reserved:
        """The sums over all reservations, read without decoding them; call under :meth:`locked`."""
        m = self._map
        flags = m[self._flags]
        unpack, size, find = SUMMED.unpack_from, SLOT.size, flags.find  # locals: this runs per task, per slot
        n = unused = cpu = disk = models = 0
        i = find(1)
        while i >= 0:
            kind, memory, slots, disk_bytes, used, peak = unpack(m, HEADER_SIZE + i * size)
            n += 1
            if kind == KIND_MODEL:
                unused += max(0, memory - peak)  # ledger_layout._unused, inlined
                models += memory
            else:
                unused += max(0, memory - used)
            cpu += slots
            disk += disk_bytes
            i = find(1, i + 1)
        return Reserved(n, unused, cpu, disk, models)

    def entries(self) -> list[Entry]:
        """All reservations, read under the lock."""
        with self.locked():
            return self.entries_unlocked()

    def running(self, task_id: str, other_than: int = -1) -> bool:
        """Whether a process other than ``other_than`` holds a task reservation for ``task_id``."""
        key = fit(task_id, 48)
        return any(e.kind == KIND_TASK and e.task_id == key and e.pid != other_than for e in self.entries())

    def holds_unlocked(self, e: Entry) -> bool:
        """Whether ``e``'s slot still holds ``e`` (same process, same task id); call under :meth:`locked`
        so that nothing new is admitted before the caller acts on the answer."""
        current = read_slot(self._map, e.slot) if e.slot >= 0 else None
        return current is not None and current.pid == e.pid and current.task_id == fit(e.task_id, 48)

    def add_unlocked(self, e: Entry) -> Entry:
        """Store a reservation (caller holds the lock); returns it with its slot."""
        i = self._map[self._flags].find(0)
        if i < 0:
            raise LedgerFull(f"the ledger has no free slot ({self.slots} reservations)")
        e.slot = i
        task_id, name = e.task_id, e.name
        # fit() inlined for what nearly every task has, an ASCII id and name that fit (run per task)
        if not (len(task_id) <= 48 and task_id.isascii()):
            e.task_id = fit(task_id, 48)
        if not (len(name) <= 96 and name.isascii()):
            e.name = fit(name, 96)
        if not e.started:
            e.started = time.time()
        write_slot(self._map, i, e)
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
            current = read_slot(self._map, e.slot)
            if current is not None and current.pid == e.pid and current.task_id == fit(e.task_id, 48):
                write_slot(self._map, e.slot, e)

    def remove(self, e: Entry) -> Entry | None:
        """Release one reservation; returns it as stored (with the governor's readings), or None if
        it was already gone."""
        with self.locked():
            current = read_slot(self._map, e.slot)
            if current is not None and current.pid == e.pid and current.task_id == fit(e.task_id, 48):
                write_slot(self._map, e.slot, None)
                return current
        return None

    def release(self, e: Entry) -> int | None:
        """Release a reservation this process added, without the lock; returns the peak use the
        governor recorded for it, or None if it was already gone.

        Only its owner releases a live reservation (the governor drops those of dead processes),
        and the governor's usage writes leave a slot's in-use byte alone, so clearing that one byte
        races with no other writer: a reader under the lock sees the reservation whole or gone.
        """
        offset = HEADER_SIZE + e.slot * SLOT.size
        in_use, _, pid = _OWNER.unpack_from(self._map, offset)
        start = offset + TASK_ID_AT
        if not in_use or pid != e.pid or self._map[start : start + 48].rstrip(b"\0") != e.task_id.encode():
            return None
        peak: int = _INT64.unpack_from(self._map, offset + PEAK_AT)[0]
        self._map[offset] = 0
        return peak

    def release_dead(self, alive: Callable[[int], bool]) -> list[Entry]:
        """Drop reservations whose process is gone; returns what was dropped."""
        with self.locked():
            return self.release_dead_unlocked(alive)

    def release_dead_unlocked(self, alive: Callable[[int], bool]) -> list[Entry]:
        """:meth:`release_dead`, for a caller that holds the lock."""
        dropped = []
        for e in self.entries_unlocked():
            if not alive(e.pid):
                write_slot(self._map, e.slot, None)
                dropped.append(e)
        return dropped

    def publish(self, control: Control, usage: Iterable[tuple[Entry, int]]) -> None:
        """Write the governor's readings and the usage of each reservation in one locked step,
        so admission never pairs a new usage figure with an old memory reading."""
        with self.locked():
            self.publish_unlocked(control, usage)

    def publish_unlocked(self, control: Control, usage: Iterable[tuple[Entry, int]]) -> None:
        """:meth:`publish`, for a caller that holds the lock."""
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
            current = read_slot(self._map, e.slot)
            if current is None or current.pid != e.pid or current.task_id != fit(e.task_id, 48):
                continue
            offset = HEADER_SIZE + e.slot * SLOT.size
            _INT64.pack_into(self._map, offset + USED_AT, used)
            _INT64.pack_into(self._map, offset + PEAK_AT, max(current.peak_used_bytes, used))

    def close(self) -> None:
        """Unmap and close this process's handles."""
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        self._lock.close()
