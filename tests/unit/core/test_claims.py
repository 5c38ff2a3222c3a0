"""Run claims: one copy of a task id at a time (fakeredis: pure logic, no worker)."""

from __future__ import annotations

import time

import fakeredis
import pytest

from rmq.core import keys
from rmq.core.claims import CLAIM_AFTER_S, RunClaims, claim_token, claim_ttl


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def claims(client: fakeredis.FakeRedis, ttl_s: float = 10.0) -> RunClaims:
    return RunClaims(lambda: client, ttl_s=ttl_s, keeper=False)


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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_original_is_claimed_once_it_has_run_a_moment_and_never_before(client) -> None:
    clock = Clock()
    a = RunClaims(lambda: client, clock=clock, keeper=False)
    a.note("t1", "w1@h:10")
    a.keep()
    assert a.holder("t1") is None and a.pending() == ["t1"]  # just started: no Redis yet
    clock.now += CLAIM_AFTER_S
    a.keep()
    assert a.holder("t1") == "w1@h:10" and a.held() == {"t1": "w1@h:10"} and a.pending() == []
    assert a.release("t1") and a.holder("t1") is None


def test_a_short_original_never_touches_redis() -> None:
    def no_redis():
        raise AssertionError("a short original must not reach Redis")

    a = RunClaims(no_redis, keeper=False)
    a.note("t1", "w1@h:10")
    assert not a.release("t1")
    a.keep()
    assert a.pending() == [] and a.held() == {}


def test_an_original_that_a_copy_claimed_first_is_left_to_it(client) -> None:
    clock = Clock()
    a = RunClaims(lambda: client, clock=clock, keeper=False)
    client.set(keys.run_claim("t1"), "w2@h:20")
    a.note("t1", "w1@h:10")
    clock.now += 1
    a.keep()
    assert a.held() == {} and a.holder("t1") == "w2@h:20"


def test_the_keeper_thread_claims_and_keeps_claims_alive_past_their_ttl(client) -> None:
    # Given a real keeper thread and a TTL shorter than the run
    a = RunClaims(lambda: client, ttl_s=1.2)
    try:
        a.note("t1", "w1@h:10")
        deadline = time.monotonic() + 5
        while a.holder("t1") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.holder("t1") == "w1@h:10", "the original was not claimed in the background"
        # When the run lasts more than twice the TTL, the claim is still held: the keeper refreshes it
        time.sleep(2.5)
        assert a.holder("t1") == "w1@h:10"
    finally:
        a.stop()


def test_the_claim_ttl_outlives_a_broker_outage_of_a_visibility_timeout() -> None:
    assert claim_ttl(20.0) == 40.0 and claim_ttl(1.0) == 10.0


def test_a_short_ttl_is_pushed_back_within_a_third_of_it(client) -> None:
    # Given a claim whose TTL (1.2 s) is not much longer than the keeper's usual refresh (1 s) plus
    # a step of it (0.2 s): a refresh due at a late step would come after the claim ended
    clock = Clock()
    a = RunClaims(lambda: client, ttl_s=1.2, clock=clock, keeper=False)
    a.note("t1", "w1@h:10")
    clock.now += CLAIM_AFTER_S
    a.keep()  # claimed (and its first refresh)
    assert a.holder("t1") == "w1@h:10"
    # When half a second later the keeper steps again
    time.sleep(0.5)
    clock.now += 0.5
    a.keep()
    # Then the claim was pushed back: it is still held past its first TTL
    time.sleep(0.8)
    assert a.holder("t1") == "w1@h:10"
