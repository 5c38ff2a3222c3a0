"""The autoscaler's Celery glue: ``worker_autoscaler`` (``--autoscale=MAX,MIN``) driven by rmq's policy.

:class:`ResourceAutoscaler` reads the ledger, the governor and the pool on the worker's event loop,
asks :class:`~rmq.memory.scaling.ScalePolicy` for one step and applies it. A chosen idle process is
ended the way billiard's own ``Pool.shrink`` ends one (``terminate_controlled``: SIGTERM,
bookkeeping first), but only after the pool's own records (jobs acked, written or being written to
it) show it holds no task; this runs on the event-loop thread, so no job can be handed to it in
between. billiard turns the SIGTERM into an exit through ``finally`` blocks, so the process runs its
exit hooks (models closed, counters flushed) before it goes; anything it still held in the ledger is
released by the governor. See docs/design.md#autoscaling.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery.worker import state as worker_state
from celery.worker.autoscale import AUTOSCALE_KEEPALIVE, Autoscaler

from rmq.concern import Concern
from rmq.core import procstats
from rmq.core.errors import ConfigError
from rmq.core.exits import exit_with_line
from rmq.core.ledger import KIND_MODEL, KIND_TASK
from rmq.core.runtime import current
from rmq.memory.admission import Need
from rmq.memory.learning import learner
from rmq.memory.scaling import Decision, ProcessReading, Readings, ScalePolicy, check_bounds, check_command_line

__all__ = ["AutoscaleConcern", "ResourceAutoscaler"]

log = logging.getLogger("rmq.celery.autoscale")

#: how often the autoscaler looks (seconds); Celery's timer runs it at this period
TICK_S = 0.5
#: a task message triggers a look at most this often (seconds)
MESSAGE_GAP_S = 0.2
#: how many recent grow/shrink changes the state keeps
HISTORY = 10


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
            memory = max(self.rt.config.default_task_memory, learner(self.rt).learned(req.name))
        return Need(memory, decl.cpu_slots)

    def readings(self, now: float) -> Readings:
        """Build :class:`Readings` from the ledger, the governor and the pool (main process)."""
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
