"""Learned declarations: the observed peak memory of each task name, kept in Redis.

Pool processes buffer observations and write them at most once a second (one pipelined
round trip), and read a task's learned value at most every ``ttl_s`` seconds (at once after
writing a peak above it), so learning costs no Redis round trip per task. Until a task has a
learned peak its runs wait alone, so the first peak of a task name is written at once, and an
unknown one is read again every ``unknown_ttl_s``. Values survive worker restarts and are shared
by all workers on the same Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rmq.core import keys
from rmq.memory.admission import percentile

if TYPE_CHECKING:  # pragma: no cover
    from rmq.core.runtime import Runtime

__all__ = ["PeakLearner", "flush_learner", "learner"]

#: below this many observations the learned value is their maximum, not the quantile
_FEW = 5

log = logging.getLogger("rmq.memory.learning")


class PeakLearner:
    """Records peaks and answers ``learned(task_name)`` (bytes, or 0 when unknown)."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        window: int = 50,
        q: float = 0.95,
        ttl_s: float = 5.0,
        flush_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        unknown_ttl_s: float = 0.1,
    ) -> None:
        self.client_factory = client_factory
        self.window = window
        self.q = q
        self.ttl_s = ttl_s
        self.flush_interval_s = flush_interval_s
        self.unknown_ttl_s = unknown_ttl_s
        self.clock = clock
        self._pending: dict[str, list[int]] = {}
        self._cache: dict[str, tuple[int, float]] = {}
        self._last_flush = float("-inf")
        self._lock = threading.Lock()

    def observe(self, task_name: str, peak_bytes: int) -> None:
        """Buffer one observation; it reaches Redis within ``flush_interval_s``."""
        with self._lock:  # at least 1 byte: a learned 0 would read as unknown
            self._pending.setdefault(task_name, []).append(max(1, int(peak_bytes)))
        if not self._cache.get(task_name, (0, 0.0))[0]:  # its first peak: neighbours wait for it
            self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        """Write buffered observations (one pipelined round trip)."""
        now = self.clock()
        with self._lock:
            if not self._pending or (not force and now - self._last_flush < self.flush_interval_s):
                return
            pending, self._pending = self._pending, {}
            self._last_flush = now
        try:
            pipe = self.client_factory().pipeline(transaction=False)
            for name, values in pending.items():
                key = keys.learned_peaks(name)
                pipe.lpush(key, *values)
                pipe.ltrim(key, 0, self.window - 1)
            pipe.execute()
            for name, values in pending.items():
                hit = self._cache.get(name)
                # new, or a run above what was learned: read again at the next learned(); runs within
                # it leave the value cached for ttl_s (a read after every flush cost each pool process
                # a round trip a second on the task path, docs/guarantees.md#p1)
                if hit is None or not hit[0] or max(values) > hit[0]:
                    self._cache[name] = ((hit[0] if hit else 0) or max(values), float("-inf"))
        except Exception as exc:  # learning is advisory: never fail a task for it
            log.warning("rmq could not store learned peaks: %s", exc)

    def learned(self, task_name: str) -> int:
        """The ``q`` percentile of recent peaks of ``task_name`` (their maximum while there are fewer
        than five; 0 when none or unreachable)."""
        now = self.clock()
        hit = self._cache.get(task_name)
        if hit is not None and now - hit[1] < (self.ttl_s if hit[0] else self.unknown_ttl_s):
            return hit[0]
        try:
            raw = self.client_factory().lrange(keys.learned_peaks(task_name), 0, self.window - 1)
            # a few runs say little about the tail: their largest, until there are enough for a quantile
            value = int(percentile([int(v) for v in raw], self.q if len(raw) >= _FEW else 1.0))
        except Exception as exc:
            log.warning("rmq could not read learned peaks of %s: %s", task_name, exc)
            value = hit[0] if hit else 0
        self._cache[task_name] = (value, now)
        return value


def learner(rt: Runtime) -> PeakLearner:
    """This process's learner of the worker ``rt`` (made on first use, again after a fork)."""
    made = rt.made("learner")  # the per-task path: no closure built once it exists
    if made is not None:
        return made  # type: ignore[no-any-return]
    config = rt.config
    return rt.local("learner", lambda: PeakLearner(rt.redis, window=config.learn_window, q=config.learn_percentile))


def flush_learner(rt: Runtime, force: bool = False) -> None:
    """Push the peaks this process observed, if it made a learner at all."""
    made = rt.made("learner")
    if made is not None:
        made.flush(force=force)
