"""Admission through the ledger, in the pool process: memory, CPU slots and disk.

A task that does not fit first asks every pool process to unload models, then waits up
to ``rmq_admission_wait`` (re-checking as the governor's readings change), then is
deferred; so is a task that finds every slot of the ledger held. A task that could never fit
on an idle worker fails at once with :class:`~rmq.core.errors.BudgetExceeded`; one without
``memory=`` whose learned peak is larger than that runs alone instead. A task without
``memory=`` is admitted with its learned peak (:mod:`rmq.memory.learning`), and only such tasks
record their peaks (nothing reads the others'): the kernel's high-water mark of the process
since admission, so a spike between two governor readings counts too.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections.abc import Callable

from rmq.concern import Concern, TaskContext
from rmq.core import forks
from rmq.core.errors import BudgetExceeded, Defer
from rmq.core.ledger import KIND_TASK, Entry, Ledger, LedgerFull
from rmq.core.runtime import Runtime, current
from rmq.core.selfmem import peak_rss_bytes, reset_peak_rss
from rmq.memory.admission import Need, Verdict, judge
from rmq.memory.learning import learner
from rmq.memory.proctree import TREE_ENV

__all__ = ["AdmissionGuard"]

_POLL_S = 0.02


def _try_once(ledger: Ledger, entry: Entry, need: Need, disk_root: str | None, learned: bool = False) -> Verdict:
    """One atomic step: judge ``need`` against the reservations and the governor's latest readings,
    and add ``entry`` when it fits.

    A ``learned`` need (a task without ``memory=``) larger than what an idle worker admits is cut to
    that room: learned peaks are shared by every worker on the Redis, whatever its budget, so one
    learned on a bigger worker would otherwise fail the task here for ever. Cut, the task runs
    alone, and its peak on this worker is learned (docs/design.md#learning)."""
    disk = shutil.disk_usage(disk_root) if (need.disk_bytes and disk_root) else None
    with ledger.locked():  # the readings are published under the same lock as the reservations' usage
        worker, idle, admit_line, budget, cpu_slots = ledger.admission_readings()
        if learned and 0 < admit_line - idle < need.memory_bytes:
            need = need._replace(memory_bytes=admit_line - idle)
            entry.memory_bytes = need.memory_bytes
        v = judge(need, ledger.reserved_unlocked(), worker, idle, admit_line, budget, cpu_slots,
                  disk.free if disk else None, disk.used + disk.free if disk else None)
        if v.admitted:
            try:
                ledger.add_unlocked(entry)
            except LedgerFull as exc:  # no slot now: wait and defer like a task that does not fit
                return Verdict(False, False, "ledger", str(exc), 1, 0, ledger.slots)
    return v


def _wait_for_room(ledger: Ledger, entry: Entry, need: Need, wait_s: float, disk_root: str | None,
                   verdict: Verdict, learned: bool = False) -> Verdict:
    """After a first ``verdict`` that did not fit: ask for unloads, then re-try until ``wait_s`` ends."""
    deadline = time.monotonic() + wait_s
    asked_unload = False
    while not (verdict.admitted or verdict.never or time.monotonic() >= deadline):
        if verdict.resource in ("memory", "ledger") and not asked_unload:
            asked_unload = True
            # every pool process (this one too, through its watcher) unloads its share of one plan;
            # a full ledger is most often full of resident models, and unloading frees their slots
            ledger.request_unload(min(need.memory_bytes, entry.memory_bytes) - verdict.available)
        time.sleep(_POLL_S)
        verdict = _try_once(ledger, entry, need, disk_root, learned)
    return verdict


def _children_peak() -> int:
    """The largest RSS any waited-for descendant of this process reached (``ru_maxrss``, KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


class AdmissionGuard(Concern):
    """Reserves the task's memory, CPU slots and disk in the worker's ledger."""

    name = "admission"

    def __init__(self, model_bytes: Callable[[], int] = lambda: 0) -> None:
        #: bytes of the models this process has loaded: they hold their own reservations, so a
        #: learned peak leaves out the ones the task loaded
        self.model_bytes = model_bytes

    def process_start(self, rt: Runtime) -> None:
        # what a task of this process execs carries its pool pid, so that the governor still counts
        # (and kills) a descendant that double-forked away from the tree (docs/design.md#task-trees)
        os.environ[TREE_ENV] = str(os.getpid())

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or current()
        if rt is None:
            return
        decl = ctx.declaration
        memory = decl.memory_bytes
        learning = memory is None
        if memory is None:
            memory = max(rt.config.default_task_memory, learner(rt).learned(ctx.task_name))
        ctx.memory_bytes = memory
        need = Need(memory, decl.cpu_slots, decl.disk_bytes)
        disk_root = rt.config.session_root_path if decl.disk_bytes else None
        if disk_root:
            os.makedirs(disk_root, exist_ok=True)
        entry = Entry(
            KIND_TASK, forks.pid(), memory, decl.cpu_slots, decl.disk_bytes,
            task_id=ctx.task_id, name=ctx.task_name, start_rss=ctx.rss_before_body(),
        )
        v = _try_once(rt.ledger, entry, need, disk_root, learning)
        if not v.admitted and not v.never:
            v = _wait_for_room(rt.ledger, entry, need, rt.config.admission_wait, disk_root, v, learning)
        if v.admitted:
            ctx.memory_bytes = entry.memory_bytes  # a learned need may have been cut to the idle worker's room
            ctx.state["admission"] = entry
            if learning:  # the models it loads are not part of its peak; the kernel keeps the peak
                ctx.state["models_loaded"] = self.model_bytes()
                ctx.state["peak_reset"] = reset_peak_rss()
                ctx.state["children_peak"] = _children_peak()
            rt.stats.incr("admitted")
            return
        if v.never:
            rt.stats.incr("rejected", v.resource)
            raise BudgetExceeded(ctx.task_name, v.resource, v.declared, v.available, v.budget)
        raise Defer(v.reason, rt.config.defer_countdown, kind=v.resource)

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        entry: Entry | None = ctx.state.pop("admission", None)
        rt = ctx.runtime or current()
        if rt is None or entry is None:
            return
        peak_seen = rt.ledger.release(entry)  # the governor's peak reading of this reservation
        if failed or ctx.declaration.memory_bytes is not None:  # only undeclared tasks are admitted by it
            return
        # The kernel's high-water mark since admission catches a peak shorter than the governor's
        # interval; the RSS after the body is read before hygiene trims, so garbage the task left
        # behind counts too.
        kernel_peak = peak_rss_bytes() if ctx.state.pop("peak_reset", False) else None
        own = max(ctx.rss_after_body() - entry.start_rss, (kernel_peak or 0) - entry.start_rss, 0)
        # a subprocess the task waited for: the kernel's high-water mark of the largest one, when it
        # rose during this task, on top of the process's own growth (the governor's tree reading may
        # have missed a short one between two samples)
        children = _children_peak()
        child_peak = children if children > ctx.state.pop("children_peak", children) else 0
        peak = max(own + child_peak, peak_seen or 0)
        # models the task loaded hold their own reservations: not part of the task's peak
        peak = max(0, peak - (self.model_bytes() - ctx.state.pop("models_loaded", 0)))
        learner(rt).observe(ctx.task_name, peak)
