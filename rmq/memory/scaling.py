"""How many pool processes a worker should run: the autoscaler's policy, pure and fed with readings.

:class:`ScalePolicy` grows the pool by one process while due work waits, the admit line has room
for a waiting task's declaration (plus a new process's own memory) and declared CPU slots are free,
never above MAX; it shrinks processes idle for the keep-alive, and at once in the pause (or kill)
zone, idle processes holding the most unpinned model memory first; never below MIN, never a busy
process. See docs/design.md#autoscaling.

It lives with memory because memory is what it weighs: a waiting task's :class:`Need` against the
admit line, the governor's zone, what a process and its models cost. CPU slots come in as plain
numbers, so this imports nothing beyond ``rmq.core`` and ``rmq.memory``. The Celery side (reading
the pool, ending a process) is ``rmq.celery.autoscale``.

Also here: the checks of ``--autoscale MAX,MIN`` values, which Celery itself sorts or crashes on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rmq.core.errors import ConfigError
from rmq.core.exits import exit_with_line
from rmq.core.units import format_bytes as fb
from rmq.memory.admission import Need

__all__ = [
    "Decision",
    "ProcessReading",
    "Readings",
    "ScalePolicy",
    "check_bounds",
    "check_command_line",
    "parse_autoscale",
]


@dataclass(frozen=True)
class ProcessReading:
    """One pool process. Sizes in bytes, durations in seconds."""

    pid: int
    busy: bool
    idle_s: float = 0.0
    unpinned_model_bytes: int = 0
    pinned_model_bytes: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class Readings:
    """What the policy decides on.

    Attributes:
        current / min_procs / max_procs: pool size now (the pool's target) and the bounds.
        processes: the live pool processes (ones being ended excluded).
        waiting: needs of due work no process has yet (idle processes take the first ones).
        starting: needs of work handed to a process but not yet in the ledger.
        admit_line_bytes / worker_bytes / unused_reserved_bytes: the admission figures
            (docs/design.md#admission).
        cpu_slots / cpu_slots_used: the worker's CPU slots and those declared by running tasks.
        zone: the governor's zone (``ok``, ``unload``, ``pause``, ``kill``).
        new_process_bytes: memory one more idle process costs.
        keepalive_s: idle time after which a process may go.
    """

    current: int
    min_procs: int
    max_procs: int
    processes: Sequence[ProcessReading] = ()
    waiting: Sequence[Need] = ()
    starting: Sequence[Need] = ()
    admit_line_bytes: int = 0
    worker_bytes: int = 0
    unused_reserved_bytes: int = 0
    cpu_slots: int = 1
    cpu_slots_used: int = 0
    zone: str = "ok"
    new_process_bytes: int = 0
    keepalive_s: float = 30.0


@dataclass(frozen=True)
class Decision:
    """``action`` is ``grow``, ``shrink`` or ``hold``; ``pids`` are the processes to end, in order."""

    action: str
    reason: str
    count: int = 0
    pids: tuple[int, ...] = field(default_factory=tuple)


class ScalePolicy:
    """Decides one step from :class:`Readings`. Stateless; no Celery."""

    def decide(self, r: Readings) -> Decision:
        """The next step: shrink under pressure, else grow for fitting backlog, else expire idlers."""
        idle = [p for p in r.processes if not p.busy]
        busy = len(r.processes) - len(idle)
        room_above_min = r.current - r.min_procs
        if r.zone in ("pause", "kill"):
            victims = sorted(idle, key=lambda p: (-p.unpinned_model_bytes, p.pinned_model_bytes,
                                                  -p.memory_bytes, -p.idle_s))[: max(0, room_above_min)]
            if victims:
                freed = sum(p.memory_bytes for p in victims)
                models = sum(p.unpinned_model_bytes for p in victims)
                return Decision("shrink", f"{r.zone} zone: ending {len(victims)} idle process(es) holding "
                                f"{fb(freed)} ({fb(models)} of unpinned models)",
                                len(victims), tuple(p.pid for p in victims))
            why = "all processes busy" if not idle else f"at MIN {r.min_procs}"
            return Decision("hold", f"{r.zone} zone: nothing to end ({why}); not growing")
        grow = self._grow(r, len(idle))
        if grow.action == "grow":
            return grow
        expired = [p for p in idle if p.idle_s >= r.keepalive_s]
        keep = max(r.min_procs, busy + len(r.waiting))
        n = min(len(expired), r.current - keep)
        if n > 0:
            # longest idle first; among equals keep the warm model caches
            victims = sorted(expired, key=lambda p: (-p.idle_s, p.unpinned_model_bytes + p.pinned_model_bytes))[:n]
            return Decision("shrink", f"{n} process(es) idle for {r.keepalive_s:g}s or more",
                            n, tuple(p.pid for p in victims))
        return grow

    @staticmethod
    def _grow(r: Readings, idle: int) -> Decision:
        idle += max(0, r.current - len(r.processes))  # started, not yet seen
        surplus = len(r.waiting) - idle
        if not r.waiting:
            return Decision("hold", "no backlog")
        if surplus <= 0:
            return Decision("hold", f"backlog {len(r.waiting)} served by {idle} idle process(es)")
        if r.current >= r.max_procs:
            return Decision("hold", f"backlog {len(r.waiting)} but at MAX {r.max_procs}")
        room = r.admit_line_bytes - r.worker_bytes - r.unused_reserved_bytes
        free_cpu = r.cpu_slots - r.cpu_slots_used

        def fits(need: Need, extra: int = 0) -> bool:
            return need.memory_bytes + extra <= room and (not need.cpu_slots or need.cpu_slots <= free_cpu)

        # what processes already have (or are about to take) will be admitted first, if it fits
        for need in [*r.starting, *r.waiting[:idle]]:
            if fits(need):
                room -= need.memory_bytes
                free_cpu -= need.cpu_slots
        candidates = r.waiting[idle:]
        for need in candidates:
            if fits(need, r.new_process_bytes):
                return Decision("grow", f"backlog {len(r.waiting)}: {fb(need.memory_bytes)} fits under the admit "
                                f"line ({fb(room)} room, a process costs {fb(r.new_process_bytes)})", 1)
        smallest = min(candidates, key=lambda n: n.memory_bytes)
        if smallest.memory_bytes + r.new_process_bytes > room:
            return Decision("hold", f"backlog {len(r.waiting)}: no room under the admit line (needs "
                            f"{fb(smallest.memory_bytes + r.new_process_bytes)}, {fb(max(0, room))} left)")
        return Decision("hold", f"backlog {len(r.waiting)}: no free CPU slots ({max(0, free_cpu)} free)")


# -- bad --autoscale values ------------------------------------------------------------


def check_bounds(max_procs: Any, min_procs: Any) -> None:
    """Raise :class:`ConfigError` unless ``MAX >= 1``, ``MIN >= 0`` and ``MAX >= MIN`` (whole numbers)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (max_procs, min_procs))
    if not ok or max_procs < 1 or min_procs < 0:
        raise ConfigError(f"--autoscale needs MAX >= 1 and MIN >= 0, got {max_procs},{min_procs}")
    if max_procs < min_procs:
        raise ConfigError(f"--autoscale MAX must not be below MIN, got {max_procs},{min_procs}")


def _raw_values(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    values = []
    for i, a in enumerate(argv):
        if a.startswith("--autoscale="):
            values.append(a.split("=", 1)[1])
        elif a == "--autoscale" and i + 1 < len(argv):
            values.append(argv[i + 1])
    if not values and environ.get("CELERY_WORKER_AUTOSCALE"):  # click's auto_envvar_prefix
        values.append(environ["CELERY_WORKER_AUTOSCALE"])
    return values


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"MAX,MIN"`` -> (max, min), the larger number first as Celery reads it (``1,6`` is ``6,1``);
    raises ConfigError for negatives, a maximum below 1 or junk."""
    parts = value.split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--autoscale must be MAX,MIN with whole numbers, got {value!r}") from None
    if len(numbers) == 1:
        numbers.append(0)
    if len(numbers) != 2:
        raise ConfigError(f"--autoscale must be MAX,MIN, got {value!r}")
    high, low = max(numbers), min(numbers)
    if high < 1 or low < 0:
        raise ConfigError(f"--autoscale needs MAX >= 1 and MIN >= 0, got {value!r}")
    return high, low


def check_command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """For a ``celery ... worker`` command line, exit 2 with one line on a bad ``--autoscale``.

    Celery's own parsing sorts ``1,6`` into ``6,1`` (so does this) and crashes with a traceback on
    ``a,b`` or ``6,-1``; this reads the value as typed. Call it before Celery parses the worker's options
    (``rmq.install``) or when the worker is built (``rmq.celery.autoscale.AutoscaleConcern``).
    """
    argv = list(sys.argv if argv is None else argv)
    if "worker" not in argv[1:]:
        return
    for raw in _raw_values(argv, os.environ if environ is None else environ):
        try:
            parse_autoscale(raw)
        except ConfigError as exc:
            exit_with_line(str(exc), now=True)
