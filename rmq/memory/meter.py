"""Memory of a worker's process tree, without counting copy-on-write pages once per child.

Forked pool children share the parent's pages until they write them; RSS counts those
pages in every child. The main process is counted at RSS; each child at RSS minus its
shared part, where the shared part (RSS - USS) is refreshed every ``uss_interval_s``
(USS reads ``smaps_rollup``, about 1 ms a child) and RSS, which costs microseconds, every
tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

__all__ = ["TreeReading", "ProcessTreeMeter"]


@dataclass
class TreeReading:
    """One sample. ``children`` maps pid -> estimated private bytes; ``rss`` pid -> RSS."""

    worker_bytes: int
    main_bytes: int
    children: dict[int, int] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)


class ProcessTreeMeter:
    """Samples a main process and the pool children it is told about."""

    def __init__(self, main_pid: int, uss_interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.main = psutil.Process(main_pid)
        self.uss_interval_s = uss_interval_s
        self.clock = clock
        self._procs: dict[int, psutil.Process] = {}
        self._shared: dict[int, int] = {}
        self._shared_at: dict[int, float] = {}

    def sample(self, child_pids: Iterable[int]) -> TreeReading:
        """Read the tree now. Children that vanished are skipped."""
        now = self.clock()
        main_rss = self.main.memory_info().rss
        reading = TreeReading(worker_bytes=main_rss, main_bytes=main_rss)
        reading.rss[self.main.pid] = main_rss
        pids = set(child_pids)
        for gone in set(self._procs) - pids:
            self._procs.pop(gone, None)
            self._shared.pop(gone, None)
            self._shared_at.pop(gone, None)
        for pid in pids:
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                if now - self._shared_at.get(pid, float("-inf")) >= self.uss_interval_s:
                    full = proc.memory_full_info()
                    rss = full.rss
                    self._shared[pid] = max(0, full.rss - full.uss)
                    self._shared_at[pid] = now
                else:
                    rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._procs.pop(pid, None)
                continue
            private = max(0, rss - self._shared.get(pid, 0))
            reading.children[pid] = private
            reading.rss[pid] = rss
            reading.worker_bytes += private
        return reading
