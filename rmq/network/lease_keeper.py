"""Keeps a process's concurrency permits alive: a daemon thread renews each lease while it is held.

A permit is a lease (see :mod:`rmq.network.semaphore`) so that a dead holder's permit lapses; a live
holder must therefore renew it, well before it lapses, for as long as its work runs.
"""

from __future__ import annotations

import logging
import threading

import redis.exceptions as rexc

from rmq.core.errors import RateLimiterUnavailable
from rmq.core.periodic import PeriodicThread
from rmq.network.semaphore import ClusterSemaphore

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    """A daemon thread that renews every permit this process holds, every ``lease_s / 3``.

    A lease that lapsed anyway (Redis was away longer than the lease) is taken again when the
    limit has room, else a WARNING says the limit may be exceeded until the task ends.
    """

    def __init__(self, semaphore: ClusterSemaphore, interval_s: float | None = None) -> None:
        self.semaphore = semaphore
        self.interval_s = interval_s if interval_s is not None else semaphore.lease_s / 3
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # a lapsed permit is never retaken after discard()
        self._loop = PeriodicThread("rmq-lease-keeper", self.renew_now, self.interval_s, log)

    def add(self, name: str, holder: str, limit: int) -> None:
        """Keep ``holder``'s permit of ``name`` (of ``limit``) renewed."""
        with self._lock:
            self._held[(name, holder)] = limit

    def discard(self, name: str, holder: str) -> None:
        """Stop renewing (call before releasing: the permit is then never taken again)."""
        with self._lock:
            self._held.pop((name, holder), None)

    def start(self) -> None:
        """Start the thread (no-op when it runs)."""
        self._loop.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; held permits then lapse after their lease."""
        self._loop.stop(timeout_s)

    def renew_now(self) -> int:
        """Renew every held permit once; returns how many are still held."""
        kept = 0
        for (name, holder), limit in self._snapshot():
            try:
                # Renewing touches only a live lease, so it is safe against a concurrent release;
                # taking a lapsed permit again is not, hence the lock and the second look.
                if self.semaphore.renew(name, holder):
                    kept += 1
                    continue
                with self._lock:
                    if (name, holder) not in self._held:
                        continue
                    if self.semaphore.acquire(name, limit, holder):
                        kept += 1
                        continue
                log.warning("rmq: permit of %r for %s lapsed and the limit (%d) is full: "
                            "it may be exceeded until this task ends", name, holder, limit)
            except (RateLimiterUnavailable, rexc.RedisError) as exc:
                log.warning("rmq: could not renew permit of %r for %s: %s", name, holder, exc)
        return kept

    def _snapshot(self) -> list[tuple[tuple[str, str], int]]:
        with self._lock:
            return list(self._held.items())
