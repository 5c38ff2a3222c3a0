"""Memory hygiene between tasks (C9): trim after growth, detect leaks, recycle gracefully.

After a governed task, a pool process that grew past its idle baseline by more than
``rmq_hygiene_margin`` runs ``gc.collect()`` and ``malloc_trim(0)`` and counts the bytes that
came back. Its baseline after hygiene (cached models excluded) feeds a :class:`LeakDetector`;
when the baseline keeps growing, or is about to pass ``rmq_leak_ceiling``, the process is
recycled after its current task by the recycler it is given (in a prefork worker
:func:`rmq.celery.recycle.request_recycle`).

Memory is read as RSS from ``/proc/self/statm`` (:mod:`rmq.core.selfmem`, about 2 us). USS costs
about 1 ms (it walks ``smaps_rollup``) and only deltas matter here: pages a forked child shares
with its parent sit in its RSS from the first task on, so they cancel out of every growth figure.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmq.concern import Concern, TaskContext
from rmq.core import runtime
from rmq.core.config import RmqConfig
from rmq.core.declarations import TaskDeclaration
from rmq.core.selfmem import own_rss_bytes as rss_bytes
from rmq.core.units import format_bytes
from rmq.memory.trim import collect_and_trim

__all__ = ["HygieneGuard", "LeakDetector", "cannot_recycle", "rss_bytes"]

log = logging.getLogger("rmq.memory.hygiene")


class LeakDetector:
    """Decides from a process's post-task baselines whether it leaks (pure, no readings).

    Args:
        slope_bytes_per_task: least-squares growth per task over the window that counts as a leak.
        window: number of recent baselines the slope is fitted on (>= 2).
        ceiling_bytes: recycle before the baseline would pass this, or ``None``.
    """

    def __init__(self, slope_bytes_per_task: int, window: int, ceiling_bytes: int | None = None) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.slope_bytes_per_task = slope_bytes_per_task
        self.window = window
        self.ceiling_bytes = ceiling_bytes
        self.baselines: deque[int] = deque(maxlen=window)
        #: how far each task took the process above the baseline before it (peak - previous baseline)
        self.rises: deque[int] = deque(maxlen=window)
        self.first_baseline: int | None = None
        #: sum of baseline deltas by the task that ran between the two readings
        self.attributed: dict[str, int] = {}
        self.observed = 0

    def observe(self, task_name: str, baseline_bytes: int, peak_bytes: int | None = None) -> None:
        """Record the baseline measured after ``task_name`` ran (hygiene done, models excluded).

        ``peak_bytes``: the process's memory when the task ended, before hygiene (models
        excluded), when known; the ceiling rule then also keeps the next task's transient
        growth (garbage it leaves until hygiene runs) under the ceiling.
        """
        if self.baselines:
            delta = baseline_bytes - self.baselines[-1]
            self.attributed[task_name] = self.attributed.get(task_name, 0) + delta
            if peak_bytes is not None:
                self.rises.append(max(0, peak_bytes - self.baselines[-1]))
        if self.first_baseline is None:
            self.first_baseline = baseline_bytes
        self.baselines.append(baseline_bytes)
        self.observed += 1

    def slope(self) -> float | None:
        """Least-squares growth in bytes per task over the recent baselines (None below 2)."""
        n = len(self.baselines)
        if n < 2:
            return None
        x_mean = (n - 1) / 2
        y_mean = sum(self.baselines) / n
        num = sum((x - x_mean) * (y - y_mean) for x, y in enumerate(self.baselines))
        den = sum((x - x_mean) ** 2 for x in range(n))
        return num / den

    def expected_growth(self) -> float:
        """Growth one more task is expected to add: the lower median of the recent steps, >= 0.

        A median, unlike the slope, ignores a single step up (a library loaded on first use),
        so a process does not get recycled, and its replacement after it, for one jump.
        """
        if len(self.baselines) < 3:
            return 0.0
        steps = [b - a for a, b in itertools.pairwise(self.baselines)]
        return max(0.0, float(statistics.median_low(steps)))

    def expected_rise(self) -> float:
        """How far above the last baseline one more task is expected to take the process, >= 0.

        The lower median of the recent rises (a task's peak minus the baseline before it), at
        least :meth:`expected_growth`; just the growth while fewer than 2 rises are known.
        """
        growth = self.expected_growth()
        if len(self.rises) < 2:
            return growth
        return max(growth, float(statistics.median_low(self.rises)))

    def should_recycle(self) -> tuple[bool, str]:
        """``(True, "ceiling" | "slope")`` when the process should be recycled, else ``(False, "")``.

        ``ceiling``: the last baseline plus one more task's expected growth reaches the ceiling,
        or, once the baseline grew since this process's first task (so that a fresh process
        would start lower), the last baseline plus one more task's expected rise does.
        ``slope``: over a full window, the fitted slope reaches the threshold, the baseline rose by
        at least half what that slope implies, and at least half the steps were real increases
        (so one step up, a module imported once, is not a leak).
        """
        if not self.baselines:
            return False, ""
        last = self.baselines[-1]
        if self.ceiling_bytes is not None:
            if last + self.expected_growth() >= self.ceiling_bytes:
                return True, "ceiling"
            grew = self.first_baseline is not None and last > self.first_baseline
            if grew and last + self.expected_rise() >= self.ceiling_bytes:
                return True, "ceiling"
        if len(self.baselines) < self.window:
            return False, ""
        span = len(self.baselines) - 1
        if last - self.baselines[0] < self.slope_bytes_per_task * span / 2:  # cheap test first: runs every task
            return False, ""
        slope = self.slope()
        if slope is None or slope < self.slope_bytes_per_task:
            return False, ""
        rising = sum(1 for a, b in itertools.pairwise(self.baselines) if b - a >= self.slope_bytes_per_task / 2)
        return (True, "slope") if rising * 2 >= span else (False, "")

    def suspect(self) -> str | None:
        """The task name with the largest net baseline growth attributed to it, if any grew."""
        items = list(self.attributed.items())  # one step: the gauges may be built on another thread
        if not items:
            return None
        name, total = max(items, key=lambda kv: kv[1])
        return name if total > 0 else None

    def explain(self, reason: str) -> str:
        """A sentence with the figures behind ``reason``, for the log."""
        last = self.baselines[-1] if self.baselines else 0
        if reason == "ceiling":
            rise = self.expected_rise()
            shown = rise - self.expected_growth() >= 4 * 1024 * 1024  # a real transient, not noise
            peak = f", peaking {format_bytes(rise)} above it," if shown else ""
            return (
                f"baseline {format_bytes(last)} growing {format_bytes(self.expected_growth())}/task{peak} "
                f"reaches the ceiling {format_bytes(self.ceiling_bytes)}"
            )
        return (
            f"baseline grew {format_bytes(self.slope() or 0.0)}/task over the last {len(self.baselines)} tasks "
            f"(threshold {format_bytes(self.slope_bytes_per_task)}/task), now {format_bytes(last)}"
        )


def cannot_recycle(reason: str, detail: str = "", suspect_task: str | None = None) -> bool:
    """The recycler of a process no pool can replace (a unit test, a script): says so, recycles nothing."""
    log.warning("rmq: process %d should be recycled (%s; suspect task %s) but nothing can replace it",
                os.getpid(), reason, suspect_task or "unknown")
    return False


@dataclass
class _ProcessState:
    idle_bytes: int | None = None
    first_baseline: int | None = None
    returned_bytes: int = 0
    detector: LeakDetector | None = None
    recycling: str = ""
    cannot_recycle: bool = False
    baseline: int = 0
    last_task_growth: int = 0
    published: bool = False

    def gauges(self) -> dict[str, Any]:
        """The ``hygiene`` gauges of this process (built when the counters file is written)."""
        detector = self.detector
        return {
            "baseline_bytes": self.baseline,
            "growth_bytes": self.baseline - (self.first_baseline or 0),
            "returned_bytes": self.returned_bytes,
            "suspect_task": detector.suspect() if detector is not None else None,
            "last_task_growth_bytes": self.last_task_growth,
            "tasks": detector.observed if detector is not None else 0,
            "recycling": self.recycling or None,
        }


class HygieneGuard(Concern):
    """Runs after each task with ``hygiene=True``: trims when the process grew, watches for leaks.

    Args:
        memory_probe: this process's memory in bytes (default :func:`rss_bytes`).
        model_bytes: bytes this process's model cache holds, excluded from the baseline.
        trim: frees garbage and returns heap to the OS (default ``collect_and_trim``).
        recycle: called as ``recycle(reason, detail=..., suspect_task=...)`` to recycle.
    """

    name = "hygiene"

    def __init__(
        self,
        memory_probe: Callable[[], int] = rss_bytes,
        model_bytes: Callable[[], int] = lambda: 0,
        trim: Callable[[], object] = collect_and_trim,
        recycle: Callable[..., bool] = cannot_recycle,
    ) -> None:
        self.memory_probe = memory_probe
        self.model_bytes = model_bytes
        self.trim = trim
        self.recycle = recycle

    def applies(self, declaration: TaskDeclaration) -> bool:
        """Only for tasks declared with ``hygiene=True`` (the default)."""
        return declaration.hygiene

    def enter(self, ctx: TaskContext) -> None:
        """Record the process's memory before the task."""
        rt = ctx.runtime or runtime.current()
        if rt is None:
            return
        state: _ProcessState = rt.local("hygiene", _ProcessState)
        # net of cached models: a model unloaded during the task must not hide the task's own garbage
        now = ctx.rss_before_body(self.memory_probe) - int(self.model_bytes())
        ctx.state[self.name] = (rt, state, now)
        if state.idle_bytes is None or now < state.idle_bytes:
            state.idle_bytes = now

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        """Trim if the process grew past ``rmq_hygiene_margin``, feed the leak detector, publish."""
        entered = ctx.state.pop(self.name, None)
        if entered is None:
            return
        rt, state, start = entered
        before = ctx.rss_after_body(self.memory_probe) - int(self.model_bytes())
        after = before
        idle = state.idle_bytes if state.idle_bytes is not None else start
        if before - idle > ctx.config.hygiene_margin:
            self.trim()
            after = self.memory_probe() - int(self.model_bytes())
            returned = max(0, before - after)
            state.returned_bytes += returned
            rt.stats.incr("hygiene", "runs")
            rt.stats.incr("hygiene", "bytes_returned", n=returned)
            state.idle_bytes = after
        elif after < idle:
            state.idle_bytes = after
        baseline = max(0, after)
        if state.first_baseline is None:
            state.first_baseline = baseline
        detector = state.detector = state.detector or _detector_for(ctx.config)
        detector.observe(ctx.task_name, baseline, peak_bytes=max(0, before))
        state.baseline, state.last_task_growth = baseline, before - start
        if state.published:
            rt.stats.touch()
        else:
            rt.stats.set_gauge_source(self.name, state.gauges)
            state.published = True
        if state.recycling or state.cannot_recycle:
            return
        recycle, reason = detector.should_recycle()
        if not recycle:
            return
        if self.recycle(reason, detail=detector.explain(reason), suspect_task=detector.suspect()):
            state.recycling = reason
        else:
            state.cannot_recycle = True  # a solo or threads pool: say it once, keep serving


def _detector_for(config: RmqConfig) -> LeakDetector:
    return LeakDetector(config.leak_slope, config.leak_window, config.leak_ceiling)
