"""Cluster-wide rate limits: one sliding-window log per limit name in Redis, decided by one Lua script.

A grant is recorded (one member of a sorted set per grant) only when the last ``period`` holds fewer
than ``count`` grants, so no window of ``period`` seconds, wherever it starts, ever holds more than
``count`` grants. Denied callers are given turns 1/rate apart, so a backlog returns spread out rather
than all at once. Decisions run on Redis's clock (see :mod:`rmq.network.redis_scripts`); Redis being
unreachable raises :class:`RateLimiterUnavailable`. See docs/design.md#rate-limits.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rmq.core import keys
from rmq.core.units import Rate
from rmq.network.redis_scripts import REDIS_CLOCK, RedisScript

__all__ = ["ClusterLimiter", "Decision", "count_outcome", "worker_limiter"]

#: ``Runtime.local`` key of a worker process's one limiter (shared by ``throttle`` and the task guard)
_WORKER_LIMITER = "rmq.network.rate_limiter"

# KEYS: one log per limit, then one queue of turns per limit (member = caller, score = its turn, us).
# ARGV: grant id, caller (or ""), then count and period (us) per limit.
# Returns {granted, wait_us, now_us, index of the denying limit}.
# The grant is decided by the logs alone. A denied caller is booked a turn in the blocking limit's
# queue, 1/rate after the last turn booked, so a backlog of deferred tasks comes back spread out,
# about once each, instead of all at once for one token. A caller back for its turn and beaten
# (the schedule runs late) keeps its place: the next token, plus 1/rate per caller booked before
# it still waiting. Turns whose callers never came back lapse after a grace. No caller: no turn.
_RATE_LUA = REDIS_CLOCK + """
local n, caller = #KEYS / 2, ARGV[2]
local wait, blocker = 0, 0
for i = 1, n do
  local key, count, period = KEYS[i], tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
  local c = redis.call('ZCARD', key)
  if c >= count then
    local oldest = redis.call('ZRANGE', key, c - count, c - count, 'WITHSCORES')
    local w = tonumber(oldest[2]) + period - now
    if w > wait then wait, blocker = w, i end
  end
end
if blocker > 0 and caller == '' then return {0, wait, now, blocker} end
if blocker > 0 then
  local count, period = tonumber(ARGV[2 * blocker + 1]), tonumber(ARGV[2 * blocker + 2])
  local turns = KEYS[n + blocker]
  redis.call('ZREMRANGEBYSCORE', turns, '-inf', now - period - 5000000)
  local mine = tonumber(redis.call('ZSCORE', turns, caller))
  local turn = now + wait
  if mine and mine > turn then
    turn = mine
  elseif mine then
    turn = turn + redis.call('ZCOUNT', turns, '-inf', string.format('(%d', mine)) * math.floor(period / count)
  else
    local last = redis.call('ZRANGE', turns, -1, -1, 'WITHSCORES')
    if last[2] and tonumber(last[2]) + math.floor(period / count) > turn then
      turn = tonumber(last[2]) + math.floor(period / count)
    end
    redis.call('ZADD', turns, turn, caller)
  end
  redis.call('PEXPIRE', turns, math.ceil((turn - now + period) / 1000) + 5000)
  return {0, turn - now, now, blocker}
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2 * i + 2]) / 1000) + 1000)
  redis.call('ZREM', KEYS[n + i], caller)
end
return {1, 0, now, 0}
"""
_RATE = RedisScript(_RATE_LUA)


@dataclass(frozen=True)
class Decision:
    """One rate-limit decision.

    Attributes:
        granted: a token was granted (and recorded) for every limit.
        wait_s: when denied, seconds until the caller's turn (at least until every limit has a
            token); 0.0 when granted.
        redis_time_us: Redis's clock when it decided (microseconds since the epoch).
        blocker: when denied, the limit with the longest wait.
    """

    granted: bool
    wait_s: float
    redis_time_us: int
    blocker: str | None = None


class ClusterLimiter:
    """Cluster-wide rate limits: one sliding-window log per limit name in Redis.

    A limit name shares one log however it is used (decorator or ``throttle``); give one
    name one rate everywhere. A log holds up to ``count`` entries, so huge daily rates cost
    memory in proportion.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def decide(self, limits: Mapping[str, Rate], caller: str | None = None) -> Decision:
        """Take one token from every limit, or from none, in one round trip.

        Checking all limits before recording any means a denial never burns a token. A denial
        books ``caller`` a turn: ``wait_s`` is the time to the next token, or later when callers
        denied before it are due first (turns are 1/rate apart). Pass the same ``caller`` (e.g. a
        task id) when coming back, to keep the turn; without one, nothing is booked and
        ``wait_s`` is the time to the next token.

        Raises:
            RateLimiterUnavailable: Redis did not answer.
        """
        names = list(limits)
        args: list[Any] = [secrets.token_hex(8), caller or ""]
        for name in names:
            args += [limits[name].count, int(limits[name].period_s * 1_000_000)]
        keys_ = [keys.rate_limit(n) for n in names] + [keys.rate_limit_turns(n) for n in names]
        granted, wait_us, now_us, blocker = _RATE(self.client, keys_, args)
        if granted:
            return Decision(True, 0.0, int(now_us))
        return Decision(False, max(int(wait_us), 1) / 1_000_000, int(now_us), names[int(blocker) - 1])

    def acquire(self, name: str, rate: Rate, caller: str | None = None) -> float:
        """0.0 when a token was granted (and recorded), else seconds until ``caller``'s turn
        (the next token without a caller)."""
        return self.decide({name: rate}, caller).wait_s


def worker_limiter(rt: Any) -> ClusterLimiter:
    """The worker process's limiter on its runtime's Redis, made on first use."""
    return rt.local(_WORKER_LIMITER, lambda: ClusterLimiter(rt.redis()))


def count_outcome(rt: Any, name: str, outcome: str) -> None:
    """Count a ``granted`` / ``denied`` / ``unavailable`` of limit ``name`` in the worker's stats (none: no-op)."""
    if rt is not None:
        rt.stats.incr("rate_limits", name, outcome)
