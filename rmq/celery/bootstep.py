"""The worker bootstep: builds the runtime before the pool forks, runs the governor. Glue only."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from celery import bootsteps

from rmq.memory.budget import detect_budget
from rmq.core.errors import ConfigError, exit_config_error
from rmq.memory.governor import Governor, kill_pid
from rmq.celery.concerns import default_concerns
from rmq.core.ledger import Ledger
from rmq.core.runtime import Runtime, redis_url_for_app, runtime_base, runtime_dir_prefix, set_current
from rmq.monitoring.snapshot import SnapshotBuilder
from rmq.core.runtime import config_for

__all__ = ["GovernorStep", "CeleryActuator"]

log = logging.getLogger("rmq.worker")


def _runtime_dir(configured: str | None) -> str:
    base = runtime_base(configured)
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=runtime_dir_prefix(os.getpid()), dir=base)


def _cpu_slots(configured: int | None) -> tuple[int, str]:
    if configured:
        return configured, "configured"
    try:
        from rmq.cpu.limits import detect_cpu_slots

        return detect_cpu_slots()
    except ImportError:  # pragma: no cover - during development only
        return len(os.sched_getaffinity(0)), "affinity"


class CeleryActuator:
    """The governor's hands on a Celery worker. Pause/resume and unacked touching run on the
    worker's event loop (a timer); kills and pid reads are safe from the governor thread."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.want_paused = False
        self.paused_queues: list[str] = []
        self._is_paused = False

    @property
    def is_paused(self) -> bool:
        """Whether the worker has really stopped fetching (the governor's wish, applied)."""
        return self._is_paused

    def pool_pids(self) -> list[int]:
        try:
            procs = list(self.worker.pool._pool._pool)
        except AttributeError:
            return []
        return [p.pid for p in procs if p.pid and p.pid != os.getpid()]

    def pause(self) -> None:
        self.want_paused = True

    def resume(self) -> None:
        self.want_paused = False

    def kill(self, pid: int) -> None:
        if pid != os.getpid():
            kill_pid(pid)

    def apply_pause_state(self) -> None:
        """On the event loop: cancel or re-add the task queues to match the governor."""
        if self.want_paused == self._is_paused:
            return
        consumer = getattr(self.worker, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return
        if self.want_paused:
            self.paused_queues = [q.name for q in task_consumer.queues]
            for name in self.paused_queues:
                consumer.cancel_task_queue(name)
            self._is_paused = True
        else:
            for name in self.paused_queues:
                consumer.add_task_queue(name)
            self.paused_queues = []
            self._is_paused = False

    def touch_unacked(self) -> None:
        """On Redis, keep this worker's unacked messages fresh so that a short visibility
        timeout redelivers the messages of a dead worker quickly but never those of a live one."""
        consumer = getattr(self.worker, "consumer", None)
        channel = getattr(getattr(consumer, "task_consumer", None), "channel", None)
        qos = getattr(channel, "qos", None)
        key = getattr(channel, "unacked_index_key", None)
        delivered = getattr(qos, "_delivered", None)
        if not delivered or key is None:
            return
        now = time.time()
        try:
            # Not channel.client: that is the connection with the consumer's pending BRPOP, and a
            # command sent on it would read the BRPOP's reply (a message) as its own and lose it.
            with channel.conn_or_acquire() as client:
                client.zadd(key, {tag: now for tag in list(delivered)}, xx=True)
        except Exception as exc:  # a broken connection is the consumer's to fix
            log.debug("rmq could not touch unacked messages: %r", exc)

    def reap_exited(self) -> None:
        """On the event loop: finish pool processes that died but that Celery's exit-pipe check
        missed (the pipe closes before the process can be reaped; Celery then waits for its
        5 s maintenance timer, which delays the redelivery of the lost task)."""
        pool = getattr(getattr(self.worker, "pool", None), "_pool", None)
        for proc in list(getattr(pool, "_pool", None) or ()):
            popen = getattr(proc, "_popen", None)
            if popen is not None and popen.poll() is not None:
                pool.maintain_pool()
                return


class GovernorStep(bootsteps.StartStopStep):
    """Builds rmq's runtime in the main process (before the pool forks) and runs the governor."""

    label = "rmq governor"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        try:
            self.config = config_for(worker.app)
        except ConfigError as exc:
            exit_config_error(exc)
        self.runtime_dir = _runtime_dir(self.config.runtime_dir)
        self.ledger = Ledger(self.runtime_dir, create=True)
        self.runtime = Runtime(
            self.config, worker.app, self.runtime_dir, self.ledger, redis_url_for_app(self.config, worker.app)
        )
        set_current(self.runtime)
        for concern in default_concerns():
            concern.worker_boot(self.runtime, worker)
        atexit.register(self._remove_runtime_dir)
        self.budget = detect_budget(self.config)
        self.cpu_slots, self.cpu_source = _cpu_slots(self.config.cpu_slots)
        self.governor: Governor | None = None
        self.snapshots: SnapshotBuilder | None = None
        self._timers: list[Any] = []

    def start(self, worker: Any) -> None:
        actuator = CeleryActuator(worker)
        self.governor = Governor(self.config, self.budget, self.ledger, actuator, cpu_slots=self.cpu_slots)
        self.runtime.governor = self.governor
        self.snapshots = SnapshotBuilder(self.runtime, self.governor, getattr(worker, "hostname", None))
        self.runtime.snapshots = self.snapshots
        self.runtime.worker = worker
        self.snapshots.extra = self.runtime.snapshot_parts
        self.snapshots.extra["config"] = lambda: {
            "cpu_slots_source": self.cpu_source,
            "runtime_dir": self.runtime_dir,
        }
        self.governor.tick()
        self.governor.start()
        timer = getattr(worker, "timer", None)
        if timer is not None:
            self._timers.append(timer.call_repeatedly(0.1, actuator.apply_pause_state))
            self._timers.append(timer.call_repeatedly(0.1, actuator.reap_exited))
            touch_every = max(0.5, self.config.visibility_timeout / 5)
            self._timers.append(timer.call_repeatedly(touch_every, actuator.touch_unacked))
        for concern in default_concerns():
            concern.worker_start(self.runtime)
        log.info(
            "rmq governor started: budget %d bytes (%s), admit line %d, %d CPU slots (%s), every %.0f ms",
            self.budget.budget_bytes, self.budget.source, self.governor.admit_line, self.cpu_slots,
            self.cpu_source, self.config.monitor_interval * 1000,
        )

    def stop(self, worker: Any) -> None:
        for t in self._timers:
            try:
                t.cancel()
            except Exception:
                pass
        self._timers = []
        if self.governor is not None:
            self.governor.stop()
            self.governor = None
            for concern in reversed(default_concerns()):
                try:
                    concern.worker_stop(self.runtime)
                except Exception:
                    log.exception("rmq %s failed to stop", concern.name)

    terminate = stop

    def _remove_runtime_dir(self) -> None:
        # at exit, after the pool's children are gone
        if os.getpid() == self.runtime.main_pid:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def info(self, worker: Any) -> dict[str, Any]:
        if self.snapshots is None:
            return {"rmq": {"starting": True}}
        return {"rmq": self.snapshots.build()}

