"""One run at a time per task id, for the copies of a task that can overlap (R1).

A governed task can exist twice: the copy a deferral sent plus the original redelivered after its
process died before the ack, a redelivery beside a re-run, or a message a broker connection drop
re-queued while its task runs. The run that goes on holds the task id's *run claim*: a Redis key
set with NX, holding ``<worker hostname>:<pool pid>`` and expiring after ``ttl_s``. A copy that
finds the claim taken by someone else waits (it is deferred) until the holder's run has ended and
stored its state, so two runs never overlap.

A copy takes the claim before its body runs. An original delivery only *notes* its task id here
(:meth:`RunClaims.note`, no Redis round trip on the hot path); a keeper thread of the process takes
the claims of the originals that have run for :data:`CLAIM_AFTER_S`, and keeps every held claim
alive (:meth:`RunClaims.keep`), apart from the threads that unload models, so that a slow unload
cannot let a claim lapse. The holder releases the claim after its state is stored; when the
holder's process dies, the worker's main process releases it (it knows the hostname and the pool
pid); when the whole worker dies, the claim expires after ``ttl_s``. See docs/design.md#run-claims.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from rmq.core import keys
from rmq.core.periodic import PeriodicThread

__all__ = ["CLAIM_AFTER_S", "KEEP_EVERY_S", "RunClaims", "claim_token", "claim_ttl"]

log = logging.getLogger("rmq.core.claims")

#: an original that has run this long gets its claim taken by the keeper (shorter ones never touch Redis)
CLAIM_AFTER_S = 0.2
#: how often the keeper looks for originals to claim
KEEP_EVERY_S = 0.2
#: how often the keeper pushes back the expiry of held claims
REFRESH_EVERY_S = 1.0
#: the shortest claim TTL
MIN_TTL_S = 10.0

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


def claim_ttl(visibility_timeout_s: float) -> float:
    """A claim's TTL: twice the broker's visibility timeout, at least :data:`MIN_TTL_S`.

    On Redis a broker outage re-queues a running task's message only once it is older than the
    visibility timeout; the claim must outlive such an outage (its refreshes fail meanwhile) so that
    the copy finds it held. A claim of a worker that died whole blocks its copies this long.
    """
    return max(MIN_TTL_S, 2.0 * visibility_timeout_s)


class RunClaims:
    """Run claims in Redis. ``client`` returns this process's Redis client (it may raise).

    The first claim taken or noted starts the keeper thread (``rmq-claim-keeper``), in a pool
    process as in a solo worker's main process.
    """

    def __init__(self, client: Callable[[], Any], ttl_s: float = MIN_TTL_S,
                 clock: Callable[[], float] = time.monotonic, keeper: bool = True) -> None:
        self._client = client
        self._start_keeper_thread = keeper  # False: the caller runs keep() itself (tests)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._clock = clock
        self._held: dict[str, str] = {}
        #: originals running in this process whose claim is not taken yet: task id -> (token, noted at)
        self._pending: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._keeper: PeriodicThread | None = None
        self._refreshed = 0.0
        #: a claim's expiry is pushed back each third of its TTL at most: a refresh due at a late
        #: keeper step (about REFRESH_EVERY_S + KEEP_EVERY_S) must still come before a short TTL ends
        self._refresh_every_s = min(REFRESH_EVERY_S, ttl_s / 3)

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
        self._start_keeper()
        return True

    def note(self, task_id: str, token: str) -> None:
        """An original delivery of ``task_id`` starts in this process: the keeper claims it if it
        runs for :data:`CLAIM_AFTER_S`. No Redis round trip."""
        self._pending[task_id] = (token, self._clock())  # one dict store: atomic, no lock needed
        if self._keeper is None and self._start_keeper_thread:
            self._start_keeper()

    def holder(self, task_id: str) -> str | None:
        """The token holding ``task_id``'s claim, if any."""
        value = self._client().get(keys.run_claim(task_id))
        return value.decode() if value is not None else None

    def release(self, task_id: str, token: str | None = None) -> bool:
        """Release the claim if ``token`` (default: the one this process took) holds it. An original
        whose claim was never taken is only forgotten (no Redis round trip)."""
        with self._lock:
            held = self._held.pop(task_id, None)
            self._pending.pop(task_id, None)
        token = token or held
        if token is None:
            return False
        return bool(self._client().eval(_RELEASE, 1, keys.run_claim(task_id), token))

    def held(self) -> dict[str, str]:
        """The claims this process holds: task id -> token."""
        with self._lock:
            return dict(self._held)

    def pending(self) -> list[str]:
        """The originals running here whose claim is not taken yet."""
        with self._lock:
            return list(self._pending)

    # the keeper ---------------------------------------------------------------
    def keep(self) -> None:
        """One step of the keeper: claim the originals that have run long enough, and about once a
        second (each third of the TTL, for a shorter one) push back the expiry of every held claim."""
        self.claim_pending()
        now = self._clock()
        if now - self._refreshed >= self._refresh_every_s:
            self._refreshed = now
            self.refresh_held()

    def claim_pending(self, min_age_s: float = CLAIM_AFTER_S) -> None:
        """Take the claims of the originals noted at least ``min_age_s`` ago (one pipelined round trip)."""
        if not self._pending:
            return
        now = self._clock()
        with self._lock:
            due = [(tid, token) for tid, (token, at) in self._pending.items() if now - at >= min_age_s]
        if not due:
            return
        try:
            pipe = self._client().pipeline(transaction=False)
            for tid, token in due:
                pipe.set(keys.run_claim(tid), token, nx=True, px=self.ttl_ms)
                pipe.get(keys.run_claim(tid))
            replies = pipe.execute()
        except Exception as exc:  # Redis down: tried again next step
            log.debug("rmq could not claim running originals: %r", exc)
            return
        for i, (tid, token) in enumerate(due):
            value = replies[2 * i + 1]
            ours = value is not None and value.decode() == token
            with self._lock:
                still_running = self._pending.pop(tid, None) is not None
                if ours and still_running:
                    self._held[tid] = token
            if ours and not still_running:  # it ended meanwhile (release() found nothing to release)
                self._release_quietly(tid, token)
            elif not ours and still_running:
                log.warning("rmq: %s runs here while %s holds its run claim: a copy started first",
                            tid, value.decode() if value is not None else "nobody")

    def refresh_held(self) -> None:
        """Push back the expiry of every claim this process holds (one round trip per claim)."""
        for task_id, token in self.held().items():
            try:
                if not self._client().eval(_REFRESH, 1, keys.run_claim(task_id), token, self.ttl_ms):
                    log.warning("rmq lost the run claim of %s (expired or taken)", task_id)
                    with self._lock:
                        if self._held.get(task_id) == token:
                            del self._held[task_id]
            except Exception as exc:
                log.debug("rmq could not refresh the run claim of %s: %r", task_id, exc)

    def stop(self) -> None:
        """Stop the keeper thread (at process exit)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop(timeout_s=0)

    def _start_keeper(self) -> None:
        if not self._start_keeper_thread:
            return
        with self._lock:
            if self._keeper is not None:
                return
            self._keeper = PeriodicThread("rmq-claim-keeper", self.keep, KEEP_EVERY_S, log, "claim keeper")
        self._keeper.start()

    def _release_quietly(self, task_id: str, token: str) -> None:
        try:
            self._client().eval(_RELEASE, 1, keys.run_claim(task_id), token)
        except Exception as exc:  # it expires on its own
            log.debug("rmq could not release the run claim of %s: %r", task_id, exc)
