"""One run at a time per task id, for the copies of a task that can overlap (R1).

A governed task can exist twice: the copy a deferral sent plus the original redelivered after its
process died before the ack, or a redelivery beside a re-run. Such copies first check the result
backend (a task that already ended does not run again), then take the task id's *run claim*: a
Redis key set with NX, holding ``<worker hostname>:<pool pid>`` and expiring after ``ttl_s``.
A copy that finds the claim taken by someone else waits (it is deferred) until the holder's run
has ended and stored its state, so two copies never run the body at the same time.

The holder keeps the claim alive while it runs (:meth:`RunClaims.refresh_held`, called from each
pool process's watcher thread) and releases it after its state is stored. When the holder's
process dies, the worker's main process releases it (it knows the hostname and the pool pid); when
the whole worker dies, the claim expires after ``ttl_s``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from rmq.core import keys

__all__ = ["RunClaims", "claim_token"]

log = logging.getLogger("rmq.core.claims")

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def claim_token(hostname: str, pid: int) -> str:
    """Who holds a claim: the worker's node name and the pool process's pid."""
    return f"{hostname}:{pid}"


class RunClaims:
    """Run claims in Redis. ``client`` returns this process's Redis client (it may raise)."""

    def __init__(self, client: Callable[[], Any], ttl_s: float = 10.0) -> None:
        self._client = client
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()

    def acquire(self, task_id: str, token: str) -> bool:
        """Take the claim of ``task_id``; True if this token holds it now (also when it already did:
        a claim of the same pid on the same worker is a leftover of a dead process)."""
        client = self._client()
        key = keys.run_claim(task_id)
        if not client.set(key, token, nx=True, px=self.ttl_ms):
            held = client.get(key)
            if held is None or held.decode() != token:
                return False
            client.pexpire(key, self.ttl_ms)
        with self._lock:
            self._held[task_id] = token
        return True

    def holder(self, task_id: str) -> str | None:
        """The token holding ``task_id``'s claim, if any."""
        value = self._client().get(keys.run_claim(task_id))
        return value.decode() if value is not None else None

    def release(self, task_id: str, token: str | None = None) -> bool:
        """Release the claim if ``token`` (default: the one this process took) holds it."""
        with self._lock:
            held = self._held.pop(task_id, None)
        token = token or held
        if token is None:
            return False
        return bool(self._client().eval(_RELEASE, 1, keys.run_claim(task_id), token))

    def held(self) -> dict[str, str]:
        """The claims this process holds: task id -> token."""
        with self._lock:
            return dict(self._held)

    def refresh_held(self) -> None:
        """Push back the expiry of every claim this process holds (one round trip per claim)."""
        for task_id, token in self.held().items():
            try:
                if not self._client().eval(_REFRESH, 1, keys.run_claim(task_id), token, self.ttl_ms):
                    log.warning("rmq lost the run claim of %s (expired or taken)", task_id)
                    with self._lock:
                        self._held.pop(task_id, None)
            except Exception as exc:
                log.debug("rmq could not refresh the run claim of %s: %r", task_id, exc)
