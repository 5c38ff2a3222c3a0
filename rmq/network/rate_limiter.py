"""Cluster-wide rate limits and concurrency limits, kept in Redis (SPEC C5).

Every decision is one atomic Lua script on Redis's own clock (``TIME``), so any number of
workers on any number of hosts share a limit and disagree about nothing.

- Rate limits are sliding-window logs (one sorted set per limit, a member per grant): a grant
  is recorded only when the last ``period`` holds fewer than ``count`` grants, so no window of
  ``period`` seconds, wherever it starts, ever holds more than ``count`` grants. Denied callers
  are given turns 1/rate apart, so a backlog returns spread out rather than all at once.
- Concurrency limits are semaphores whose permits are leases (member = holder, score = expiry):
  a holder that dies stops renewing and its permit lapses after ``lease_s``.

Redis being unreachable raises :class:`RateLimiterUnavailable`: rmq fails closed.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from hashlib import sha1
from typing import Any

import redis.exceptions as rexc

from rmq.core import keys
from rmq.core import runtime
from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.concern import Concern, TaskContext
from rmq.core.units import Rate, parse_rate

__all__ = [
    "GRANTED_US",
    "ClusterLimiter",
    "ClusterSemaphore",
    "ConcurrencyGuard",
    "Decision",
    "LeaseKeeper",
    "RateLimitGuard",
    "throttle",
]

log = logging.getLogger(__name__)

#: ``throttle``'s longest wait for a token outside a worker (inside: ``rmq_throttle_max_wait``)
DEFAULT_THROTTLE_WAIT_S = 2.0
#: ``TaskContext.state`` key holding the Redis time (us) at which a task's tokens were granted
GRANTED_US = "rate_limit_granted_us"
_LIMITER, _SEMAPHORE, _KEEPER = "rmq.network.rate_limiter.limiter", "rmq.network.rate_limiter.semaphore", "rmq.network.rate_limiter.keeper"
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.MasterDownError)

# Redis < 5 replicates scripts verbatim and refuses writes after TIME unless told otherwise.
_CLOCK = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""
# KEYS: one log per limit, then one queue of turns per limit. ARGV: grant id, caller (or ""), then
# count and period (us) per limit. Returns {granted, wait_us, now_us, index of the denying limit}.
# The grant is decided by the logs alone. A denied caller is booked a turn in the blocking limit's
# queue, 1/rate after the last turn booked, so a backlog of deferred tasks comes back spread out,
# about once each, instead of all at once for one token. A caller back for its turn and beaten
# (the schedule runs late) keeps its place: the next token, plus 1/rate per caller booked before
# it still waiting. Turns whose callers never came back lapse after a grace. No caller: no turn.
_RATE_LUA = _CLOCK + """
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
# KEYS: one semaphore per limit. ARGV: holder, lease (us), then the limit per key.
# Returns 0 when every permit was taken (or renewed), else the index of the full limit.
_SEM_ACQUIRE_LUA = _CLOCK + """
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
_SEM_RENEW_LUA = _CLOCK + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1000)
return 1
"""
_SEM_COUNT_LUA = _CLOCK + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


def _rate_key(name: str) -> str:
    return keys.rate_limit(name)


def _turns_key(name: str) -> str:
    """Turns booked by denied callers of a rate limit (member = caller, score = turn, us)."""
    return keys.rate_limit_turns(name)


def _semaphore_key(name: str) -> str:
    return keys.semaphore(name)


def _where(client: Any) -> str:
    """The Redis a client talks to, without credentials."""
    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


class _Script:
    """A Lua script run by EVALSHA, loaded into Redis on the first NOSCRIPT."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def sha(self) -> str:
        return sha1(self.text.encode()).hexdigest()

    def __call__(self, client: Any, keys_: list[str], args: list[Any]) -> Any:
        try:
            try:
                return client.evalsha(self.sha, len(keys_), *keys_, *args)
            except rexc.NoScriptError:
                client.script_load(self.text)
                return client.evalsha(self.sha, len(keys_), *keys_, *args)
        except _UNAVAILABLE as exc:
            raise RateLimiterUnavailable(
                f"Redis at {_where(client)} is unavailable for rate/concurrency limits: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


_RATE = _Script(_RATE_LUA)
_SEM_ACQUIRE = _Script(_SEM_ACQUIRE_LUA)
_SEM_RENEW = _Script(_SEM_RENEW_LUA)
_SEM_COUNT = _Script(_SEM_COUNT_LUA)


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
        keys_ = [_rate_key(n) for n in names] + [_turns_key(n) for n in names]
        granted, wait_us, now_us, blocker = _RATE(self.client, keys_, args)
        if granted:
            return Decision(True, 0.0, int(now_us))
        return Decision(False, max(int(wait_us), 1) / 1_000_000, int(now_us), names[int(blocker) - 1])

    def acquire(self, name: str, rate: Rate, caller: str | None = None) -> float:
        """0.0 when a token was granted (and recorded), else seconds until ``caller``'s turn
        (the next token without a caller)."""
        return self.decide({name: rate}, caller).wait_s


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
        full = int(_SEM_ACQUIRE(self.client, [_semaphore_key(n) for n in names], args))
        return names[full - 1] if full else None

    def acquire(self, name: str, limit: int, holder: str) -> bool:
        """Take (or renew) one permit of ``name`` for ``holder``; False when ``limit`` are held."""
        return self.acquire_all({name: limit}, holder) is None

    def renew(self, name: str, holder: str) -> bool:
        """Extend ``holder``'s lease by ``lease_s``; False when it had already lapsed."""
        return bool(_SEM_RENEW(self.client, [_semaphore_key(name)], [holder, self._lease_us]))

    def release(self, name: str, holder: str) -> None:
        """Give ``holder``'s permit back (nothing happens when it holds none)."""
        try:
            self.client.zrem(_semaphore_key(name), holder)
        except _UNAVAILABLE as exc:
            raise RateLimiterUnavailable(f"Redis at {_where(self.client)} is unavailable: {exc}") from exc

    def holders(self, name: str) -> int:
        """How many live leases ``name`` has."""
        return int(_SEM_COUNT(self.client, [_semaphore_key(name)], []))


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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, holder: str, limit: int) -> None:
        """Keep ``holder``'s permit of ``name`` (of ``limit``) renewed."""
        with self._lock:
            self._held[(name, holder)] = limit

    def discard(self, name: str, holder: str) -> None:
        """Stop renewing (call before releasing: the permit is then never taken again)."""
        with self._lock:
            self._held.pop((name, holder), None)

    def held(self) -> list[tuple[str, str]]:
        """The (name, holder) pairs being renewed."""
        with self._lock:
            return list(self._held)

    def start(self) -> None:
        """Start the thread (no-op when it runs)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rmq-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; held permits then lapse after their lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

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

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.renew_now()


def _count(rt: Any, name: str, outcome: str) -> None:
    if rt is not None:
        rt.stats.incr("rate_limits", name, outcome)


@contextmanager
def throttle(
    name: str, rate: str | Rate, *, max_wait_s: float | None = None, client: Any = None
) -> Iterator[None]:
    """Take a token of the cluster-wide limit ``name`` before running the block.

    Waits (sleeping until the next token) up to ``max_wait_s`` seconds: by default
    ``rmq_throttle_max_wait`` inside a worker, 2 s elsewhere.

    Raises:
        Defer: no token within ``max_wait_s`` (``countdown_s`` = time to the next token); a
            governed task is re-queued without using its retries.
        RateLimiterUnavailable: Redis did not answer, or there is no Redis (outside a worker
            without ``client``).
        ConfigError: ``rate`` is not a rate like ``"10/s"``.
    """
    parsed = parse_rate(rate, f"throttle({name!r}) rate")
    rt = runtime.current()
    if max_wait_s is None:
        max_wait_s = rt.config.throttle_max_wait if rt is not None else DEFAULT_THROTTLE_WAIT_S
    if client is not None:
        limiter = ClusterLimiter(client)
    elif rt is not None:
        limiter = rt.local(_LIMITER, lambda: ClusterLimiter(rt.redis()))
    else:
        raise RateLimiterUnavailable(
            f"throttle({name!r}) has no Redis outside a governed worker: pass client=redis.Redis(...)"
        )
    deadline = time.monotonic() + max_wait_s
    caller = secrets.token_hex(8)  # one turn for the whole wait
    while (wait := limiter.acquire(name, parsed, caller)) > 0:
        if wait > deadline - time.monotonic():
            _count(rt, name, "denied")
            raise Defer(f"rate limit {name!r} ({parsed}) has no token within {max_wait_s:g}s",
                        countdown_s=wait, kind="rate_limit")
        time.sleep(wait)
    _count(rt, name, "granted")
    yield


class RateLimitGuard(Concern):
    """Takes a token of every declared rate limit before the task runs, or defers it.

    All limits are checked in one script before any token is recorded, so a task denied by
    one limit never consumes another's token. A denied task defers (it must not hold a pool
    slot) until its turn; only a token due within ``inline_wait_s`` is waited for in place,
    which is cheaper than a deferral. The grant's Redis time (microseconds) is left in
    ``ctx.state[GRANTED_US]`` for the task (``self.rmq_context``).
    """

    name = "rate_limit"
    #: longest wait for a token spent in the pool process instead of deferring
    inline_wait_s = 0.1

    def applies(self, declaration: Any) -> bool:
        return bool(declaration.rate_limits)

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or runtime.current()
        if rt is None:
            return
        limits = ctx.declaration.rate_limits
        deadline = time.monotonic() + self.inline_wait_s
        try:
            limiter = rt.local(_LIMITER, lambda: ClusterLimiter(rt.redis()))
            while not (decision := limiter.decide(limits, ctx.task_id)).granted:
                if decision.wait_s > deadline - time.monotonic():
                    break
                time.sleep(decision.wait_s)
        except RateLimiterUnavailable as exc:
            log.warning("rmq: %s[%s] deferred %.1fs, rate limits %s not checked (failing closed): %s",
                        ctx.task_name, ctx.task_id, ctx.config.defer_countdown, sorted(limits), exc)
            for name in limits:
                _count(rt, name, "unavailable")
            raise Defer(f"rate limiter unavailable: {exc}", countdown_s=ctx.config.defer_countdown,
                        kind="rate_limit_unavailable") from exc
        if decision.granted:
            for name in limits:
                _count(rt, name, "granted")
            ctx.state[GRANTED_US] = decision.redis_time_us
            return
        blocker = decision.blocker or next(iter(limits))
        _count(rt, blocker, "denied")
        raise Defer(f"rate limit {blocker!r} ({limits[blocker]}) has no token for {decision.wait_s:.3f}s",
                    countdown_s=decision.wait_s, kind="rate_limit")


class ConcurrencyGuard(Concern):
    """Holds a permit of every declared concurrency limit while the task runs, or defers it.

    Permits are leases renewed by the process's :class:`LeaseKeeper`; a killed process stops
    renewing and its permits lapse after ``rmq_concurrency_lease``.
    """

    name = "concurrency"
    #: countdown of a task deferred because a limit was full (no way to know when it frees)
    retry_s = 1.0

    def applies(self, declaration: Any) -> bool:
        return bool(declaration.concurrency)

    @staticmethod
    def _parts(rt: Any) -> tuple[ClusterSemaphore, LeaseKeeper]:
        sem = rt.local(_SEMAPHORE, lambda: ClusterSemaphore(rt.redis(), rt.config.concurrency_lease))
        return sem, rt.local(_KEEPER, lambda: LeaseKeeper(sem))

    def enter(self, ctx: TaskContext) -> None:
        rt = ctx.runtime or runtime.current()
        if rt is None:
            return
        limits = ctx.declaration.concurrency
        holder = f"{socket.gethostname()}:{os.getpid()}:{ctx.task_id}"
        try:
            sem, keeper = self._parts(rt)
            full = sem.acquire_all(limits, holder)
        except RateLimiterUnavailable as exc:
            log.warning("rmq: %s[%s] deferred %.1fs, concurrency limits %s not checked (failing closed): %s",
                        ctx.task_name, ctx.task_id, ctx.config.defer_countdown, sorted(limits), exc)
            raise Defer(f"concurrency limiter unavailable: {exc}", countdown_s=ctx.config.defer_countdown,
                        kind="concurrency_unavailable") from exc
        if full is not None:
            rt.stats.incr("concurrency", full, "denied")
            raise Defer(f"concurrency limit {full!r} ({limits[full]}) is full",
                        countdown_s=self.retry_s, kind="concurrency")
        for name, limit in limits.items():
            rt.stats.incr("concurrency", name, "granted")
            keeper.add(name, holder, limit)
        keeper.start()
        ctx.state[self.name] = holder

    def exit(self, ctx: TaskContext, failed: bool) -> None:
        holder = ctx.state.pop(self.name, None)
        rt = ctx.runtime or runtime.current()
        if holder is None or rt is None:
            return
        sem, keeper = self._parts(rt)
        for name in ctx.declaration.concurrency:
            keeper.discard(name, holder)
            try:
                sem.release(name, holder)
            except RateLimiterUnavailable as exc:
                log.warning("rmq: permit of %r for %s not released, it lapses in %.0fs: %s",
                            name, holder, sem.lease_s, exc)
