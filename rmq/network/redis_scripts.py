"""Running the limits' Lua scripts on Redis: by EVALSHA, on Redis's own clock, failing closed.

Every limit decision is one atomic script that reads Redis's ``TIME``, so any number of workers on
any number of hosts share a limit and disagree about nothing (their own clocks never enter). Redis
being unreachable raises :class:`RateLimiterUnavailable`, which inside a worker the guards and the HTTP
clients turn into a deferral: rmq fails closed rather than let work through unchecked. See
docs/design.md#rate-limits.
"""

from __future__ import annotations

from functools import cached_property
from hashlib import sha1
from typing import Any

import redis.exceptions as rexc

from rmq.core.errors import RateLimiterUnavailable

__all__ = ["REDIS_CLOCK", "REDIS_UNAVAILABLE", "RedisScript", "is_unavailable", "redis_address"]

#: the Redis errors that mean "no answer now" (as opposed to a bug in a script)
REDIS_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.MasterDownError,
                     rexc.OutOfMemoryError, rexc.NoPermissionError, rexc.AuthorizationError,
                     rexc.ClusterDownError, rexc.TryAgainError)
#: error codes of a Redis that answers but cannot serve limits now: out of memory, an ACL without
#: the needed commands, a replica, loading its dataset, a busy script, failing over, a failed
#: snapshot. Like a closed port they are unavailability (fail closed, defer), never a task failure.
SERVER_UNAVAILABLE_CODES = ("OOM", "NOPERM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS",
                            "CLUSTERDOWN", "TRYAGAIN", "MISCONF", "NOAUTH", "WRONGPASS")


def is_unavailable(exc: BaseException) -> bool:
    """Whether a Redis error means the limiter's Redis cannot serve now (see ``SERVER_UNAVAILABLE_CODES``)."""
    if isinstance(exc, REDIS_UNAVAILABLE):
        return True
    if isinstance(exc, rexc.ResponseError):
        return str(exc).split(" ", 1)[0].upper().rstrip(":") in SERVER_UNAVAILABLE_CODES
    return False

# Redis < 5 replicates scripts verbatim and refuses writes after TIME unless told otherwise.
#: Lua preamble of every script: ``now``, Redis's clock in microseconds.
REDIS_CLOCK = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""


def redis_address(client: Any) -> str:
    """The Redis a client talks to, without credentials."""
    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


class RedisScript:
    """A Lua script run by EVALSHA, loaded into Redis on the first NOSCRIPT."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def sha(self) -> str:
        return sha1(self.text.encode()).hexdigest()

    def __call__(self, client: Any, keys_: list[str], args: list[Any]) -> Any:
        """Run the script with ``keys_`` and ``args``; its reply.

        Raises:
            RateLimiterUnavailable: Redis did not answer (the message names which Redis).
        """
        try:
            try:
                return client.evalsha(self.sha, len(keys_), *keys_, *args)
            except rexc.NoScriptError:
                client.script_load(self.text)
                return client.evalsha(self.sha, len(keys_), *keys_, *args)
        except rexc.RedisError as exc:
            if not is_unavailable(exc):
                raise
            raise RateLimiterUnavailable(
                f"Redis at {redis_address(client)} is unavailable for rate/concurrency limits: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
