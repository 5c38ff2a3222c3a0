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
written around each task: the task is then measured as without it).
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
