"""What runs in each pool process: start hooks, the pressure watcher, periodic flushes (the run
claims' keeper starts with the first claim, see :mod:`rmq.core.claims`)."""

from __future__ import annotations

import logging

from rmq.celery.concerns import default_concerns
from rmq.core.periodic import PeriodicThread
from rmq.core.runtime import Runtime
from rmq.memory.learning import flush_learner

__all__ = ["ChildWatcher", "on_process_start", "on_process_exit"]

log = logging.getLogger("rmq.celery.child")


class ChildWatcher:
    """A daemon thread in a pool process: relays the governor's unload signal to this
    process's unload hooks (idle processes included) and flushes counters and learned peaks.
    Run claims have their own keeper thread (:mod:`rmq.core.claims`): an unload that takes long
    here must not let a claim lapse."""

    def __init__(self, rt: Runtime, interval_s: float | None = None) -> None:
        self.rt = rt
        # the governor's interval (250 ms by default): an unload signal waits at most one of them
        self.interval_s = interval_s if interval_s is not None else rt.config.monitor_interval
        self._flush_every = max(1, round(1.0 / self.interval_s))  # about once a second
        self._seen = rt.ledger.read_control().unload_generation
        self._ticks = 0
        self._loop = PeriodicThread("rmq-child-watcher", self.step, self.interval_s, log, "child watcher")

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop(timeout_s=0)  # at process exit: never wait for an unload in progress

    def step(self) -> None:
        """Relay the unload signal; about once a second, flush counters."""
        self._ticks += 1
        self.check_pressure()
        if self._ticks % self._flush_every == 0:
            flush_learner(self.rt)
            self.rt.stats.flush()

    def check_pressure(self) -> None:
        """Call the unload hooks once per new unload generation."""
        control = self.rt.ledger.read_control()
        if control.unload_generation != self._seen:
            self._seen = control.unload_generation
            for hook in list(self.rt.unload_hooks):
                hook(control.unload_bytes)


def on_process_start(rt: Runtime) -> None:
    """Run in a new pool process (``worker_process_init``)."""
    for concern in default_concerns():
        try:
            concern.process_start(rt)
        except Exception:
            log.exception("rmq %s failed to start in this process", concern.name)
    watcher = ChildWatcher(rt)
    rt.local("watcher", lambda: watcher)
    watcher.start()


def on_process_exit(rt: Runtime) -> None:
    """Run when a pool process shuts down (``worker_process_shutdown``)."""
    for concern in reversed(default_concerns()):
        try:
            concern.process_exit(rt)
        except Exception:
            log.exception("rmq %s failed to close in this process", concern.name)
    for hook in list(rt.process_exit_hooks):
        try:
            hook(rt)
        except Exception:
            log.exception("rmq process exit hook %r failed", hook)
    claims = rt.made("claims")
    if claims is not None:
        claims.stop()
    try:
        flush_learner(rt, force=True)
    except Exception:
        pass
    rt.stats.flush(force=True)
