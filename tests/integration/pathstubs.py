"""Profiling aid: take one part of the governed task path out of a worker, to price it in situ.

Import it into a worker (``SOAK_IMPORT=pathstubs``, or beside ``pathtiming`` through a module that
imports both) and set ``PATHSTUBS`` to a comma-separated list of parts; each is replaced by a
constant, so the run is wrong in that respect (no reservation, no learned peak, ...) and only its
CPU per task means anything. Compare ``GovernedTask.__call__`` (``pathtiming`` with
``PATHTIMING_PARTS=call``) with and without a part, several runs alternated: a busy pool process
varies by about 4 us per task from run to run.

Parts: ``concerns=none|admission|hygiene`` (only those concerns run), ``peak`` (the peak readings:
``clear_refs`` and ``getrusage``), ``flock`` (the ledger's file lock), ``ledger`` (admission's
ledger step and the release), ``learn`` (learned-peak look-up and record), ``models`` (the model
caches' byte counts), ``cgroupfiles`` (under kernel accounting, the pool cgroup's files read and
written around each task: the task is then measured as without it), ``floor`` (every concern
replaced by the steps any governed path must take per task, with no policy around them: the least a
fused admission-and-hygiene path could cost).
"""

from __future__ import annotations

import os

from rmq.celery import concerns as _concerns
from rmq.celery.task import GovernedTask
from rmq.core import ledger as _ledger
from rmq.memory import learning as _learning
from rmq.memory import reservation as _reservation
from rmq.memory.pool_cgroups import PoolCgroups

_parts = {p for p in os.environ.get("PATHSTUBS", "").split(",") if p}

for _part in _parts:
    if _part.startswith("concerns="):
        _names = {"none": (), "admission": ("admission",), "hygiene": ("hygiene",)}[_part.split("=", 1)[1]]
        _chosen = tuple(c for c in _concerns.default_concerns() if c.name in _names)
        # the class cache is never set while this stands in for _applicable_concerns
        GovernedTask._applicable_concerns = lambda self, _c=_chosen: _c  # type: ignore[method-assign]
if "peak" in _parts:
    _reservation.reset_peak_rss = lambda: True
    _reservation._children_peak = lambda: 0
    _reservation.peak_rss_bytes = lambda: 1
if "flock" in _parts:
    _ledger.fcntl = type("NoFlock", (), {"flock": staticmethod(lambda fd, op: None), "LOCK_EX": 2, "LOCK_NB": 4,
                                         "LOCK_UN": 8})
if "ledger" in _parts:
    _reservation._try_once = lambda *a, **k: _reservation.Verdict(True)
    _ledger.Ledger.release = lambda self, e: None  # type: ignore[method-assign]
if "learn" in _parts:
    _learning.PeakLearner.observe = lambda self, name, peak: None  # type: ignore[method-assign]
    _learning.PeakLearner.learned = lambda self, name: 1 << 20  # type: ignore[method-assign]
if "models" in _parts:
    for _g in _concerns.default_concerns():
        if _g.name in ("admission", "hygiene"):
            _g.model_bytes = lambda: 0  # type: ignore[attr-defined]
if "cgroupfiles" in _parts:
    PoolCgroups.begin_task = lambda self, pool_pid: None  # type: ignore[method-assign]
if "floor" in _parts:
    import resource

    from rmq.concern import Concern, TaskContext
    from rmq.core import forks
    from rmq.core.ledger import KIND_TASK, Entry
    from rmq.core.selfmem import own_rss_bytes, peak_rss_bytes, reset_peak_rss
    from rmq.memory.learning import learner

    class _Floor(Concern):
        """In place of every concern, what a governed path must do per task with no policy around it:
        the learned peak looked up, the readings a reservation is judged on read and the reservation
        added under the ledger's lock, then released, the RSS read before and after, the peak reset
        and read, the children's mark read and the peak recorded (the price of a fused
        admission-and-hygiene path, at best)."""

        name = "floor"

        def enter(self, ctx: TaskContext) -> None:
            rt = ctx.runtime
            assert rt is not None
            entry = Entry(KIND_TASK, forks.pid(), learner(rt).learned(ctx.task_name) or (64 << 20),
                          task_id=ctx.task_id, name=ctx.task_name, start_rss=own_rss_bytes())
            ledger = rt.ledger
            with ledger.locked():
                ledger.admission_readings()
                ledger.reserved_unlocked()
                ledger.add_unlocked(entry)
            reset_peak_rss()
            ctx.state["floor"] = entry

        def exit(self, ctx: TaskContext, failed: bool) -> None:
            entry = ctx.state.pop("floor")
            rt = ctx.runtime
            assert rt is not None
            rt.ledger.release(entry)
            peak = max(own_rss_bytes(), peak_rss_bytes() or 0) - entry.start_rss
            resource.getrusage(resource.RUSAGE_CHILDREN)
            learner(rt).observe(ctx.task_name, max(0, peak))

    _floor = (_Floor(),)
    GovernedTask._applicable_concerns = lambda self, _c=_floor: _c  # type: ignore[method-assign]
