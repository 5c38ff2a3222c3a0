"""Recycling a prefork pool process after its current task, never during it (billiard's loop).

Memory hygiene (:mod:`rmq.memory.hygiene`) decides that a process leaks; this is how a prefork
worker acts on it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rmq.core import runtime

__all__ = ["request_recycle"]

log = logging.getLogger("rmq.memory.hygiene")  # the decision's logger: one place to read leaks


_recycle_requested_pid = 0


def _pool_worker() -> Any | None:
    """The billiard ``Worker`` whose loop runs this process, or None (solo/threads pool, tests)."""
    try:
        from billiard.pool import Worker
        from billiard.process import current_process
    except ImportError:  # pragma: no cover - billiard comes with Celery
        return None
    worker = getattr(current_process(), "_target", None)
    return worker if isinstance(worker, Worker) else None


def _always() -> bool:
    return True


def request_recycle(reason: str, detail: str = "", suspect_task: str | None = None) -> bool:
    """Make this pool process exit after the task it is running, never during it.

    Mechanism: billiard's worker loop checks a "should shut down" callable at the top of each
    iteration, after the previous job's result was put on the result queue and before it
    reads the next job; when true it leaves the loop, waits until the parent consumed every
    result it sent (``_ensure_messages_consumed``), exits with status 0, and the pool starts a
    replacement. This is the path ``Pool.restart()`` (Celery's ``pool_restart``) uses. When the
    pool created a restart sentinel for this process (``allow_restart``), it is set; otherwise
    the loop's ``should_shutdown`` closure variable is pointed at a function returning True.
    Nothing interrupts the running task: the flag is only read when the loop asks for work.

    Counts ``hygiene.recycles.<reason>`` and ``hygiene.recycled_for.<suspect task>`` (counters
    outlive the process: the snapshot folds those of exited processes into a retired total)
    and logs a WARNING once per process.

    Args:
        reason: short counter key, e.g. ``"slope"`` or ``"ceiling"``.
        detail: figures for the log line.
        suspect_task: the task name most associated with the growth.

    Returns:
        True when the process will exit after this task; False outside a billiard pool process.
    """
    global _recycle_requested_pid
    pid = os.getpid()
    if _recycle_requested_pid == pid:
        return True
    worker = _pool_worker()
    ok = False
    if worker is not None:
        sentinel = getattr(worker, "_shutdown", None)
        receive = getattr(worker, "wait_for_job", None)
        code = getattr(receive, "__code__", None)
        closure = getattr(receive, "__closure__", None)
        if sentinel is not None:
            sentinel.set()
            ok = True
        elif code is not None and closure is not None and "should_shutdown" in code.co_freevars:
            closure[code.co_freevars.index("should_shutdown")].cell_contents = _always
            ok = True
    rt = runtime.current()
    suffix = f" ({detail})" if detail else ""
    if not ok:
        log.warning(
            "rmq: process %d should be recycled (%s%s; suspect task %s) but is not a prefork pool process",
            pid,
            reason,
            suffix,
            suspect_task or "unknown",
        )
        if rt is not None:
            rt.stats.incr("hygiene", "recycle_unavailable")
        return False
    _recycle_requested_pid = pid
    log.warning(
        "rmq: recycling pool process %d after its current task: %s%s; suspect task %s",
        pid,
        reason,
        suffix,
        suspect_task or "unknown",
    )
    if rt is not None:
        rt.stats.incr("hygiene", "recycles", reason)
        rt.stats.incr("hygiene", "recycled_for", suspect_task or "unknown")
        rt.stats.flush(force=True)
    return True
