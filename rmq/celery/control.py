"""Remote-control commands: ``celery inspect rmq`` (the snapshot) and ``rmq_cleanup``.

Commands take no paths or other free-form input (security: a broker message must not
steer file operations); ``rmq_cleanup`` takes one boolean, ``dry_run``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.utils.serialization import strtobool
from celery.worker.control import control_command, inspect_command

__all__ = ["CleanupRunner", "rmq_cleanup", "rmq_snapshot"]

log = logging.getLogger("rmq.celery.control")

#: longest the worker's event loop waits for a cleanup before replying "running"
REPLY_WAIT_S = 5.0
#: removed names listed in a reply (the count and bytes are always complete)
REPLY_NAMES = 100


def governor_step(worker: Any) -> Any:
    """The worker's rmq bootstep, or ``None``."""
    for step in getattr(worker, "steps", []) or []:
        if step is not None and getattr(step, "label", "") == "rmq governor":
            return step
    return None


@inspect_command(name="rmq")
def rmq_snapshot(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The worker's rmq snapshot (the same as ``inspect stats`` under ``rmq``)."""
    worker = state.consumer.controller
    step = governor_step(worker)
    if step is None or step.snapshots is None:
        return {"error": "rmq is not running in this worker"}
    return step.snapshots.build()


class _Job:
    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.started = time.time()
        self.done = threading.Event()
        self.result: dict[str, Any] = {}


class CleanupRunner:
    """Runs cleanup of the worker's own session root on a thread, one run at a time.

    Removal can take long (large trees); the control command waits at most ``wait_s`` so the
    worker's event loop (task receipt, unacked-message touching) is never blocked longer.
    Runs in the worker's main process; removed sessions are counted there
    (``counters.sessions_cleaned`` of the snapshot).
    """

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._job: _Job | None = None

    def request(self, dry_run: bool, wait_s: float = REPLY_WAIT_S) -> dict[str, Any]:
        """Start a run (or join the one in progress) and return its report dict, or a
        ``{"status": "running", ...}`` dict when it takes longer than ``wait_s`` seconds."""
        with self._lock:
            job = self._job
            if job is not None and not job.done.is_set() and job.dry_run != dry_run:
                return self._status("busy", job, error="another cleanup is running on this worker")
            if job is None or job.done.is_set():
                job = self._job = _Job(dry_run)
                threading.Thread(target=self._run, args=(job,), name="rmq-cleanup", daemon=True).start()
        if job.done.wait(wait_s):
            return job.result
        return self._status("running", job)

    def _status(self, status: str, job: _Job, **extra: Any) -> dict[str, Any]:
        return {"status": status, "root": self.rt.config.session_root_path, "dry_run": job.dry_run,
                "started": job.started, **extra}

    def _run(self, job: _Job) -> None:
        from rmq.disk.cleanup import cleanup_from_config, format_report

        try:
            report = cleanup_from_config(self.rt.config, dry_run=job.dry_run)
            if not job.dry_run:
                self.rt.stats.incr("sessions_cleaned", n=report.removed)
            if report.removed or report.errors:
                log.info("%s", format_report(report))
            result = {"status": "done", **report.as_dict()}
            names = result["removed_names"]
            if len(names) > REPLY_NAMES:
                result["removed_names"] = names[:REPLY_NAMES]
                result["removed_names_truncated"] = len(names) - REPLY_NAMES
            job.result = result
        except Exception as exc:
            log.exception("rmq cleanup of %s failed", self.rt.config.session_root_path)
            job.result = self._status("error", job, error=f"{type(exc).__name__}: {exc}")
        finally:
            job.done.set()


@control_command(name="rmq_cleanup", args=[("dry_run", strtobool)], signature="[dry_run=False]")
def rmq_cleanup(state: Any, dry_run: Any = False, **kwargs: Any) -> dict[str, Any]:
    """Clean THIS worker's session root (age, failed-TTL and disk-pressure policies).

    The reply is the cleanup report (removed count, ``bytes_freed``, names, reasons); the
    beat task ``rmq.cleanup_sessions`` broadcasts this command so every host cleans its disk.
    """
    if kwargs:
        return {"error": f"rmq_cleanup takes only dry_run, got {sorted(map(str, kwargs))[:5]}"}
    if not isinstance(dry_run, bool):
        return {"error": f"dry_run must be true or false, got {type(dry_run).__name__}"}
    step = governor_step(state.consumer.controller)
    rt = getattr(step, "runtime", None)
    if rt is None:
        return {"error": "rmq is not running in this worker"}
    # Stay well inside the visibility timeout: the event loop keeps this worker's messages fresh.
    wait_s = min(REPLY_WAIT_S, rt.config.visibility_timeout / 4)
    return rt.local("cleanup_runner", lambda: CleanupRunner(rt)).request(dry_run, wait_s)
