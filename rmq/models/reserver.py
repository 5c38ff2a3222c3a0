"""Model loads admitted through the worker's ledger, in a pool process (``docs/design.md#models``).

A load reserves the model's size in the ledger before the loader runs and keeps it while the
model is resident. The order, when the load does not fit:

1. this process unloads its own least recently used models, only as much as is missing
   (``relieve(shortfall)``, counted as evictions by ``"admission"``);
2. it waits for a governor reading taken after that unload (a stale reading still counts the
   unloaded memory: asking the other processes on it would make them unload for nothing);
3. it asks the other pool processes (``Ledger.request_unload``, relayed by the governor), again
   each second while a fresh reading still says no, until ``timeout_s``.

Resident models are admitted against the *unload line* (``rmq_unload_ratio`` x budget), not
the task admit line above it: a model is not transient memory, and one admitted above the unload
line would be unloaded by the governor's pressure ladder as soon as it became unleased. A model
that cannot fit even beside an idle worker raises :class:`~rmq.core.errors.ModelLoadError` at once.
A load that finds every slot of the ledger held waits the same way (unloading frees slots).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rmq.core import forks
from rmq.core.errors import ModelLoadError
from rmq.core.ledger import KIND_MODEL, Control, Entry, LedgerFull, Reserved
from rmq.core.selfmem import own_rss_bytes
from rmq.core.units import format_bytes
from rmq.memory.admission import Need, Verdict, judge

__all__ = ["LedgerModelReserver"]


class LedgerModelReserver:
    """The model cache's :class:`~rmq.models.admission.Reserver` in a governed worker.

    Args:
        rt: the worker's :class:`~rmq.core.runtime.Runtime` (its ``ledger`` and ``config``).
        poll_s: how often a waiting load re-checks the ledger (default 0.05 s).
        ask_every_s: how often a waiting load asks the other processes again (default 1 s).
        clock: monotonic clock (tests).
    """

    def __init__(
        self,
        rt: Any,
        poll_s: float = 0.05,
        ask_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rt = rt
        self.poll_s = poll_s
        self.ask_every_s = ask_every_s
        self.clock = clock
        self._held: dict[str, Entry] = {}

    def line_bytes(self, control: Control) -> int:
        """The most memory the worker may use with a new model in it: the unload line."""
        return min(control.admit_line_bytes, int(control.budget_bytes * self.rt.config.unload_ratio))

    def _try(self, key: str, size_bytes: int) -> Verdict:
        ledger = self.rt.ledger
        # measured right before the load, after any unloading here: the governor counts the
        # growth from this figure as the model's memory in use
        entry = Entry(KIND_MODEL, forks.pid(), size_bytes, task_id=key, name=key, start_rss=own_rss_bytes())
        verdicts: list[Verdict] = []

        def fits(reserved: Reserved) -> bool:
            c = ledger.read_control()
            line = self.line_bytes(c)
            v = judge(Need(size_bytes), reserved, c.worker_bytes, c.idle_bytes, line, c.budget_bytes, c.cpu_slots)
            verdicts.append(v)
            return v.admitted

        try:
            if ledger.try_add(entry, fits):
                self._held[key] = entry
        except LedgerFull as exc:  # no slot now: unload here, ask the others, wait, like memory
            return Verdict(False, False, "ledger", str(exc), size_bytes, 0, ledger.read_control().budget_bytes)
        return verdicts[-1]

    def _fresh_reading(self, after_wall: float, deadline: float) -> None:
        """Wait (until ``deadline``) for a governor reading sampled after ``after_wall``."""
        ledger = self.rt.ledger
        while ledger.read_control().sample_time <= after_wall and self.clock() < deadline:
            time.sleep(self.poll_s)

    def _never(self, key: str, v: Verdict) -> ModelLoadError:
        return ModelLoadError(
            f"cannot load {key.removeprefix('model:')!r}: it needs {format_bytes(v.declared)} but an idle "
            f"worker leaves room for {format_bytes(v.available)} below the unload line "
            f"(rmq_unload_ratio of the {format_bytes(v.budget)} budget)"
        )

    def admit(self, key: str, size_bytes: int, timeout_s: float, relieve: Callable[[int], int]) -> bool:
        """Reserve ``size_bytes`` for ``key``: unload here first, then ask the other processes.

        Args:
            key: ``"model:<name>"``.
            size_bytes: the model's declared or last measured size.
            timeout_s: how long to wait for the other processes.
            relieve: unloads this process's LRU models, called with the bytes missing.

        Returns:
            True once reserved; False if it still did not fit after ``timeout_s``.

        Raises:
            ModelLoadError: the model cannot fit even beside an idle worker.
        """
        deadline = self.clock() + timeout_s
        v = self._try(key, size_bytes)
        if v.admitted:
            return True
        if v.never:
            raise self._never(key, v)
        if relieve(size_bytes - v.available) > 0:
            self._fresh_reading(time.time(), min(deadline, self.clock() + 2.0))
        asked_after = float("-inf")  # wall time of the last request to the other processes
        asked_at = float("-inf")
        while True:
            v = self._try(key, size_bytes)
            if v.admitted:
                return True
            if v.never:
                raise self._never(key, v)
            now = self.clock()
            if now >= deadline:
                return False
            reading = self.rt.ledger.read_control().sample_time
            if reading > asked_after and now - asked_at >= self.ask_every_s:
                # the last request has been seen through a fresh reading and it was not enough
                self.rt.ledger.request_unload(size_bytes - v.available)
                asked_after, asked_at = time.time(), now
            time.sleep(self.poll_s)

    def reserve(self, key: str, size_bytes: int, timeout_s: float) -> bool:
        """Reserve without unloading anything here (see :meth:`admit`)."""
        return self.admit(key, size_bytes, timeout_s, lambda n: 0)

    def release(self, key: str) -> None:
        """Give back ``key``'s reservation (a no-op if it holds none)."""
        entry = self._held.pop(key, None)
        if entry is not None:
            self.rt.ledger.remove(entry)
