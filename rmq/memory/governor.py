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
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from rmq.core.config import RmqConfig
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger
from rmq.core.periodic import PeriodicThread
from rmq.memory.budget import Budget
from rmq.memory.lines import POLLING, Lines
from rmq.memory.meter import ProcessTreeMeter, TreeReading
from rmq.memory.pool_cgroups import Accounting
from rmq.memory.pressure import Ladder
from rmq.memory.treekill import TreeKiller, reap_pid, send_signal

__all__ = ["Governor", "Actuator", "KillRecord"]

log = logging.getLogger("rmq.memory.governor")

#: how far the main process's share moves before the pools' cap follows it
_REFIT_STEP_BYTES = 1 << 20

#: a dip of the main process's share larger than this is a pool process replaced (see ``_OWN_WINDOW_S``)
_DIP_BYTES = 8 << 20

#: v2: how far under the pools' cap ``memory.high`` throttles them (at least; 2 % of the cap above 400 MiB)
_HIGH_MARGIN_BYTES = 8 << 20

#: how long the main process's largest share counts for the pools' cap: the share dips each time the
#: pool replaces a process (the old one's pages, charged beside the main process, are freed) and
#: comes back as the new one starts; a cap raised into the dip would be filled by the tasks at once,
#: and the main process's share, growing back, would then find the worker's cgroup full
_OWN_WINDOW_S = 3.0

#: the pools this close to their cap count as held: the kernel charges memory in batches (32 pages
#: per CPU, 256 KiB on two), so the count can stop short of the cap, where a wake-up set exactly at
#: it never fires, and the kernel first spends tens of ms reclaiming before it declares the cgroup
#: out of memory
_AT_CAP_BYTES = 512 << 10

#: a killed pool's cgroup holding no more than this above its count at the task's admission has
#: freed the task's memory (what stays is page cache, and the pool process's own start-up)
_FREED_SLACK_BYTES = 8 << 20

#: a cap lowered toward what the pools hold stays this far above their count, read a moment before:
#: written under what they hold by the time of the write, it makes the kernel reclaim in the writing
#: thread (the governor's) until it gives up, 40-160 ms while a runaway grew at 1 GiB/s past a cap one
#: MiB above its count (and once, with a held runaway taking each freed page, for good); the kill
#: went that much later. The worker's own kill line stops the pools meanwhile.
_CAP_SLACK_BYTES = 16 << 20

#: how far the admit line steps down after a kill that found nobody over their reservation (what
#: admission let in did not fit: page cache, interpreters, the pools themselves), and how fast it
#: comes back
_ADMIT_STEP = 32 << 20
_ADMIT_RECOVERY_PER_S = 1 << 20

#: how long, in all, one tick waits for the ledger's lock. Under an OOM hold a pool process may hold
#: it stopped by the kernel, on a page it touched while admitting its task beside pools at their cap;
#: waiting for it, the governor never made the kill that would free it (a burst of five held for
#: good, once in 77 bursts). Past this the tick reads the ledger without the lock, skips what it
#: would write there, and kills without it.
_LOCK_WAIT_S = 0.05

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
    #: what the task alone could have had on the idle worker (admit line minus the idle worker):
    #: a task killed using less was crowded out by its neighbours, and is not out of budget
    room_bytes: int = 0
    #: what woke the governor for this kill ("threshold", "oom", ... or "sample")
    woken_by: str = "sample"
    #: other tasks running when it was killed: alone, a task is never crowded out
    neighbours: int = 0


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
        accounting: Accounting | None = None,
        lines: Lines | None = None,
        events: Any = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.ledger = ledger
        self.actuator = actuator
        self.meter = meter or ProcessTreeMeter(os.getpid(), config.uss_interval)
        self.cpu_slots = cpu_slots
        self.clock = clock
        self.alive = alive
        self.accounting = accounting or Accounting("proc", "not chosen")
        self.pools = self.accounting.pools
        if self.pools is not None:  # a kill ends everything in the pool process's cgroup too
            self.meter.extra_members = self.pools.members
        self.lines = lines or POLLING
        self.ladder = Ladder(
            budget.budget_bytes,
            self.lines.unload,
            self.lines.unload_target,
            self.lines.pause,
            self.lines.resume,
            self.lines.kill,
        )
        self.admit_line = budget.line(self.lines.admit)
        #: bytes taken off the admit line after kills with nobody over their reservation
        self.admit_penalty = 0.0
        self._penalty_at = clock()
        #: the kernel's memory events (:mod:`rmq.memory.kernel_events`), or ``None``: polling only
        self.events = events
        self.woken: list[str] = []
        self.wakeups: dict[str, int] = {}
        self.oom_held = False
        self._swept_at = float("-inf")
        #: what the worker's cgroup holds outside the pools' (the main process), when last fitted
        self.own_bytes = 0
        self._own_seen: deque[tuple[float, int]] = deque()
        #: the pools' usage at which they count as held at their cap (0: no cap)
        self.held_at_bytes = 0
        self.pools_cap: int | None = None  # the pools' cap last written
        self.kills: dict[str, KillRecord] = {}
        self._lock_until = 0.0  # this tick's deadline for the ledger's lock (_LOCK_WAIT_S)
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
        self._killed_from: dict[int, int] = {}  # a killed pool's cgroup count when its task was admitted
        self._killed_at_reading: set[int] = set()  # the kills still freeing just after this tick's reading
        self._seen_request = ledger.read_unload_request()[0]
        self._loop = PeriodicThread(
            "rmq-governor", self._timed_tick, self._interval, log, "governor tick",
            waiter=self._wait if events is not None else None,
            wake=events.close if events is not None else None,
        )
        self.lock = threading.Lock()

    # the loop --------------------------------------------------------------
    def start(self) -> None:
        """Sample every ``rmq_monitor_interval`` on a daemon thread, and at once when the kernel says
        memory crossed a line (kernel accounting)."""
        if self.pools is not None:
            self._fit_pools(force=True)
        if self.events is not None:
            self.events.set_thresholds(self._thresholds())
            if self.budget.cgroup is not None:
                # the worker's own lines too: the pools' thresholds stand for them only while the
                # main process keeps the share they were set for (a worker's cgroup reached its
                # limit, and the kernel's OOM killer, in the 250 ms between two samples)
                self.events.watch_worker(self.budget.cgroup, self._worker_thresholds())
            if self.config.oom_hold:
                self.oom_held = self.events.hold_oom()
        self._loop.start()

    def stop(self) -> None:
        """Stop the loop (waits for the current tick), and give the kernel its OOM killer back."""
        self._loop.stop()
        if self.events is not None:
            self.events.release_oom()
            self.oom_held = False
        if self.pools is not None:
            self.pools.sweep(set())

    def _fit_pools(self, force: bool = False) -> bool:
        """Cap the pools' cgroup so that the worker reaches the kill line exactly when the pools
        reach their cap: a burst is then held by the kernel at the kill line, where the governor
        (outside the pools, never held) chooses the victim. Refitted as the main process grows, and
        as it shrinks only once it has stayed smaller for ``_OWN_WINDOW_S``, or at once, as far as
        the worker's limit allows, for pools the kernel already holds at a cap short of the line.
        ``True`` when the cap was raised for pools held there: their hold is being lifted."""
        assert self.pools is not None and self.budget.cgroup is not None
        # the pools read on both sides of the worker: memory moving in between (a kill freeing, a
        # burst growing; the governor may be preempted by the very tree it killed) would show as the
        # main process's share, and the largest share is kept for seconds
        pools = self.pools.pools_cgroup.usage_bytes()
        worker = self.budget.cgroup.usage_bytes()
        after = self.pools.pools_cgroup.usage_bytes()
        if worker is None or pools is None or after is None or abs(after - pools) > _REFIT_STEP_BYTES:
            return False
        now, own = self.clock(), max(0, worker - pools)
        self._own_seen.append((now, own))
        while self._own_seen[0][0] < now - _OWN_WINDOW_S:
            self._own_seen.popleft()
        largest = max(o for _, o in self._own_seen)
        if largest - own > _DIP_BYTES:  # a dip (a pool process replaced): the cap waits for it to pass
            own = self._own_in_dip(own, largest)
        # the cap follows the share to the MiB (the worker should reach the kill line, not stop short
        # of it), but not every page of it: each refit rewrites the kernel's wake-up thresholds
        if not force and abs(own - self.own_bytes) < _REFIT_STEP_BYTES:
            return False
        # never under what the pools hold now (see _CAP_SLACK_BYTES); held at their present cap,
        # they cannot pass it meanwhile. The worker's kill line stops the pools instead.
        floor = pools + _CAP_SLACK_BYTES
        if self.pools_cap is not None:
            floor = min(floor, self.pools_cap)
        cap = max(self.budget.line(self.lines.kill) - own, floor)
        # pools held at a cap that rises are let go on to it: a kill now would come short of the line
        # (while a runaway grows, the pools' count moves between the two reads above, and the cap is
        # refitted to the main process's share only once the kernel holds them)
        lifted = self.pools_cap is not None and cap > self.pools_cap and self._held()
        if not self.pools.set_pools_limit(cap):
            return False
        self.pools_cap = cap
        self.own_bytes = own
        self.held_at_bytes = max(0, cap - _AT_CAP_BYTES)
        if self.events is not None:
            if self.pools.version == 2 and cap:  # v2 holds a burst by throttling just under the cap
                self.held_at_bytes = max(1, cap - max(_HIGH_MARGIN_BYTES, cap // 50))
                self.events.set_high(self.held_at_bytes)
            if not force:
                self.events.set_thresholds_soon(self._thresholds())
        return lifted

    def _own_in_dip(self, own: int, largest: int) -> int:
        """The main process's share the cap is fitted for while its share dips under the largest of the
        window: that largest, unless the kernel already holds the pools at that cap, short of the kill
        line (a task held there would be killed before the line). Then the share now, raised as far
        as needed for the main process growing back to its largest to leave the worker under its
        limit."""
        if not self._held():
            return largest
        room = self.budget.limit_bytes - self.budget.line(self.lines.kill) - _CAP_SLACK_BYTES
        return max(own, largest - max(0, room))

    def _thresholds(self) -> list[int]:
        """Where the kernel wakes the governor: each line of the ladder, and the admit line, as the
        pools' usage that puts the worker on it; the kill line where the pools count as held."""
        ratios = {self.lines.admit, self.lines.unload, self.lines.pause}
        wakes = {b for r in ratios if (b := self.budget.line(r) - self.own_bytes) > 0}
        wakes.add(self.held_at_bytes or self.budget.line(self.lines.kill) - self.own_bytes)
        return sorted(b for b in wakes if b > 0)

    def _worker_thresholds(self) -> list[int]:
        """The worker's lines, in its own cgroup's count, where the kernel wakes the governor too."""
        ratios = {self.lines.admit, self.lines.unload, self.lines.pause, self.lines.kill}
        return sorted(b for r in ratios if (b := self.budget.line(r)) > 0)

    def _wait(self, timeout_s: float) -> None:
        """Wait for the next sample, or less when the kernel reports a crossing or an OOM."""
        woken = self.events.wait(timeout_s)
        for reason in woken:
            self.wakeups[reason] = self.wakeups.get(reason, 0) + 1
        self.woken = list(woken)

    def _interval(self) -> float:
        # under pressure, sample faster so a runaway task overshoots less before the kill
        if self.zone == "ok" and not self.ladder.paused:
            return self.config.monitor_interval
        if self.events is None:
            return min(self.config.monitor_interval, 0.05)
        # v1's thresholds wake the governor at every line, either way: between them only a kill taking
        # effect needs a fast look. Ticking every 20 ms through a steady, full worker (four tasks at
        # 96 % sit in the unload zone for their whole run) took CPU from the very tasks it governs.
        if self.events.mode == "eventfd" and self.zone != "kill" and not self._killed_pids and not self.paused:
            return self.config.monitor_interval
        return min(self.config.monitor_interval, 0.02)

    def _timed_tick(self) -> None:
        if not self.ticks and self.events is not None:
            _raise_own_priority()
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
        woken, self.woken = self.woken, []
        self._lock_until = time.monotonic() + _LOCK_WAIT_S
        pids = self.actuator.pool_pids()
        reading = self.meter.sample(pids)
        worker_bytes = reading.worker_bytes
        kernel_usage: dict[int, int] = {}
        lifted = False
        if self.budget.cgroup is not None:
            working_set = self.budget.cgroup.working_set_bytes()
            if working_set is not None:
                # the kernel's count is the truth where it counts each pool's tree; else the /proc
                # estimate may see what the cgroup's file does not yet
                worker_bytes = working_set if self.pools is not None else max(worker_bytes, working_set)
        if self.pools is not None:
            for pid in pids:
                used = self.pools.usage(pid)
                if used is not None:
                    kernel_usage[pid] = used
                    reading.children[pid] = used
            if now - self._swept_at >= 1.0:
                self._swept_at = now
                self.pools.sweep(set(pids))
            # every tick: a stale cap would hold the pools short of the kill line
            lifted = self._fit_pools()
        self._killed_at_reading = {pid for pid in self._killed_pids if self._freeing(pid)}
        self.trees.tidy(reading, now)
        with self._ledger_locked() as locked:
            dropped = self.ledger.release_dead_unlocked(self.alive) if locked else []
            # without the lock: a slot being rewritten may read torn for this tick
            entries = self.ledger.entries_unlocked()
        if dropped:
            self.counters["dead_released"] += len(dropped)
            log.warning("rmq released %d reservation(s) of dead processes: %s", len(dropped),
                        ", ".join(f"{e.name}[{e.task_id}] pid {e.pid}" for e in dropped))
        usage = []
        for e in entries:
            if e.pid in kernel_usage:  # the kernel's count of the pool's cgroup since admission
                usage.append((e, max(0, kernel_usage[e.pid] - e.start_rss)))
            elif e.pid in reading.rss:  # the pool process's growth, and everything its task started
                usage.append((e, max(0, reading.rss[e.pid] - e.start_rss) + reading.tree_bytes(e.pid)))
        for e, used in usage:
            e.used_bytes = used
            e.peak_used_bytes = max(e.peak_used_bytes, used)
        tasks = [e for e in entries if e.kind == KIND_TASK]
        self._forget_freed(reading, now)
        if not tasks and not self._killed_pids:  # a killed tree still freeing is not the idle worker
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
        control = Control(
            unload_generation=self.unload_generation,
            unload_bytes=self.unload_bytes,
            worker_bytes=worker_bytes,
            budget_bytes=self.budget.budget_bytes,
            admit_line_bytes=self._admit_line_now(now),
            idle_bytes=self.idle_bytes,
            sample_time=time.time(),
            zone=step.zone,
            cpu_slots=self.cpu_slots,
            paused=self.ladder.paused,
        )
        with self._ledger_locked() as locked:
            if locked:  # else admission weighs this tick's predecessor's readings
                self.ledger.publish_unlocked(control, usage)
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
        # the kernel holds the pools at their cap (v1), or reached it (v2): kill now
        # held (or about to be) by the kernel: kill now, below the kill line by the worker's reading if
        # need be. Read now, not taken from the wake-up: an OOM event read after a kill already freed
        # the memory is stale, and would cost a second task its run.
        # a hold the cap was just raised for is over once the kernel wakes the held tasks
        under_oom = not lifted and self._held()
        if step.kill or under_oom:
            killed = self._kill_one(tasks, reading, worker_bytes, now, woken[0] if woken else "sample",
                                    urgent=under_oom)
            if under_oom and not killed and self.oom_held:
                # nothing rmq may kill frees the memory (the main process grew, or a process rmq does
                # not govern): the kernel's OOM killer decides, as it would without rmq
                log.error("rmq: the worker's cgroup is out of memory and no governed task can be killed; "
                          "handing the choice back to the kernel's OOM killer")
                self.events.release_oom()
                self.oom_held = False
        elif self.events is not None and self.config.oom_hold and not self.oom_held and step.zone == "ok":
            self.oom_held = self.events.hold_oom()

    def _ledger_locked(self) -> AbstractContextManager[bool]:
        """The ledger's lock, waited for up to what is left of this tick's ``_LOCK_WAIT_S``."""
        return self.ledger.locked_within(max(0.0, self._lock_until - time.monotonic()))

    def _held(self) -> bool:
        """Whether the kernel holds the pools at their cap now (or is about to: within a charge
        batch of it), so that their allocations wait for a kill."""
        if self.pools is None:
            return False
        if self.events is not None and self.oom_held and self.events.under_oom():
            return True
        used = self.pools.pools_cgroup.usage_bytes()
        return bool(self.held_at_bytes) and used is not None and used >= self.held_at_bytes

    def _kill_one(self, tasks: list[Entry], reading: TreeReading, worker_bytes: int, now: float,
                  woken_by: str = "sample", urgent: bool = False) -> bool:
        """Kill the task that exceeds its reservation the most (else the newest); ``True`` when a kill
        was made or is still taking effect. ``urgent``: the kernel holds the cgroup at its limit."""
        # a process already killed is still counted until the pool reaps it: don't kill a second
        # one for the same excess within 2 s (under kernel accounting: until its cgroup is empty)
        self._forget_freed(reading, now)
        if urgent or self.pools is not None:  # the kernel says when a killed tree's memory is gone
            if any(self._freeing(pid) for pid in self._killed_pids):
                return True
            # none frees now, but one did at this tick's reading, which still counts its memory: choose
            # again on a fresh one (a burst's second kill, made on a reading 269 MiB over the kernel's
            # count then)
            if self._killed_at_reading:
                return True
        elif any(now - at < 2.0 for at in self._killed_pids.values()):
            return True
        main = os.getpid()
        candidates = [e for e in tasks if e.pid in reading.rss and e.pid != main and e.pid not in self._killed_pids]
        if not candidates:
            log.error("rmq: worker memory at %.0f%% of the budget and no governed task to kill",
                      100 * worker_bytes / self.budget.budget_bytes)
            return False
        worst = max(candidates, key=lambda e: e.used_bytes - e.memory_bytes)
        if worst.used_bytes - worst.memory_bytes <= 0:
            # nobody exceeds what it reserved: the newest loses the least work; but with the kernel
            # holding the pools at their cap, the largest frees the most at once (the newest is
            # often a re-run that has only just started, and killing it again frees nothing)
            worst = max(candidates, key=(lambda e: e.used_bytes) if urgent else (lambda e: e.started))
            if urgent:  # what admission let in does not fit: admit less for a while
                self.admit_penalty = min(self.admit_penalty + _ADMIT_STEP, self.budget.budget_bytes / 4)
                log.warning("rmq: held at the cap with every task within its reservation; the admit line "
                            "steps down by %d MiB for a while", int(self.admit_penalty) >> 20)
        # The choice was made on the ledger as read at the start of the tick: the task may have ended
        # since and its process taken the next one. Check, and kill, under the ledger's lock, so that
        # no new reservation is admitted in between; a stale choice waits for the next tick's reading.
        # The record is kept before the kill: the request handler looks for it once the pool notices.
        with self._ledger_locked() as locked:
            if not locked:
                log.warning("rmq: a pool process has held the ledger's lock for %.0f ms; killing without it",
                            1000 * _LOCK_WAIT_S)
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
                    room_bytes=max(0, self.admit_line - self.idle_bytes),
                    woken_by=woken_by,
                    neighbours=len(tasks) - 1,
                )
                if self.pools is not None:  # the kernel's count of the whole tree
                    self.kills[worst.task_id].observed_bytes = worst.used_bytes
                ended = self.trees.kill(worst.pid, now)
        if not current:
            log.info("rmq: %s[%s] in pid %d ended before its kill; choosing again next tick",
                     worst.name, worst.task_id, worst.pid)
            return False
        self._killed_pids[worst.pid] = now
        self._killed_from[worst.pid] = worst.start_rss
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
        return True

    def _forget_freed(self, reading: TreeReading, now: float) -> None:
        """Drop the killed pool processes whose memory is gone: the process (and, under kernel
        accounting, its cgroup: its subprocesses may still be exiting), or a minute."""
        for pid, at in list(self._killed_pids.items()):
            gone = pid not in reading.rss and not (self.pools is not None and self._freeing(pid))
            if gone or now - at > 60:
                del self._killed_pids[pid]
                self._killed_from.pop(pid, None)

    def _admit_line_now(self, now: float) -> int:
        """The admit line, less what kills with nobody over their reservation took off it (it comes
        back at ``_ADMIT_RECOVERY_PER_S``)."""
        if self.admit_penalty:
            self.admit_penalty = max(0.0, self.admit_penalty - (now - self._penalty_at) * _ADMIT_RECOVERY_PER_S)
        self._penalty_at = now
        return self.admit_line - int(self.admit_penalty)

    def _freeing(self, pid: int) -> bool:
        """Whether a killed pool process's memory is still on its way out (its cgroup or process).

        Under kernel accounting, the cgroup's count says: a process shows as a zombie once its main
        thread has exited, while another of its threads may still hold its memory (in a burst, killed
        pool processes showed as zombies with 284 MiB still in their cgroups, and the governor killed
        three more tasks for that one excess). A zombie holds no memory of its own but stays in its
        cgroup's ``cgroup.procs`` until reaped: a killed task's subprocess, orphaned to the main process
        (the subreaper), is reaped here, and never counts as freeing by itself (it kept the next kill
        waiting, and a held re-run held, for a minute)."""
        if self.pools is not None:
            members = self.pools.members(pid)
            ended = [m for m in members if not self.alive(m)]  # gone, or a zombie
            for m in ended:
                if m != pid:  # the pool process itself is the pool's to reap: reaped here, its task was never
                    self.trees.reap(m)  # reported lost, and stayed without a terminal state
            if len(ended) < len(members):
                return True
            left = self.pools.usage(pid)  # None once the cgroup is gone (swept)
            return left is not None and left > self._killed_from.get(pid, 0) + _FREED_SLACK_BYTES
        return self.alive(pid)

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
            "accounting": self.accounting_info(),
            "lines_source": self.lines.source,
            "line_ratios": {"admit": self.lines.admit, "unload": self.lines.unload, "pause": self.lines.pause,
                            "resume": self.lines.resume, "kill": self.lines.kill},
            "oom_kills": budget.cgroup.oom_kills() if budget.cgroup is not None else None,
            "recent_kills": recent_kills,
        }

    def accounting_info(self) -> dict[str, Any]:
        """How memory is counted and how the governor is woken, with the reasons (stats, doctor)."""
        events = self.events
        return {
            "mode": self.accounting.mode,
            "reason": self.accounting.reason,
            "wakeups": events.mode if events is not None else "polling",
            "wakeups_reason": events.reason if events is not None else
            f"sampling every {self.config.monitor_interval * 1000:.0f} ms",
            "oom_hold": self.oom_held,
            "oom_hold_reason": getattr(events, "hold_reason", "") if events is not None and not self.oom_held else "",
            "woken": dict(self.wakeups),
            "kernel_oom_kills": self.budget.cgroup.oom_kills() if self.budget.cgroup is not None else None,
        }


def _raise_own_priority() -> None:
    """Run the calling thread (the governor's) at nice -10 where the worker may (``CAP_SYS_NICE``):
    with the kernel holding a burst, the kill decision waits for this thread to get a CPU, which on a
    busy machine is shared with the very tasks that are bursting (earlyoom raises its own priority
    for the same reason). The thread sleeps between the kernel's wake-ups, so this takes no CPU from
    the tasks."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
    except OSError:
        pass


def kill_pid(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists."""
    send_signal(pid, signal.SIGKILL)
