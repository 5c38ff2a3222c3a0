"""Resource-aware autoscaling of the prefork pool (SPEC C10).

:class:`ScalePolicy` is the policy, pure and fed with readings: grow by one process while
due work waits, the admit line has room for a waiting task's declaration (plus a new
process's own memory) and declared CPU slots are free, never above MAX; shrink processes
idle for the keep-alive, and at once in the pause (or kill) zone, idle processes holding
the most unpinned model memory first; never below MIN, never a busy process.

:class:`ResourceAutoscaler` is the Celery glue (``worker_autoscaler``, ``--autoscale=MAX,MIN``):
it reads the ledger, the governor and the pool on the worker's event loop and applies
the decision. A chosen idle process is ended the way billiard's own ``Pool.shrink`` ends
one (``terminate_controlled``: SIGTERM, bookkeeping first), but only after the pool's
own records (jobs acked, written or being written to it) show it holds no task; this runs
on the event-loop thread, so no job can be handed to it in between. billiard turns the
SIGTERM into an exit through ``finally`` blocks, so the process runs its exit hooks (models
closed, counters flushed) before it goes; anything it still held in the ledger is released
by the governor.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.worker import state as worker_state
from celery.worker.autoscale import AUTOSCALE_KEEPALIVE, Autoscaler

from rmq.concern import Concern
from rmq.memory.admission import Need
from rmq.core.errors import ConfigError, exit_with_line
from rmq.core.units import format_bytes as fb

__all__ = [
    "Decision",
    "ProcessReading",
    "Readings",
    "ResourceAutoscaler",
    "ScalePolicy",
    "check_bounds",
    "check_command_line",
    "AutoscaleConcern",
    "parse_autoscale",
]

log = logging.getLogger("rmq.celery.autoscale")

#: how often the autoscaler looks (seconds); Celery's timer runs it at this period
TICK_S = 0.5
#: a task message triggers a look at most this often (seconds)
MESSAGE_GAP_S = 0.2
#: how many recent grow/shrink changes the state keeps
HISTORY = 10


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
        admit_line_bytes / worker_bytes / unused_reserved_bytes: admission figures (C2).
        cpu_slots / cpu_slots_used: declared CPU slots (C4).
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
    """``"MAX,MIN"`` -> (max, min); raises ConfigError for negatives, MAX < MIN or junk."""
    parts = value.split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--autoscale must be MAX,MIN with whole numbers, got {value!r}") from None
    if len(numbers) == 1:
        numbers.append(0)
    if len(numbers) != 2:
        raise ConfigError(f"--autoscale must be MAX,MIN, got {value!r}")
    high, low = numbers
    if high < 1 or low < 0:
        raise ConfigError(f"--autoscale needs MAX >= 1 and MIN >= 0, got {value!r}")
    if high < low:
        raise ConfigError(f"--autoscale MAX must not be below MIN, got {value!r}")
    return high, low


def check_command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """For a ``celery ... worker`` command line, exit 2 with one line on a bad ``--autoscale``.

    Celery's own parsing sorts ``1,6`` into ``6,1`` and crashes with a traceback on ``a,b``;
    this reads the value as typed. Call it before Celery parses the worker's options
    (``rmq.install``) or when the worker is built (:class:`AutoscaleConcern`).
    """
    argv = list(sys.argv if argv is None else argv)
    if "worker" not in argv[1:]:
        return
    for raw in _raw_values(argv, os.environ if environ is None else environ):
        try:
            parse_autoscale(raw)
        except ConfigError as exc:
            exit_with_line(str(exc), now=True)


# -- Celery glue -----------------------------------------------------------------------


class ResourceAutoscaler(Autoscaler):
    """Celery's ``worker_autoscaler`` driven by :class:`ScalePolicy` and rmq's readings.

    Celery's ``keepalive`` is only the period of the timer that calls :meth:`maybe_scale`
    here (:data:`TICK_S`); the idle keep-alive is ``rmq_autoscale_keepalive``
    (``idle_keepalive_s``). Outside a governed worker, or on a pool other than prefork, it
    behaves like Celery's.
    """

    def __init__(self, pool: Any, max_concurrency: int, min_concurrency: int = 0, worker: Any = None,
                 keepalive: float = AUTOSCALE_KEEPALIVE, mutex: Any = None,
                 policy: ScalePolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            check_bounds(max_concurrency, min_concurrency)
        except ConfigError as exc:
            exit_with_line(str(exc), now=True)
        from rmq.core.runtime import current

        self.rt = current()
        self.idle_keepalive_s = self.rt.config.autoscale_keepalive if self.rt is not None else keepalive
        super().__init__(pool, max_concurrency, min_concurrency, worker=worker,
                         keepalive=TICK_S if self.rt is not None else keepalive, mutex=mutex)
        self.policy = policy or ScalePolicy()
        self.clock = clock
        self._last_busy: dict[int, float] = {}
        self._writes: dict[int, int] = {}
        self._busy_before: dict[int, bool] = {}
        self._last_look = float("-inf")
        self._state: dict[str, Any] = {"decision": "hold", "reason": "not started", "time": time.time(),
                                       "last_change": None, "changes": [], "grown": 0, "shrunk": 0}

    # the step ---------------------------------------------------------------------
    def _maybe_scale(self, req: Any = None) -> bool:
        bp = self._billiard()
        if self.rt is None or not (isinstance(getattr(bp, "_pool", None), list) and hasattr(bp, "_processes")):
            return bool(super()._maybe_scale(req))  # not governed, or not a prefork pool
        now = self.clock()
        if req is not None and now - self._last_look < MESSAGE_GAP_S:
            return False
        self._last_look = now
        readings = self.readings(now)
        decision = self.policy.decide(readings)
        if decision.action == "shrink":
            ended = tuple(self._end(decision.pids))
            decision = (Decision("shrink", decision.reason, len(ended), ended) if ended
                        else Decision("hold", f"{decision.reason}: none was idle any more"))
        self._record(decision, readings)
        if decision.action == "grow":
            log.info("rmq autoscaler: +1 process (%s)", decision.reason)
            self.scale_up(1)
        elif decision.action == "shrink":
            log.info("rmq autoscaler: -%d process(es) %s (%s)", decision.count, list(decision.pids), decision.reason)
        return decision.action != "hold"

    def update(self, max: int | None = None, min: int | None = None) -> Any:
        """Remote-control ``autoscale MAX MIN``: refused (ValueError) when the bounds are bad."""
        try:
            check_bounds(self.max_concurrency if max is None else max, self.min_concurrency if min is None else min)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return super().update(max, min)

    # readings ---------------------------------------------------------------------
    def _billiard(self) -> Any:
        return getattr(self.pool, "_pool", None)

    def _process_objects(self) -> list[Any]:
        bp = self._billiard()
        procs = list(getattr(bp, "_pool", None) or [])
        return [p for p in procs if p.pid and not getattr(p, "_controlled_termination", False)]

    def _pool_busy(self, proc: Any) -> bool:
        """The pool's own view: a job acked by, written to or being written to ``proc``."""
        bp = self._billiard()
        if bp is None:
            return True
        if getattr(proc, "inqW_fd", None) in getattr(bp, "_busy_workers", ()):
            return True
        for job in list(getattr(bp, "_cache", {}).values()):
            if proc.pid in job.worker_pids() or job._write_to is proc or job._scheduled_for is proc:
                return True
        return False

    def _need(self, req: Any) -> Need:
        decl = getattr(getattr(req, "task", None), "rmq", None)
        if decl is None or self.rt is None:
            return Need(0)
        memory = decl.memory_bytes
        if memory is None:
            memory = max(self.rt.config.default_task_memory, self.rt.learner.learned(req.name))
        return Need(memory, decl.cpu_slots)

    def readings(self, now: float) -> Readings:
        """Build :class:`Readings` from the ledger, the governor and the pool (main process)."""
        from rmq.core import procstats
        from rmq.core.ledger import KIND_MODEL, KIND_TASK

        rt = self.rt
        assert rt is not None
        control = rt.ledger.read_control()
        entries = rt.ledger.entries()
        admitted = {e.pid for e in entries if e.kind == KIND_TASK}
        active = list(worker_state.active_requests)
        running_pids = {r.worker_pid for r in active if r.worker_pid}
        gauges = {pid: d.get("gauges", {}) for pid, d in procstats.read_all(rt.runtime_dir).items()}
        last = getattr(rt.governor, "last", None)
        private = dict(last.children) if last is not None else {}
        write_stats = getattr(self._billiard(), "write_stats", None) or {}
        procs, seen, inflight = [], set(), 0
        for proc in self._process_objects():
            pid = proc.pid
            seen.add(pid)
            writes = write_stats.get(getattr(proc, "index", None), 0)
            handed = self._pool_busy(proc)
            inflight += handed and pid not in running_pids and pid not in admitted
            busy = pid in admitted or pid in running_pids or handed
            # busy at the last look, or handed a job since: it may have been busy until now
            if busy or self._busy_before.get(pid, True) or writes != self._writes.get(pid, writes):
                self._last_busy[pid] = now
            self._writes[pid], self._busy_before[pid] = writes, busy
            unpinned = pinned = 0
            models = gauges.get(pid, {}).get("models")
            if models is not None:
                for m in models:
                    if m.get("pinned"):
                        pinned += int(m.get("size_bytes", 0))
                    else:
                        unpinned += int(m.get("size_bytes", 0))
            else:
                unpinned = sum(e.memory_bytes for e in entries if e.kind == KIND_MODEL and e.pid == pid)
            procs.append(ProcessReading(pid, busy, now - self._last_busy[pid], unpinned, pinned, private.get(pid, 0)))
        for gone in set(self._last_busy) - seen:
            for table in (self._last_busy, self._writes, self._busy_before):
                table.pop(gone, None)
        # reserved, not accepted: some are being handed to a process (in flight), the rest wait.
        # The set has no order: assume the largest needs are the ones already taken (conservative).
        started = set(active)
        pending = sorted((self._need(r) for r in list(worker_state.reserved_requests) if r not in started),
                         key=lambda n: -n.memory_bytes)
        starting = [self._need(r) for r in active if r.worker_pid not in admitted] + pending[:inflight]
        waiting = pending[inflight:]
        # what a process costs by itself: its private memory less its models and its task's growth
        used = {e.pid: e.used_bytes for e in entries if e.kind == KIND_TASK}
        base = [max(0, private[p.pid] - p.unpinned_model_bytes - p.pinned_model_bytes - used.get(p.pid, 0))
                for p in procs if p.pid in private]
        return Readings(
            current=self.processes, min_procs=self.min_concurrency, max_procs=self.max_concurrency,
            processes=procs, waiting=waiting, starting=starting,
            admit_line_bytes=control.admit_line_bytes, worker_bytes=control.worker_bytes,
            unused_reserved_bytes=sum(e.unused_bytes for e in entries),
            cpu_slots=control.cpu_slots or 1,
            cpu_slots_used=sum(e.cpu_slots for e in entries if e.kind == KIND_TASK),
            zone=control.zone, new_process_bytes=int(statistics.median(base)) if base else 0,
            keepalive_s=self.idle_keepalive_s,
        )

    # acting -----------------------------------------------------------------------
    def _end(self, pids: Sequence[int]) -> list[int]:
        """End the idle processes ``pids`` (each re-checked), as billiard's ``shrink`` does."""
        bp = self._billiard()
        by_pid = {p.pid: p for p in self._process_objects()}
        ended = []
        for pid in pids:
            proc = by_pid.get(pid)
            if self.processes <= self.min_concurrency:
                break
            if proc is None or self._pool_busy(proc):
                continue
            bp._processes -= 1
            if bp._putlock is not None:
                bp._putlock.shrink()
            proc.terminate_controlled()
            bp.on_shrink(1)
            ended.append(pid)
        return ended

    def _record(self, d: Decision, r: Readings) -> None:
        state = self._state
        state.update(decision=d.action, reason=d.reason, time=time.time(), backlog=len(r.waiting),
                     busy=sum(p.busy for p in r.processes), zone=r.zone)
        if d.action != "hold":
            change = {"action": d.action, "count": d.count, "pids": list(d.pids), "reason": d.reason,
                      "time": state["time"]}
            state["last_change"] = change
            state["changes"] = [*state["changes"][-(HISTORY - 1):], change]
            state["grown" if d.action == "grow" else "shrunk"] += d.count

    def info(self) -> dict[str, Any]:
        """Celery's figures (``max``, ``min``, ``current``, ``qty``) plus rmq's last decision and why."""
        out = dict(super().info())
        out.update(self._state, keepalive_s=self.idle_keepalive_s)
        return out


class AutoscaleConcern(Concern):
    """Refuses bad ``--autoscale`` values before the pool forks (exit 2, one line) and shows the
    autoscaler's state in the snapshot under ``autoscaler``."""

    name = "autoscaler"

    def worker_boot(self, rt: Any, worker: Any) -> None:
        if not getattr(worker, "autoscale", None):
            return
        check_command_line()
        try:
            check_bounds(worker.max_concurrency, worker.min_concurrency)
        except ConfigError as exc:
            exit_with_line(str(exc), now=True)

        def part() -> Any:
            scaler = getattr(worker, "autoscaler", None)
            return scaler.info() if scaler is not None else None

        rt.snapshot_parts["autoscaler"] = part
