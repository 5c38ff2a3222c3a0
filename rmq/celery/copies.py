"""The copies of a governed task: a task id runs at most once, and never twice at the same time. Celery glue.

A task id can arrive more than once: the broker redelivers a message whose process or worker died
before the ack, or that a broker connection drop re-queued while its task runs; a deferral sends a
copy (header ``rmq_deferrals``); the request class re-runs a task the governor killed for memory
(header ``rmq_kills``). Such a copy may come after its task already ended, or while another run of
the same id is going on. Before it runs, a copy takes the task id's run claim
(:mod:`rmq.core.claims`) and reads the result backend: it is dropped when the task already ended,
and deferred while another run holds the claim or still runs in this worker. An original delivery
only notes its task id (no Redis round trip per task): the process's claim keeper takes its claim
once it has run for a moment, so that a copy on any worker finds it held. See
docs/design.md#run-claims.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psutil
from celery import states
from celery.exceptions import Ignore, Reject, Retry

from rmq.core import forks
from rmq.core.claims import claim_token
from rmq.core.errors import Defer
from rmq.core.ledger_layout import KIND_TASK, fit

__all__ = ["DEFERRALS", "RESERVE", "finished_copy", "request_header", "is_copy", "release_claim", "rmq_headers",
           "run_copy", "run_original"]

log = logging.getLogger("rmq.celery.copies")

#: the header every deferral sets: how many counted deferrals the task has had
DEFERRALS = "rmq_deferrals"
#: the least a re-run after a memory kill reserves: what the kill saw the task use
RESERVE = "rmq_reserve"
_REQUEST_HEADERS = (DEFERRALS, "rmq_kills", RESERVE)

#: per pool thread, ``finished_copy.claim``: the task id whose run claim a copy that returned still
#: holds; the task's ``after_return`` releases it once the outcome is stored, so that a copy waiting
#: for the claim then finds the task ended
finished_copy = threading.local()


def rmq_headers(source: Any) -> dict[str, Any]:
    """The ``rmq_*`` message headers of a request, a request dict or a headers dict."""
    if isinstance(source, dict):
        return {k: v for k, v in source.items() if isinstance(k, str) and k.startswith("rmq_") and v is not None}
    found = {k: v for k in _REQUEST_HEADERS if (v := request_header(source, k)) is not None}
    headers = getattr(source, "headers", None)
    if headers:  # any other rmq_* header kept there
        found.update(rmq_headers(headers))
    return found


def request_header(request: Any, name: str) -> Any:
    """One header of a task's request: Celery puts custom headers on the request as attributes,
    and keeps some in ``request.headers`` only."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def is_copy(request: Any) -> bool:
    """A redelivered message, a deferred copy or a re-run after a kill: a copy of a task id that
    may already have ended, or may be running elsewhere."""
    if (request.delivery_info or {}).get("redelivered"):
        return True
    # every deferral sets the header, 0 for the uncounted ones (rate limits, waiting copies);
    # request_header() inlined: this runs for every governed task
    headers = getattr(request, "headers", None) or {}
    deferrals = getattr(request, DEFERRALS, None)
    if deferrals is None:
        deferrals = headers.get(DEFERRALS)
    if deferrals is not None:
        return True
    kills = getattr(request, "rmq_kills", None)
    if kills is None:
        kills = headers.get("rmq_kills")
    return bool(kills)


def run_original(task: Any, rt: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run an original delivery of ``task``: its claim is noted here and taken by the claim keeper
    if the run lasts (no Redis round trip on this path), and released once its outcome is stored."""
    try:
        # forks.pid(): this pool process's pid without a system call per task
        rt.claims.note(request.id, claim_token(request.hostname or "?", forks.pid()))
    except Exception as exc:  # never let the bookkeeping of copies stop an original
        log.debug("rmq could not note the run of %s[%s]: %r", task.name, request.id, exc)
        return task._run_governed(rt, request, args, kwargs)
    return _run_holding_claim(task, rt, request, args, kwargs)


def run_copy(task: Any, rt: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a copy of ``task`` (a ``GovernedTask``) if :func:`admit_copy` lets it, holding the run
    claim until its outcome is stored."""
    claimed = admit_copy(task, rt, request)  # raises Ignore, or defers while another copy runs
    if not claimed:
        return task._run_governed(rt, request, args, kwargs)
    return _run_holding_claim(task, rt, request, args, kwargs)


def _run_holding_claim(task: Any, rt: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the body; the claim (held or noted) is released once nothing a waiting copy could miss
    remains to be stored."""
    try:
        result = task._run_governed(rt, request, args, kwargs)
    except (Retry, Ignore, Reject):  # nothing is stored that a waiting copy could miss
        release_claim(rt, request.id)
        raise
    except Exception:
        finished_copy.claim = request.id  # released by after_return, once the failure is stored
        raise
    except BaseException:  # the tracer re-raises these without storing or calling after_return
        release_claim(rt, request.id)
        raise
    finished_copy.claim = request.id  # released by after_return, once the result is stored
    return result


def admit_copy(task: Any, rt: Any, request: Any) -> bool:
    """Let a copy run at most once and never beside another run: defer it while another copy holds
    the run claim or the original still runs in this worker, Ignore it when the task already ended.
    Returns True when this copy now holds the claim, False when claims are unavailable.

    The claim comes first and the backend last: a run that stores its outcome and releases the
    claim while this copy looks is then seen ended. An original delivery takes no claim (a Redis
    round trip per task); while it runs, its reservation in this worker's ledger stands for it.
    """
    token = claim_token(request.hostname or "?", os.getpid())
    unavailable = False
    try:
        claimed = bool(rt.claims.acquire(request.id, token))
    except Exception as exc:  # no Redis for rmq, or it is down: the other checks still hold
        log.debug("rmq could not take the run claim of %s[%s]: %r", task.name, request.id, exc)
        claimed, unavailable = False, True
    if not claimed and not unavailable:
        running: str | None = claim_holder(rt, request.id)
    elif original_runs_here(rt, request.id):
        running = "the original, in this worker"
    else:
        running = None
    if already_ended(task, request):
        if claimed:
            release_claim(rt, request.id)
        log.warning("rmq: %s[%s] already ended; this copy does not run", task.name, request.id)
        rt.stats.incr("copies", "dropped")
        raise Ignore()
    if running is not None:
        if claimed:
            release_claim(rt, request.id)
        return task._defer(Defer(f"another run of this task is going on ({running})",  # type: ignore[no-any-return]
                                 rt.config.defer_countdown, kind="duplicate"))
    return claimed


def original_runs_here(rt: Any, task_id: str) -> bool:
    """Whether another live process of this worker holds a task reservation for ``task_id``.

    The reservation of a process killed from outside stays in the ledger until the governor's next
    tick: its copy, redelivered within about 0.2 s, would wait a whole deferral for a dead run. So
    a dead holder's reservation is released here, at once, and does not count.
    """
    me = forks.pid()
    if not rt.ledger.running(task_id, other_than=me):  # the common case: one look, no /proc read
        return False
    key = fit(task_id, 48)
    found = False
    for e in rt.ledger.entries():
        if e.kind != KIND_TASK or e.task_id != key or e.pid == me:
            continue
        if _alive(e.pid):
            found = True
        elif rt.ledger.remove(e) is not None:
            log.warning("rmq released the reservation of %s[%s] held by dead pid %d", e.name, task_id, e.pid)
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def claim_holder(rt: Any, task_id: str) -> str:
    """Who holds ``task_id``'s run claim, for the deferral's reason."""
    try:
        return rt.claims.holder(task_id) or "just ended"
    except Exception:
        return "unknown"


def release_claim(rt: Any, task_id: str) -> None:
    """Release this process's run claim of ``task_id``; a failure is only logged (the claim expires)."""
    try:
        rt.claims.release(task_id)
    except Exception as exc:  # it expires on its own
        log.debug("rmq could not release the run claim of %s: %r", task_id, exc)


def already_ended(task: Any, request: Any) -> bool:
    """One backend read: did this task id already reach a terminal state?"""
    if request.ignore_result:
        return False
    try:
        return task.backend.get_task_meta(request.id, cache=False).get("status") in states.READY_STATES
    except Exception as exc:  # no backend, or it is down: run it
        log.debug("rmq could not read the state of %s[%s]: %r", task.name, request.id, exc)
        return False
