"""The worker bootstep: builds the runtime before the pool forks, runs the governor with a
:class:`~rmq.celery.actuator.CeleryActuator`. Glue only."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from typing import Any

from celery import bootsteps

from rmq.celery.actuator import CeleryActuator
from rmq.celery.concerns import default_concerns
from rmq.celery.pools import check_pool
from rmq.core.errors import ConfigError
from rmq.core.exits import exit_config_error
from rmq.core.ledger import Ledger, slots_for
from rmq.core.periodic import PeriodicThread
from rmq.core.runtime import Runtime, config_for, redis_url_for_app, runtime_base, runtime_dir_prefix, set_current
from rmq.cpu.slots import detect_cpu_slots
from rmq.memory.budget import detect_budget
from rmq.memory.governor import Governor
from rmq.memory.lines import lines_for
from rmq.memory.pool_cgroups import choose_accounting
from rmq.memory.probes import HostProbe
from rmq.memory.proctree import set_child_subreaper
from rmq.memory.shared_heap import keep_heap_shared
from rmq.monitoring.snapshot import SnapshotBuilder

__all__ = ["GovernorStep"]

log = logging.getLogger("rmq.worker")


def _runtime_dir(configured: str | None) -> str:
    base = runtime_base(configured)
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=runtime_dir_prefix(os.getpid()), dir=base)


def _pool_processes(worker: Any) -> int:
    """The most pool processes this worker runs: its concurrency, or the autoscaler's maximum."""
    counts = [getattr(worker, "concurrency", None), getattr(worker, "max_concurrency", None)]
    return max([n for n in counts if isinstance(n, int)] or [1])


def _cpu_slots(configured: int | None) -> tuple[int, str]:
    return (configured, "configured") if configured else detect_cpu_slots()


class GovernorStep(bootsteps.StartStopStep):
    """Builds rmq's runtime in the main process (before the pool forks) and runs the governor."""

    label = "rmq governor"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        check_pool(worker)  # prefork only: any other pool stops the worker here (rmq/celery/pools.py)
        try:
            self.config = config_for(worker.app)
        except ConfigError as exc:
            exit_config_error(exc)
        self.runtime_dir = _runtime_dir(self.config.runtime_dir)
        self.ledger = Ledger(self.runtime_dir, create=True, slots=slots_for(_pool_processes(worker)))
        self.runtime = Runtime(
            self.config, worker.app, self.runtime_dir, self.ledger, redis_url_for_app(self.config, worker.app)
        )
        set_current(self.runtime)
        for concern in default_concerns():
            concern.worker_boot(self.runtime, worker)
        atexit.register(self._remove_runtime_dir)
        # Kernel accounting is chosen before the pool forks: each pool process moves itself into its
        # cgroup before its first task (AdmissionGuard.process_start).
        limit = detect_budget(self.config)
        self.accounting = choose_accounting(limit.cgroup or HostProbe().memory_cgroup(), os.getpid(),
                                            self.config.kernel_accounting, limit.cgroup is not None)
        self.runtime.accounting = self.accounting
        if self.accounting.pools is not None:
            self.accounting.pools.adopt_at_fork(os.getpid())
        if self.config.share_heap:  # before the pool's first fork (docs/design.md#shared-heap)
            keep_heap_shared(os.getpid())
        self.lines = lines_for(self.config, self.accounting.kernel, limit.limit_bytes)
        self.budget = detect_budget(self.config, percent=self.lines.budget_percent)
        self.cpu_slots, self.cpu_source = _cpu_slots(self.config.cpu_slots)
        self.governor: Governor | None = None
        self.snapshots: SnapshotBuilder | None = None
        self._timers: list[Any] = []
        self._keeper: PeriodicThread | None = None
        self._draining = False

    def start(self, worker: Any) -> None:
        actuator = CeleryActuator(worker)
        # a descendant of a pool process that loses its parent (it double-forked, or its pool process
        # was killed) comes to this process, where the governor still counts, kills and reaps it
        if not set_child_subreaper():
            log.warning("rmq could not make the worker a child subreaper: a task's double-forked "
                        "subprocesses escape its tree")
        events = None
        if self.accounting.kernel:
            from rmq.memory.kernel_events import open_kernel_events

            assert self.accounting.pools is not None
            events = open_kernel_events(self.accounting.pools.pools_cgroup)
        self.governor = Governor(self.config, self.budget, self.ledger, actuator, cpu_slots=self.cpu_slots,
                                 accounting=self.accounting, lines=self.lines, events=events)
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
            # the loop stops before the pool drains: see docs/design.md#crash-recovery
            self._keeper = PeriodicThread("rmq-unacked-keeper", lambda: actuator.touch_if_stale(touch_every),
                                          touch_every / 2, log, "unacked refresh")
            self._keeper.start()
        self._after_pool(worker)
        for concern in default_concerns():
            concern.worker_start(self.runtime)
        info = self.governor.accounting_info()
        log.info(
            "rmq governor started: budget %d bytes (%s), admit line %d, %d CPU slots (%s), every %.0f ms; "
            "accounting %s (%s); wake-ups %s; OOM hold %s",
            self.budget.budget_bytes, self.budget.source, self.governor.admit_line, self.cpu_slots,
            self.cpu_source, self.config.monitor_interval * 1000, info["mode"], info["reason"],
            info["wakeups"], "on" if info["oom_hold"] else f"off {info['oom_hold_reason']}".strip(),
        )

    def _after_pool(self, worker: Any) -> None:
        """Stop for good once the worker's blueprint has stopped every step, the pool included
        (its ``on_stopped``, which then closes the broker connection)."""
        blueprint = getattr(worker, "blueprint", None)
        if blueprint is None:
            return
        then = blueprint.on_stopped

        def on_stopped() -> None:
            if self._draining:
                self._stop_all()
                log.info("rmq governor stopped after the pool drained")
            if then is not None:
                then()

        blueprint.on_stopped = on_stopped

    def stop(self, worker: Any) -> None:
        """Warm shutdown: the pool stops after this step and waits for its running tasks, so the
        governor, its kill rung and the unacked refresh go on until it has (``_after_pool``)."""
        if self.governor is None or getattr(getattr(worker, "blueprint", None), "on_stopped", None) is None:
            self._stop_all()
            return
        self._cancel_timers()  # the event loop has ended; the keeper thread refreshes from now on
        self._draining = True
        log.info("rmq keeps governing until the pool has drained")

    def terminate(self, worker: Any) -> None:
        """Cold shutdown: the pool is terminated, running tasks with it; stop now."""
        self._stop_all()

    def _cancel_timers(self) -> None:
        for t in self._timers:
            try:
                t.cancel()
            except Exception:
                pass
        self._timers = []

    def _stop_all(self) -> None:
        self._draining = False
        self._cancel_timers()
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None
        if self.governor is not None:
            self.governor.stop()
            self.governor = None
            for concern in reversed(default_concerns()):
                try:
                    concern.worker_stop(self.runtime)
                except Exception:
                    log.exception("rmq %s failed to stop", concern.name)

    def _remove_runtime_dir(self) -> None:
        # at exit, after the pool's children are gone
        if os.getpid() == self.runtime.main_pid:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            if self.accounting.pools is not None:  # the pool cgroups left once their processes exited
                self.accounting.pools.remove()

    def info(self, worker: Any) -> dict[str, Any]:
        if self.snapshots is None:
            return {"rmq": {"starting": True}}
        return {"rmq": self.snapshots.build()}

