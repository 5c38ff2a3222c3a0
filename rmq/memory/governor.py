"""The governor: samples the worker's memory and walks the pressure ladder. No Celery here.

It runs in the worker's main process, on its own thread so that a busy event loop cannot
delay a kill. What it does to the worker goes through an :class:`Actuator` (pause and
resume fetching, kill a pool process, list the pool's pids), which the bootstep
implements on top of Celery and unit tests implement with fakes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from rmq.core.config import RmqConfig
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger
from rmq.core.periodic import PeriodicThread
from rmq.memory.budget import Budget
from rmq.memory.meter import ProcessTreeMeter, TreeReading
from rmq.memory.pressure import Ladder
from rmq.memory.treekill import TreeKiller, reap_pid, send_signal

__all__ = ["Governor", "Actuator", "KillRecord"]

log = logging.getLogger("rmq.memory.governor")

#: kills the snapshot lists (``memory.recent_kills``), newest last; older ones stay counted in ``killed``
RECENT_KILLS = 20


class Actuator(Protocol):
    """What the governor may do to the worker."""

    def pool_pids(self) -> list[int]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def kill(self, pid: int) -> None: ...


@dataclass
class KillRecord:
    """A task the governor killed, for the request handler in the main process."""

    task_id: str
    task_name: str
    pid: int
    observed_bytes: int
    declared_bytes: int
    budget_bytes: int
    detected_at: float
    killed_at: float


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Governor:
    """Keeps one worker inside its memory budget."""

    def __init__(
        self,
        config: RmqConfig,
        budget: Budget,
        ledger: Ledger,
        actuator: Actuator,
        meter: ProcessTreeMeter | None = None,
        cpu_slots: int = 1,
        clock: Callable[[], float] = time.monotonic,
        alive: Callable[[int], bool] = _alive,
        signal_pid: Callable[[int, int], None] | None = None,
        reap: Callable[[int], bool] | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.ledger = ledger
        self.actuator = actuator
        self.meter = meter or ProcessTreeMeter(os.getpid(), config.uss_interval)
        self.cpu_slots = cpu_slots
        self.clock = clock
        self.alive = alive
        self.ladder = Ladder(
            budget.budget_bytes,
            config.unload_ratio,
            config.unload_target_ratio,
            config.pause_ratio,
            config.resume_ratio,
            config.kill_ratio,
        )
        self.admit_line = budget.line(config.admit_ratio)
        self.kills: dict[str, KillRecord] = {}
        #: the last kills with their figures, for people (``kills`` is consumed by the request handler)
        self.recent_kills: deque[dict[str, Any]] = deque(maxlen=RECENT_KILLS)
        self.counters: dict[str, Any] = {"killed": 0, "unload_requests": 0, "pauses": 0, "dead_released": 0,
                                         "strays_killed": 0, "reaped": 0}
        #: ends killed tasks' whole trees, and reaps what the main process adopted
        self.trees = TreeKiller(self.meter, actuator, self.counters, signal_pid or send_signal, reap or reap_pid)
        self.last: TreeReading | None = None
        self.zone = "ok"
        self.paused = False
        self.peak_bytes = 0
        self.idle_bytes = 0
        self.unload_generation = 0
        self.unload_bytes = 0
        self.tick_seconds = 0.0
        self.ticks = 0
        self._killed_pids: dict[int, float] = {}
        self._seen_request = ledger.read_unload_request()[0]
        self._loop = PeriodicThread("rmq-governor", self._timed_tick, self._interval, log, "governor tick")
        self.lock = threading.Lock()

    # the loop --------------------------------------------------------------
    def start(self) -> None:
        """Sample every ``rmq_monitor_interval`` on a daemon thread."""
        self._loop.start()

    def stop(self) -> None:
        """Stop the loop (waits for the current tick)."""
        self._loop.stop()

    def _interval(self) -> float:
        # under pressure, sample faster so a runaway task overshoots less before the kill
        return self.config.monitor_interval if self.zone == "ok" else min(self.config.monitor_interval, 0.05)

    def _timed_tick(self) -> None:
        started = time.perf_counter()
        try:
            self.tick()
        finally:
            self.tick_seconds += time.perf_counter() - started
            self.ticks += 1

    # one step --------------------------------------------------------------
    def tick(self) -> None:
        """Sample, publish readings, and act on the ladder."""
        now = self.clock()
        pids = self.actuator.pool_pids()
        reading = self.meter.sample(pids)
        worker_bytes = reading.worker_bytes
        if self.budget.cgroup is not None:
            working_set = self.budget.cgroup.working_set_bytes()
            if working_set is not None:
                worker_bytes = max(worker_bytes, working_set)
        self.trees.tidy(reading, now)
        dropped = self.ledger.release_dead(self.alive)
        if dropped:
            self.counters["dead_released"] += len(dropped)
            log.warning("rmq released %d reservation(s) of dead processes: %s", len(dropped),
                        ", ".join(f"{e.name}[{e.task_id}] pid {e.pid}" for e in dropped))
        entries = self.ledger.entries()
        usage = []
        for e in entries:
            if e.pid in reading.rss:  # the pool process's growth, and everything its task started
                usage.append((e, max(0, reading.rss[e.pid] - e.start_rss) + reading.tree_bytes(e.pid)))
        for e, used in usage:
            e.used_bytes = used
            e.peak_used_bytes = max(e.peak_used_bytes, used)
        tasks = [e for e in entries if e.kind == KIND_TASK]
        if not tasks:
            models = sum(e.memory_bytes for e in entries if e.kind == KIND_MODEL)
            self.idle_bytes = max(0, worker_bytes - models)
        with self.lock:
            self.last = reading
            self.peak_bytes = max(self.peak_bytes, worker_bytes)
        step = self.ladder.update(worker_bytes, now)
        self.zone = step.zone
        unload_bytes = step.unload_bytes
        request_generation, requested = self.ledger.read_unload_request()
        if request_generation != self._seen_request:
            self._seen_request = request_generation
            unload_bytes = max(unload_bytes, requested)
        if step.unload or unload_bytes > step.unload_bytes:
            self.unload_generation += 1
            self.unload_bytes = unload_bytes  # kept with its generation, not rewritten each tick
            self.counters["unload_requests"] += 1
        self.ledger.publish(
            Control(
                unload_generation=self.unload_generation,
                unload_bytes=self.unload_bytes,
                worker_bytes=worker_bytes,
                budget_bytes=self.budget.budget_bytes,
                admit_line_bytes=self.admit_line,
                idle_bytes=self.idle_bytes,
                sample_time=time.time(),
                zone=step.zone,
                cpu_slots=self.cpu_slots,
                paused=self.ladder.paused,
            ),
            usage,
        )
        if step.pause:
            self.paused = True
            self.counters["pauses"] += 1
            log.warning("rmq pausing: worker memory %d bytes is %.0f%% of the budget",
                        worker_bytes, 100 * worker_bytes / self.budget.budget_bytes)
            self.actuator.pause()
        elif step.resume:
            self.paused = False
            log.warning("rmq resuming: worker memory back to %.0f%% of the budget",
                        100 * worker_bytes / self.budget.budget_bytes)
            self.actuator.resume()
        if step.kill:
            self._kill_one(tasks, reading, worker_bytes, now)

    def _kill_one(self, tasks: list[Entry], reading: TreeReading, worker_bytes: int, now: float) -> None:
        # a process already killed is still counted until the pool reaps it: don't kill a second
        # one for the same excess within one interval
        for pid, at in list(self._killed_pids.items()):
            if pid not in reading.rss or now - at > 60:
                del self._killed_pids[pid]
        if any(now - at < 2.0 for at in self._killed_pids.values()):
            return
        main = os.getpid()
        candidates = [e for e in tasks if e.pid in reading.rss and e.pid != main and e.pid not in self._killed_pids]
        if not candidates:
            log.error("rmq: worker memory at %.0f%% of the budget and no governed task to kill",
                      100 * worker_bytes / self.budget.budget_bytes)
            return
        worst = max(candidates, key=lambda e: e.used_bytes - e.memory_bytes)
        if worst.used_bytes - worst.memory_bytes <= 0:
            worst = max(candidates, key=lambda e: e.started)
        # The choice was made on the ledger as read at the start of the tick: the task may have ended
        # since and its process taken the next one. Check, and kill, under the ledger's lock, so that
        # no new reservation is admitted in between; a stale choice waits for the next tick's reading.
        # The record is kept before the kill: the request handler looks for it once the pool notices.
        with self.ledger.locked():
            current = self.ledger.holds_unlocked(worst)
            if current:
                record = self.kills[worst.task_id] = KillRecord(
                    task_id=worst.task_id,
                    task_name=worst.name,
                    pid=worst.pid,
                    observed_bytes=reading.rss.get(worst.pid, 0) + reading.tree_bytes(worst.pid),
                    declared_bytes=worst.memory_bytes,
                    budget_bytes=self.budget.budget_bytes,
                    detected_at=now,
                    killed_at=self.clock(),
                )
                ended = self.trees.kill(worst.pid, now)
        if not current:
            log.info("rmq: %s[%s] in pid %d ended before its kill; choosing again next tick",
                     worst.name, worst.task_id, worst.pid)
            return
        self._killed_pids[worst.pid] = now
        self.counters["killed"] += 1
        with self.lock:
            self.recent_kills.append({
                "task_id": record.task_id, "task_name": record.task_name, "pid": record.pid,
                "observed_bytes": record.observed_bytes, "declared_bytes": record.declared_bytes,
                "budget_bytes": record.budget_bytes, "worker_bytes": worker_bytes, "time": time.time(),
            })
        log.warning(
            "rmq killing %s[%s] in pid %d%s: worker at %.0f%% of the budget, task uses %d bytes, declared %d",
            worst.name, worst.task_id, worst.pid,
            f" and its {len(ended)} descendant(s) {sorted(ended)}" if ended else "",
            100 * worker_bytes / self.budget.budget_bytes, worst.used_bytes, worst.memory_bytes,
        )

    def pop_kill(self, task_id: str) -> KillRecord | None:
        """The kill record of ``task_id``, if the governor killed it (consumed once)."""
        return self.kills.pop(task_id, None)

    # readings for people --------------------------------------------------
    def memory_snapshot(self) -> dict[str, Any]:
        """The ``memory`` part of the snapshot."""
        control = self.ledger.read_control()
        with self.lock:
            last = self.last
            peak = self.peak_bytes
            recent_kills = list(self.recent_kills)
        budget = self.budget
        cfg = self.config
        vm = psutil.virtual_memory()
        working_set = budget.cgroup.working_set_bytes() if budget.cgroup is not None else None
        return {
            "budget_bytes": budget.budget_bytes,
            "budget_source": budget.source,
            "limit_bytes": budget.limit_bytes,
            "worker_bytes": control.worker_bytes,
            "main_bytes": last.main_bytes if last else 0,
            "children": {str(k): v for k, v in (last.children if last else {}).items()},
            "descendants": {str(k): {str(p): b for p, b in tree.items()}
                            for k, tree in (last.descendants if last else {}).items()},
            "strays": {str(k): v for k, v in (last.strays if last else {}).items()},
            "cgroup_working_set_bytes": working_set,
            "host_total_bytes": vm.total,
            "host_available_bytes": vm.available,
            "peak_bytes": peak,
            "ratio": round(control.worker_bytes / budget.budget_bytes, 4) if budget.budget_bytes else 0,
            "zone": self.zone,
            "admit_line_bytes": self.admit_line,
            "idle_bytes": self.idle_bytes,
            "line_ratios": {"admit": cfg.admit_ratio, "unload": cfg.unload_ratio, "pause": cfg.pause_ratio,
                            "resume": cfg.resume_ratio, "kill": cfg.kill_ratio},
            "oom_kills": budget.cgroup.oom_kills() if budget.cgroup is not None else None,
            "recent_kills": recent_kills,
        }


def kill_pid(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists."""
    send_signal(pid, signal.SIGKILL)
