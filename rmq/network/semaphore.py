"""Cluster-wide concurrency limits: semaphores in Redis whose permits are leases.

A semaphore is a sorted set (member = holder, score = the lease's expiry on Redis's clock). A holder
renews its lease while it works (see :mod:`rmq.network.lease_keeper`); a holder that dies stops
renewing and its permit lapses after ``lease_s``, so a killed process never keeps a permit for good.
Redis being unreachable raises :class:`RateLimiterUnavailable`. See docs/design.md#rate-limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.exceptions as rexc

from rmq.core import keys
from rmq.core.errors import RateLimiterUnavailable
from rmq.network.redis_scripts import REDIS_CLOCK, RedisScript, is_unavailable, redis_address

__all__ = ["ClusterSemaphore"]

# KEYS: one semaphore per limit. ARGV: holder, lease (us), then the limit per key.
# Returns 0 when every permit was taken (or renewed), else the index of the full limit.
_SEM_ACQUIRE_LUA = REDIS_CLOCK + """
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, ARGV[1]) and redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
end
return 0
"""
# KEYS[1]: semaphore. ARGV: holder, lease (us). 1 = renewed, 0 = the lease had already lapsed.
_SEM_RENEW_LUA = REDIS_CLOCK + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return 1
"""
# KEYS[1]: semaphore. Returns how many leases are live.
_SEM_COUNT_LUA = REDIS_CLOCK + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
_SEM_ACQUIRE = RedisScript(_SEM_ACQUIRE_LUA)
_SEM_RENEW = RedisScript(_SEM_RENEW_LUA)
_SEM_COUNT = RedisScript(_SEM_COUNT_LUA)


class ClusterSemaphore:
    """Cluster-wide concurrency limits whose permits are leases on Redis's clock.

    Args:
        client: a ``redis.Redis``.
        lease_s: how long a permit lives without renewal (``rmq_concurrency_lease``).
    """

    def __init__(self, client: Any, lease_s: float) -> None:
        self.client = client
        self.lease_s = float(lease_s)

    @property
    def _lease_us(self) -> int:
        return max(1, int(self.lease_s * 1_000_000))

    def acquire_all(self, limits: Mapping[str, int], holder: str) -> str | None:
        """Take a permit of every limit, or none, in one round trip; ``None`` or the full limit.

        Lapsed leases are dropped first. A holder that already holds a permit renews it.
        """
        names = list(limits)
        args = [holder, self._lease_us, *(int(limits[n]) for n in names)]
        full = int(_SEM_ACQUIRE(self.client, [keys.semaphore(n) for n in names], args))
        return names[full - 1] if full else None

    def acquire(self, name: str, limit: int, holder: str) -> bool:
        """Take (or renew) one permit of ``name`` for ``holder``; False when ``limit`` are held."""
        return self.acquire_all({name: limit}, holder) is None

    def renew(self, name: str, holder: str) -> bool:
        """Extend ``holder``'s lease by ``lease_s``; False when it had already lapsed."""
        return bool(_SEM_RENEW(self.client, [keys.semaphore(name)], [holder, self._lease_us]))

    def release(self, name: str, holder: str) -> None:
        """Give ``holder``'s permit back (nothing happens when it holds none)."""
        try:
            self.client.zrem(keys.semaphore(name), holder)
        except rexc.RedisError as exc:
            if not is_unavailable(exc):
                raise
            raise RateLimiterUnavailable(f"Redis at {redis_address(self.client)} is unavailable: {exc}") from exc

    def holders(self, name: str) -> int:
        """How many live leases ``name`` has."""
        return int(_SEM_COUNT(self.client, [keys.semaphore(name)], []))
