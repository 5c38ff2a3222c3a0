"""A limiter Redis that answers but cannot serve (out of memory, an ACL without the commands) is an
outage like a closed port: the task is deferred with the reason, never failed by the error."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from rmq.core.errors import RateLimiterUnavailable
from rmq.core.units import parse_rate
from rmq.network.rate_limiter import ClusterLimiter
from rmq.network.semaphore import ClusterSemaphore
from rmq.testing.redis import free_port, redis_server_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path) -> Iterator[redis_lib.Redis]:
    """A redis-server of this test's own (its settings are changed: never the shared one)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis_lib.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis_lib.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield client
    proc.terminate()
    proc.wait(10)


class _Refusing:
    """A Redis client whose server answers every script with an error reply (Redis 7 lets a
    script that already wrote go on under OOM, so a real OOM cannot be provoked on these scripts)."""

    connection_pool = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    def evalsha(self, *args: object) -> object:
        raise self.error

    def zrem(self, *args: object) -> object:
        raise self.error


@pytest.mark.parametrize("error", [
    redis_lib.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
    redis_lib.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: x"),
    redis_lib.exceptions.ResponseError("BUSY Redis is busy running a script"),
    redis_lib.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's failing"),
    redis_lib.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
])
def test_server_side_refusals_are_unavailability(error):
    # Given a limiter Redis that answers with a server-side refusal
    client = _Refusing(error)
    # When a task asks for a token or a permit, Then the limiter is unavailable, naming the error
    with pytest.raises(RateLimiterUnavailable) as info:
        ClusterLimiter(client).decide({"api": parse_rate("5/s")}, "task-1")
    assert type(error).__name__ in str(info.value)
    with pytest.raises(RateLimiterUnavailable):
        ClusterSemaphore(client, 30.0).release("gpu", "holder-1")


def test_a_script_bug_is_not_unavailability():
    # Given an error reply that is not about the server's state, Then it is raised as it is
    with pytest.raises(redis_lib.exceptions.ResponseError):
        ClusterLimiter(_Refusing(redis_lib.exceptions.ResponseError("ERR user_script:3: bad"))).decide(
            {"api": parse_rate("5/s")}, "task-1")


def test_an_acl_without_the_commands_is_unavailability(private_redis):
    # Given a limiter Redis user allowed to ping only
    private_redis.acl_setuser("pinger", enabled=True, passwords=["+pw"], commands=["+ping"], keys=["*"])
    client = redis_lib.Redis(host="127.0.0.1", port=private_redis.connection_pool.connection_kwargs["port"],
                             username="pinger", password="pw")
    assert client.ping()
    # When a task asks for a token, Then the limiter is unavailable (NOPERM), not a task failure
    with pytest.raises(RateLimiterUnavailable, match="NOPERM|permission"):
        ClusterLimiter(client).decide({"api": parse_rate("5/s")}, "task-1")
    with pytest.raises(RateLimiterUnavailable):
        ClusterSemaphore(client, 30.0).release("gpu", "holder-1")
