"""Run claims: one copy of a task id at a time (fakeredis: pure logic, no worker)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from rmq.core import keys
from rmq.core.claims import RunClaims, claim_token


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def claims(client: fakeredis.FakeRedis, ttl_s: float = 10.0) -> RunClaims:
    return RunClaims(lambda: client, ttl_s=ttl_s)


def test_a_second_copy_cannot_take_a_held_claim(client) -> None:
    a, b = claims(client), claims(client)
    assert a.acquire("t1", claim_token("w1@h", 10))
    assert not b.acquire("t1", claim_token("w2@h", 20))
    assert b.holder("t1") == "w1@h:10"
    assert a.held() == {"t1": "w1@h:10"} and b.held() == {}


def test_release_frees_the_claim_for_the_next_copy(client) -> None:
    a, b = claims(client), claims(client)
    a.acquire("t1", claim_token("w1@h", 10))
    assert a.release("t1")
    assert b.acquire("t1", claim_token("w2@h", 20))
    assert a.held() == {}


def test_only_the_holder_releases(client) -> None:
    a, b = claims(client), claims(client)
    a.acquire("t1", "w1@h:10")
    assert not b.release("t1", "w2@h:20")
    assert b.holder("t1") == "w1@h:10"
    # the worker's main process releases a dead pool process's claim by its token
    assert b.release("t1", "w1@h:10")
    assert b.holder("t1") is None


def test_a_leftover_claim_of_the_same_pid_is_taken_over(client) -> None:
    client.set(keys.run_claim("t1"), "w1@h:10")
    assert claims(client).acquire("t1", "w1@h:10")


def test_claims_expire_unless_refreshed(client) -> None:
    a = claims(client, ttl_s=0.3)
    a.acquire("t1", "w1@h:10")
    a.acquire("t2", "w1@h:10")
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        a.refresh_held()
        time.sleep(0.05)
    assert a.holder("t1") == a.holder("t2") == "w1@h:10"  # kept alive past its TTL
    a.release("t2")
    deadline = time.monotonic() + 2
    while a.holder("t1") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.holder("t1") is None  # not refreshed: gone by itself


def test_refresh_drops_a_claim_someone_else_took(client) -> None:
    a = claims(client)
    a.acquire("t1", "w1@h:10")
    client.set(keys.run_claim("t1"), "w2@h:20")
    a.refresh_held()
    assert a.held() == {} and a.holder("t1") == "w2@h:20"
