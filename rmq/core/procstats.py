"""Per-process counters that the governor aggregates across pool processes.

Each pool process keeps its counters in memory and writes them, at most every
``min_interval_s``, to ``<runtime dir>/proc-<pid>.json`` (atomic rename). The governor reads
these files when it builds a snapshot, so counters from pool children reach
``inspect stats`` and Prometheus without a round trip per task.

Counters are nested dicts of numbers: ``stats.incr("models", "hits")``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ProcessStats", "read_all", "merge_counters"]


class ProcessStats:
    """Counters (summed across processes) and gauges (reported per process) of one process."""

    def __init__(self, directory: str | None, min_interval_s: float = 0.5) -> None:
        self.directory = directory
        self.min_interval_s = min_interval_s
        self.counters: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}
        self._gauge_sources: dict[str, Callable[[], Any]] = {}
        self._lock = threading.Lock()
        self._last_flush = float("-inf")
        self._dirty = False

    def incr(self, *path: str, n: float = 1) -> None:
        """Add ``n`` to the counter at ``path`` (for example ``("models", "hits")``)."""
        with self._lock:
            node = self.counters
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = node.get(path[-1], 0) + n
            self._dirty = True

    def set_gauge(self, key: str, value: Any) -> None:
        """Set a per-process value (not summed), for example the models this process holds."""
        with self._lock:
            self._gauge_sources.pop(key, None)
            self._gauges[key] = value
            self._dirty = True

    def set_gauge_source(self, key: str, source: Callable[[], Any]) -> None:
        """Make ``source()`` the value of gauge ``key``, built only when the gauges are read or
        written: for a gauge that changes with every task, call :meth:`touch` instead of building it."""
        with self._lock:
            self._gauges.pop(key, None)
            self._gauge_sources[key] = source
            self._dirty = True

    def touch(self) -> None:
        """Something a gauge source reports changed: write the file at the next flush."""
        self._dirty = True

    @property
    def gauges(self) -> dict[str, Any]:
        """Every gauge as it stands now (sources built on this read)."""
        with self._lock:
            return self._gauges_unlocked()

    def _gauges_unlocked(self) -> dict[str, Any]:
        if not self._gauge_sources:
            return self._gauges
        return {**self._gauges, **{k: source() for k, source in self._gauge_sources.items()}}

    def flush(self, force: bool = False) -> None:
        """Write the counters file if something changed and the interval passed."""
        if self.directory is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self.min_interval_s:
            return
        with self._lock:
            payload = json.dumps({"pid": os.getpid(), "counters": self.counters, "gauges": self._gauges_unlocked()})
            self._dirty = False
            self._last_flush = now
        path = os.path.join(self.directory, f"proc-{os.getpid()}.json")
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write(payload)
            os.replace(tmp, path)
        except OSError:
            pass  # the runtime dir vanished (worker shutting down)


def read_all(directory: str) -> dict[int, dict[str, Any]]:
    """Every process file in ``directory``: ``{pid: {"counters": ..., "gauges": ...}}``."""
    out: dict[int, dict[str, Any]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("proc-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as fh:
                data = json.load(fh)
            out[int(data["pid"])] = data
        except (OSError, ValueError, KeyError):
            continue
    return out


def merge_counters(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum nested counter dicts."""
    total: dict[str, Any] = {}

    def add(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict):
                add(dst.setdefault(k, {}), v)
            elif isinstance(v, (int, float)):
                dst[k] = dst.get(k, 0) + v

    for item in items:
        add(total, item)
    return total
