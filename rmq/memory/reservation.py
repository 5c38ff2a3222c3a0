"""Admission through the ledger, in the pool process: memory, CPU slots and disk.

A task that does not fit first asks every pool process to unload models, then waits up
to ``rmq_admission_wait`` (re-checking as the governor's readings change), then is
deferred; so is a task that finds every slot of the ledger held. A task that could never fit
on an idle worker fails at once with :class:`~rmq.core.errors.BudgetExceeded`; one without
``memory=`` whose learned peak is larger than that runs alone instead. A task is admitted with
its learned peak when it has one (:mod:`rmq.memory.learning`), whether it declared ``memory=`` or
not, and one with neither reserves a share of the idle worker until it has. Every successful run records its peak: the
kernel's high-water mark since admission (of the pool process's cgroup under kernel accounting,
else of the process and its largest waited-for subprocess), so a spike between two governor
readings counts too.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from collections.abc import Callable

from rmq.concern import Concern, TaskContext
from rmq.core import forks
from rmq.core.errors import BudgetExceeded, Defer
from rmq.core.ledger import KIND_TASK, Entry, Ledger, LedgerFull, Reserved
from rmq.core.runtime import Runtime, current
from rmq.core.selfmem import peak_rss_bytes, reset_peak_rss
from rmq.memory.admission import Need, Verdict, judge
from rmq.memory.learning import learner
from rmq.memory.pool_cgroups import PoolCgroups
from rmq.memory.proctree import TREE_ENV

__all__ = ["AdmissionGuard"]

log = logging.getLogger("rmq.memory.reservation")

_POLL_S = 0.02
#: how often a waiting task reads its learned peak again
_RENEW_S = 0.1
#: a need that stands for "a share of the idle worker" (a task nothing is known of): worked out by
#: ``_try_once`` from the readings of the moment
_UNKNOWN = 1 << 62


#: the worker's memory read afresh: its kernel count, and each running task's cgroup count then, by
#: (pool pid, task id)
Fresh = tuple[int, dict[tuple[int, str], int]]


def _try_once(ledger: Ledger, entry: Entry, need: Need, disk_root: str | None, learned: bool = False,
              share: float = 1.0, worker_now: Callable[[], Fresh | None] | None = None) -> Verdict:
    """One atomic step: judge ``need`` against the reservations and the governor's latest readings,
    and add ``entry`` when it fits.

    A ``learned`` need (an estimate) larger than what an idle worker admits beside its resident models
    is cut to that room: learned peaks are shared by every worker on the Redis, whatever its budget,
    so one learned on a bigger worker would otherwise fail the task here for ever. Cut, the task runs
    alone, and its peak on this worker is learned (docs/design.md#learning). A task nothing is known
    of (``_UNKNOWN``) takes ``share`` of that room.

    ``worker_now`` reads the worker's memory afresh (the kernel's count, under kernel accounting) in
    place of the governor's last reading: memory a neighbour freed when it ended then admits the
    next task at once, not at the governor's next sample. The running tasks' use is read with it (just
    before: a growth between the two reads counts twice, on the safe side); against the governor's
    last sample, a task that started since would count twice until that sample, and the last task of
    each wave waited up to a sample interval (250 ms) for room it had."""
    disk = shutil.disk_usage(disk_root) if (need.disk_bytes and disk_root) else None
    fresh = worker_now() if worker_now is not None else None
    with ledger.locked():  # the readings are published under the same lock as the reservations' usage
        worker, idle, admit_line, budget, cpu_slots = ledger.admission_readings()
        if fresh is not None:
            worker, used_now = fresh
            reserved = _reserved_now(ledger, used_now)
        else:
            reserved = ledger.reserved_unlocked()
        # alone: the idle worker, and the models resident in it (a pinned one never leaves)
        alone = admit_line - idle - reserved.model_bytes
        if learned and need.memory_bytes == _UNKNOWN:  # its share of what there is, however little
            need = need._replace(memory_bytes=max(1, int(max(0, alone) * share)))
            entry.memory_bytes = need.memory_bytes
        elif learned and 0 < alone < need.memory_bytes:
            need = need._replace(memory_bytes=alone)
            entry.memory_bytes = need.memory_bytes
        v = judge(need, reserved, worker, idle, admit_line, budget, cpu_slots,
                  disk.free if disk else None, disk.used + disk.free if disk else None)
        if v.admitted:
            try:
                ledger.add_unlocked(entry)
            except LedgerFull as exc:  # no slot now: wait and defer like a task that does not fit
                return Verdict(False, False, "ledger", str(exc), 1, 0, ledger.slots)
    return v


def _reserved_now(ledger: Ledger, used_now: dict[tuple[int, str], int]) -> Reserved:
    """The reservations' sums with each task's use read afresh (call under the ledger's lock). A
    reading counts only for the run it was taken of: the pool process may have started another since."""
    entries = ledger.entries_unlocked()
    for e in entries:
        got = used_now.get((e.pid, e.task_id)) if e.kind == KIND_TASK else None
        if got is not None:
            e.used_bytes = max(e.used_bytes, got - e.start_rss)
    return Reserved.of(entries)


def _wait_for_room(ledger: Ledger, entry: Entry, need: Need, wait_s: float, disk_root: str | None,
                   verdict: Verdict, learned: bool = False,
                   renew: Callable[[], tuple[int, bool]] | None = None, share: float = 1.0,
                   worker_now: Callable[[], Fresh | None] | None = None) -> Verdict:
    """After a first ``verdict`` that did not fit: ask for unloads, then re-try until ``wait_s`` ends.
    ``renew`` gives the reservation again (a peak learned meanwhile by a neighbour's run);
    ``worker_now`` reads the worker's memory afresh for each re-try (see :func:`_try_once`)."""
    deadline = time.monotonic() + wait_s
    asked_unload = False
    renewed_at = time.monotonic()
    while not (verdict.admitted or verdict.never or time.monotonic() >= deadline):
        if renew is not None and time.monotonic() - renewed_at >= _RENEW_S:
            renewed_at = time.monotonic()
            memory, learned = renew()
            need = need._replace(memory_bytes=memory)
            entry.memory_bytes = memory
        if verdict.resource in ("memory", "ledger") and not asked_unload:
            asked_unload = True
            # every pool process (this one too, through its watcher) unloads its share of one plan;
            # a full ledger is most often full of resident models, and unloading frees their slots
            ledger.request_unload(min(need.memory_bytes, entry.memory_bytes) - verdict.available)
        time.sleep(_POLL_S)
        verdict = _try_once(ledger, entry, need, disk_root, learned, share, worker_now)
    return verdict


def _children_peak() -> int:
    """The largest RSS any waited-for descendant of this process reached (``ru_maxrss``, KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


#: :func:`_children_peak` as the last task of this pool process left it (``None``: not read yet).
#: Nothing between two tasks waits for a child, so it is the next task's figure before its body too:
#: one ``getrusage`` a task, not two (docs/guarantees.md#p1)
_children_seen: int | None = None


def _forget_children_seen() -> None:
    global _children_seen
    _children_seen = None


os.register_at_fork(after_in_child=_forget_children_seen)


def _children_before() -> int:
    return _children_seen if _children_seen is not None else _children_peak()


def _children_after() -> int:
    global _children_seen
    _children_seen = seen = _children_peak()
    return seen


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
        pools = _pools(rt)
        if pools is not None:  # before the first task: all it allocates is charged to its own cgroup
            try:
                pools.adopt(os.getpid())
            except OSError as exc:
                log.warning("rmq could not move pool process %d into %s: %s", os.getpid(),
                            pools.path_for(os.getpid()), exc)

    @staticmethod
    def reservation(rt: Runtime, ctx: TaskContext) -> tuple[int, bool]:
        """What to reserve for this run, and whether it is an estimate (``True``: cut to the idle
        room rather than fail, docs/design.md#learning).

        A learned peak refines a declaration both ways: under a generous ceiling it frees the rest
        for neighbours, over a lying one it reserves what the task really takes. A re-run after a
        memory kill reserves at least what the kill saw (``rmq_reserve``). A task with neither a
        declaration nor a learned peak reserves ``rmq_unknown_share`` of what the idle worker admits
        until its peak is known.
        """
        declared = ctx.declaration.memory_bytes
        learned = learner(rt).learned(ctx.task_name)
        floor = ctx.min_memory_bytes
        # a learned peak, like what a kill saw, is an estimate: more than the idle room now (learned on
        # a bigger worker, or models came in since), the task runs alone rather than fail or wait
        if learned:
            return max(learned, floor, rt.config.default_task_memory), True
        if declared is not None:
            return max(declared, floor), floor > 0
        if rt.config.unknown_share:
            return _UNKNOWN, True
        return max(rt.config.default_task_memory, floor), True

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or current()
        if rt is None:
            return
        decl = ctx.declaration
        memory, estimate = self.reservation(rt, ctx)
        ctx.memory_bytes = memory
        need = Need(memory, decl.cpu_slots, decl.disk_bytes)
        disk_root = rt.config.session_root_path if decl.disk_bytes else None
        if disk_root:
            os.makedirs(disk_root, exist_ok=True)
        pid = forks.pid()
        accounting = getattr(rt, "accounting", None)  # _pools() inlined: this runs per task
        pools = accounting.pools if accounting is not None else None
        start = begun = None
        if pools is not None:
            _in_own_cgroup(rt, pools)
            # kernel accounting: the task is measured from its pool cgroup's count, its peak by the kernel
            begun = pools.begin_task(pid)
        if begun is not None:
            start, start_working_set = begun
        else:
            start_working_set = ctx.rss_before_body()
        entry = Entry(
            KIND_TASK, pid, memory, decl.cpu_slots, decl.disk_bytes,
            task_id=ctx.task_id, name=ctx.task_name, start_rss=start_working_set,
        )
        share = rt.config.unknown_share
        v = _try_once(rt.ledger, entry, need, disk_root, estimate, share)
        if not v.admitted and not v.never:
            # a peak learned meanwhile (a neighbour of the same name ended) applies to a waiting run too
            v = _wait_for_room(rt.ledger, entry, need, rt.config.admission_wait, disk_root, v, estimate,
                               lambda: self.reservation(rt, ctx), share,
                               _fresh_for_known(rt, pools, ctx.task_name) if pools is not None else None)
        if v.admitted:
            ctx.memory_bytes = entry.memory_bytes  # an estimate may have been cut to the idle worker's room
            # what exit needs, in one tuple (one state entry per task, not five): the reservation, the
            # cgroup's count at the start, the models loaded so far, whether the peak was reset, and the
            # children's high-water mark before the body. Under kernel accounting the pool cgroup's
            # high-water mark is the whole tree's peak: the process's own and its children's are not
            # read (four system calls a task, docs/guarantees.md#p1)
            if start is not None:
                ctx.state["admission"] = (entry, start, self.model_bytes(), False, 0)
            else:
                ctx.state["admission"] = (entry, None, self.model_bytes(), reset_peak_rss(), _children_before())
            rt.stats.incr("admitted")
            return
        if v.never:
            rt.stats.incr("rejected", v.resource)
            raise BudgetExceeded(ctx.task_name, v.resource, v.declared, v.available, v.budget)
        raise Defer(v.reason, rt.config.defer_countdown, kind=v.resource)

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        held: tuple[Entry, int | None, int, bool, int] | None = ctx.state.pop("admission", None)
        rt = ctx.runtime or current()
        if rt is None or held is None:
            return
        entry, start, models_loaded, peak_reset, children_before = held
        peak_seen = rt.ledger.release(entry)  # the governor's peak reading of this reservation
        children = _children_after() if start is None else 0  # failed too: the next task starts from it
        if failed:
            return
        # The kernel's high-water mark since admission catches a peak shorter than the governor's
        # interval; the RSS after the body is read before hygiene trims, so garbage the task left
        # behind counts too.
        before = ctx.rss_before_body()
        grown = ctx.rss_after_body() - before
        if peak_reset:
            grown = max(grown, (peak_rss_bytes() or 0) - before)
        # a subprocess the task waited for: the kernel's high-water mark of the largest one, when it
        # rose during this task, on top of the process's own growth (the governor's tree reading may
        # have missed a short one between two samples)
        peak = max(grown, 0) + (children if children > children_before else 0)
        if peak_seen and peak_seen > peak:
            peak = peak_seen
        if start is not None:
            pools = _pools(rt)
            if pools is not None:  # the cgroup's own high-water mark: the whole tree
                tree_peak = pools.peak(forks.pid())
                if tree_peak is not None:
                    peak = max(peak, tree_peak - start)
        # models the task loaded hold their own reservations: not part of the task's peak (models
        # unloaded meanwhile freed memory the task's peak never counted: nothing to add back)
        loaded = self.model_bytes() - models_loaded
        if loaded > 0:
            peak = max(0, peak - loaded)
        learner(rt).observe(ctx.task_name, peak)


def _pools(rt: Runtime) -> PoolCgroups | None:
    accounting = getattr(rt, "accounting", None)
    return accounting.pools if accounting is not None else None


def _fresh_for_known(rt: Runtime, pools: PoolCgroups, task_name: str) -> Callable[[], Fresh | None]:
    """The kernel's counts of the worker and of each running task, read afresh, for a task whose peak
    its own runs taught; else ``None`` (the governor's last readings). A declaration may lie and an
    unknown task may be large: admitted the moment a neighbour's memory came back, such a run would
    take it before the peak a kill or a neighbour's run just taught reaches it (read again every 0.1 s
    while it waits), and grow into the cap; waiting for the governor's next reading gives it that time."""

    def read() -> Fresh | None:
        if not learner(rt).learned(task_name):
            return None
        used = {}
        for e in rt.ledger.entries():  # the tasks first: what they grow by before the worker's read counts twice
            if e.kind == KIND_TASK and (got := pools.usage(e.pid)) is not None:
                used[(e.pid, e.task_id)] = got
        worker = pools.worker.working_set_bytes()
        return (worker, used) if worker is not None else None

    return read


def _in_own_cgroup(rt: Runtime, pools: PoolCgroups) -> None:
    """Make sure this pool process is in its cgroup before a task runs, or defer the task.

    Moving in can fail: the kernel makes a cgroup with memory charged where the process is, and
    next to pools held at their cap that fails (``ENOMEM``). A task run from outside the pools'
    cgroup is outside their cap too: its memory fills the worker's cgroup beside the main process,
    and the worker's limit, not rmq, then chooses a victim (the kernel's OOM killer)."""
    pid = forks.pid()
    if pools.adopted_pid == pid:
        return
    try:
        pools.adopt(pid)
    except OSError as exc:  # counted as deferred.cgroup
        raise Defer(f"its pool process could not move into its memory cgroup yet ({exc.strerror or exc})",
                    rt.config.defer_countdown, kind="cgroup") from exc
