"""The request class of governed tasks, in the worker's main process. Celery glue.

When a pool process dies under a governed task, Celery calls ``on_failure`` with
``WorkerLostError``. If the governor killed it for memory, the task runs again, reserving at least
what the kill saw it use (header ``rmq_reserve``). A task killed while using more than it could
have had alone on the idle worker runs again with backoff up to ``rmq_memory_kill_retries`` times,
then ends as ``FAILURE`` with :class:`~rmq.core.errors.MemoryBudgetExceeded`; one killed using
less was crowded out by its neighbours, and runs again (up to ``_CROWDED_RUNS`` times), since its
re-run now waits for the room it needs. Any other loss (a SIGKILL from outside, the
kernel OOM killer) redelivers the message at once, at most ``rmq_worker_lost_retries``
times, then ends as ``FAILURE`` with :class:`~rmq.core.errors.TaskProcessLost`: never lost,
never an endless loop. The losses are counted in Redis when rmq has one, and always in the main
process too, so that the cap holds on a broker without Redis (RabbitMQ).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.worker.request import Request
from celery.worker.state import task_ready

from rmq.celery.copies import RESERVE, rmq_headers
from rmq.celery.resend import resend
from rmq.core import keys
from rmq.core.claims import claim_token
from rmq.core.errors import MemoryBudgetExceeded, TaskProcessLost
from rmq.core.runtime import current
from rmq.memory.learning import flush_learner, learner

__all__ = ["GovernedRequest"]

log = logging.getLogger("rmq.celery.request")

#: re-runs of a task killed while it used no more than the idle worker's room: a loop guard only
_CROWDED_RUNS = 10

#: how long, and for how many task ids, the main process remembers lost runs
_LOST_KEEP_S = 86400.0
_LOST_KEEP_N = 10000


class _LostRuns:
    """Lost runs per task id, counted in this worker's main process (bounded, oldest dropped)."""

    def __init__(self) -> None:
        self._counts: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def incr(self, task_id: str, now: float) -> int:
        with self._lock:
            n, at = self._counts.pop(task_id, (0, now))
            if now - at > _LOST_KEEP_S:
                n = 0
            self._counts[task_id] = (n + 1, now)
            while len(self._counts) > _LOST_KEEP_N:
                self._counts.popitem(last=False)
            return n + 1


_lost_here = _LostRuns()


def _exc_info(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo(sys.exc_info())


class GovernedRequest(Request):
    """Celery's request with rmq's handling of lost pool processes."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        rt = current()
        if rt is None or not isinstance(exc, WorkerLostError):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        self._release_run_claim()
        governor = rt.governor
        record = governor.pop_kill(self.id) if governor is not None else None
        headers = rmq_headers(self._request_dict)
        if record is not None:
            kills = int(headers.get("rmq_kills", 0) or 0) + 1
            rt.stats.incr("killed_tasks")
            # crowded out: killed beside other tasks while it used no more than it could have had
            # alone, and, on a re-run that reserved what it used before, no more than this run
            # reserved (past that, it is a runaway)
            before = int(headers.get(RESERVE, 0) or 0)
            crowded = record.neighbours > 0 and 0 < record.observed_bytes <= record.room_bytes and (
                not before or record.observed_bytes <= record.declared_bytes)
            runs = max(rt.config.memory_kill_retries, _CROWDED_RUNS) if crowded else rt.config.memory_kill_retries
            # crowded out, it runs again once what it used fits; a runaway's reading would only
            # teach its neighbours to fear it, and its re-run to wait for room that never comes
            if crowded:
                headers[RESERVE] = max(record.observed_bytes, before)
                self._learn_kill(record.task_name, record.observed_bytes)
            if kills <= runs and self._rerun(headers, kills, record.task_name, crowded):
                task_ready(self)  # what Celery's on_failure does first: the request is no longer active
                return None
            exceeded = MemoryBudgetExceeded(
                record.task_name, record.observed_bytes, record.declared_bytes, record.budget_bytes, kills
            )
            return super().on_failure(_exc_info(exceeded), send_failed_event, return_ok)
        if self._success_was_stored():  # it had succeeded: Celery acks it and reports the success
            return super().on_failure(exc_info, send_failed_event, return_ok)
        lost = self._count_lost()
        if lost > rt.config.worker_lost_retries:
            gone = TaskProcessLost(self.task_name, lost, str(exc))
            return super().on_failure(_exc_info(gone), send_failed_event, return_ok)
        return super().on_failure(exc_info, send_failed_event, return_ok)  # requeued (reject_on_worker_lost)

    def _release_run_claim(self) -> None:
        """The dead process may have held this task's run claim: free it for the next copy."""
        rt = current()
        if rt is None or self.worker_pid is None:
            return
        try:
            rt.claims.release(self.id, claim_token(self.hostname, self.worker_pid))
        except Exception as exc:  # it expires on its own
            log.debug("rmq could not release the run claim of %s[%s]: %r", self.task_name, self.id, exc)

    @staticmethod
    def _learn_kill(name: str, observed: int) -> None:
        """What a killed run used is at least its peak: its neighbours' next runs reserve it too."""
        rt = current()
        if rt is None or observed <= 0:
            return
        learner(rt).observe(name, observed)
        flush_learner(rt, force=True)

    def _rerun(self, headers: dict[str, Any], kills: int, name: str, crowded: bool = False) -> bool:
        rt = current()
        assert rt is not None
        # crowded out: nothing to back off from, the re-run waits in admission for its room
        countdown = rt.config.kill_backoff * (1 if crowded else 2 ** (kills - 1))
        headers = {**headers, "rmq_kills": kills}
        try:
            resend(self.task, self._context, countdown, headers)
        except Exception as exc:
            log.error("rmq could not re-queue killed task %s[%s]: %r", name, self.id, exc)
            return False
        log.warning("rmq re-queued %s[%s] after memory kill %d (runs again in %.1fs)", name, self.id, kills,
                    countdown)
        if self.task.acks_late:
            self.acknowledge()
        self.send_event("task-retried", exception=f"rmq memory kill {kills}", traceback="")
        return True

    def _count_lost(self) -> int:
        """This loss's number: the larger of the count in Redis (shared by every worker, when rmq
        has a Redis) and this worker's own count (which needs nothing but this process)."""
        here = _lost_here.incr(self.id, time.monotonic())
        rt = current()
        if rt is None or rt.redis_url is None:
            return here
        try:
            key = keys.worker_lost(self.id)
            pipe = rt.redis().pipeline()
            pipe.incr(key)
            pipe.expire(key, int(_LOST_KEEP_S))
            return max(here, int(pipe.execute()[0]))
        except Exception as exc:
            log.warning("rmq could not count lost runs of %s[%s] in Redis: %s", self.task_name, self.id, exc)
            return here
