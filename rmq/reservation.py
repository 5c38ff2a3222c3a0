"""Admission through the ledger, in the pool process: memory, CPU slots and disk.

A task that does not fit first asks every pool process to unload models, then waits up
to ``rmq_admission_wait`` (re-checking as the governor's readings change), then is
deferred. A task that could never fit on an idle worker fails at once with
:class:`~rmq.errors.BudgetExceeded`. A task without ``memory=`` is admitted with its learned peak
(:mod:`rmq.learning`), and only such tasks record their peaks: nothing reads the others'.
"""

from __future__ import annotations

import os
import shutil
import time

from . import forks, models
from .admission import Need, Verdict, judge
from .errors import BudgetExceeded, Defer
from .guards import Guard, TaskContext
from .ledger import KIND_TASK, Entry, Ledger, Reserved
from .runtime import Runtime, current

__all__ = ["AdmissionGuard"]

_POLL_S = 0.02


def _admit(
    rt: Runtime, entry: Entry, need: Need, wait_s: float, disk_root: str | None = None
) -> Verdict:
    """Try to add ``entry`` to the ledger, waiting up to ``wait_s``; returns the last verdict."""
    ledger: Ledger = rt.ledger
    deadline = time.monotonic() + wait_s
    asked_unload = False
    while True:
        verdict = _try_once(ledger, entry, need, disk_root)
        if verdict.admitted or verdict.never or time.monotonic() >= deadline:
            return verdict
        if verdict.resource == "memory" and not asked_unload:
            asked_unload = True
            # every pool process (this one too, through its watcher) unloads its share of one plan
            ledger.request_unload(need.memory_bytes - verdict.available)
        time.sleep(_POLL_S)


def _try_once(ledger: Ledger, entry: Entry, need: Need, disk_root: str | None) -> Verdict:
    disk_free = shutil.disk_usage(disk_root).free if (need.disk_bytes and disk_root) else None
    verdicts: list[Verdict] = []

    def fits(reserved: Reserved) -> bool:
        control = ledger.read_control()  # under the lock: consistent with the reservations' usage
        v = judge(
            need, reserved, control.worker_bytes, control.idle_bytes, control.admit_line_bytes,
            control.budget_bytes, control.cpu_slots, disk_free,
        )
        verdicts.append(v)
        return v.admitted

    ledger.try_add(entry, fits)
    return verdicts[-1]


class AdmissionGuard(Guard):
    """Reserves the task's memory, CPU slots and disk in the worker's ledger."""

    name = "admission"

    def enter(self, ctx: TaskContext) -> None:
        rt = current()
        if rt is None:
            return
        decl = ctx.declaration
        memory = decl.memory_bytes
        if memory is None:
            memory = max(rt.config.default_task_memory, rt.learner.learned(ctx.task_name))
        ctx.memory_bytes = memory
        need = Need(memory, decl.cpu_slots, decl.disk_bytes)
        disk_root = rt.config.session_root_path if decl.disk_bytes else None
        if disk_root:
            os.makedirs(disk_root, exist_ok=True)
        entry = Entry(
            KIND_TASK, forks.pid(), memory, decl.cpu_slots, decl.disk_bytes,
            task_id=ctx.task_id, name=ctx.task_name, start_rss=ctx.rss_before_body(),
        )
        v = _admit(rt, entry, need, rt.config.admission_wait, disk_root)
        if v.admitted:
            ctx.state["admission"] = entry
            ctx.state["models_loaded"] = models.loaded_bytes()
            rt.stats.incr("admitted")
            return
        if v.never:
            rt.stats.incr("rejected", v.resource)
            raise BudgetExceeded(ctx.task_name, v.resource, v.declared, v.available, v.budget)
        raise Defer(v.reason, rt.config.defer_countdown, kind=v.resource)

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        rt = current()
        entry: Entry | None = ctx.state.pop("admission", None)
        if rt is None or entry is None:
            return
        stored = rt.ledger.remove(entry)  # the governor's copy carries the peak it measured
        # measured before hygiene trimmed: garbage the task left behind was part of its peak
        peak = max(ctx.rss_after_body() - entry.start_rss, stored.peak_used_bytes if stored is not None else 0, 0)
        # models the task loaded hold their own reservations: not part of the task's peak
        peak = max(0, peak - (models.loaded_bytes() - ctx.state.pop("models_loaded", 0)))
        if not failed and ctx.declaration.memory_bytes is None:  # only undeclared tasks are admitted by it
            rt.learner.observe(ctx.task_name, peak)
