"""The governed HTTP client: tokens and permits, Defer, retries, counters (a mock transport, no network)."""

from __future__ import annotations

import random

import httpx
import pytest

from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.core.units import Rate, parse_rate
from rmq.network.http_client import RATE_MARGIN_S, RmqHttpClient
from rmq.network.retries import BACKOFF_BASE_S


class FakeClock:
    """A monotonic clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class StubLimiter:
    def __init__(self, waits):
        self.waits = list(waits)
        self.calls = []

    def acquire(self, name, rate):
        self.calls.append((name, rate))
        if isinstance(self.waits[0], Exception):
            raise self.waits[0]
        return self.waits.pop(0) if len(self.waits) > 1 else self.waits[0]


class StubSemaphore:
    def __init__(self, grants):
        self.grants = list(grants)
        self.acquired, self.released = [], []

    def acquire(self, name, limit, holder):
        ok = self.grants.pop(0) if len(self.grants) > 1 else self.grants[0]
        if ok:
            self.acquired.append(holder)
        return ok

    def release(self, name, holder):
        self.released.append(holder)


def scripted(*answers):
    """A MockTransport answering in order: an int status, (status, headers), or an exception."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        body = b'{"n": %d}' % len(seen)  # streamed, as from a socket, so its bytes count as downloaded
        headers = {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))

    return httpx.MockTransport(handler), seen


def make(answers=(200,), clock=None, **kw) -> tuple[RmqHttpClient, list, FakeClock]:
    transport, seen = scripted(*answers)
    clock = clock or FakeClock()
    kw.setdefault("retries", 3)
    c = RmqHttpClient("t", base_url="http://api.test", transport=transport, sleep=clock.sleep,
                            clock=clock, rng=random.Random(7), **kw)
    return c, seen, clock


# -- limits ------------------------------------------------------------------------------------
def test_defer_when_no_token_within_max_wait():
    limiter = StubLimiter([1.5])
    c, seen, clock = make(rate=parse_rate("5/s"), limiter=limiter, max_wait_s=0.5)
    with pytest.raises(Defer) as info:
        c.get("/x")
    assert info.value.kind == "rate_limit" and info.value.countdown_s == 1.5
    assert seen == [] and clock.sleeps == []  # nothing sent, no pointless wait
    # tokens are spaced with a little slack for uneven network delay
    assert limiter.calls == [("http:t", Rate(5, 1.0 + RATE_MARGIN_S))]
    assert c.stats()["deferred"] == 1 and c.stats()["requests"] == 0


def test_waits_for_a_token_within_max_wait():
    c, seen, clock = make(rate=parse_rate("5/s"), limiter=StubLimiter([0.3, 0.4, 0.0]), max_wait_s=1.0)
    assert c.get("/x").status_code == 200
    assert clock.sleeps == [0.3, 0.4] and len(seen) == 1
    s = c.stats()
    assert s["throttled"] == 1 and s["throttled_s"] == pytest.approx(0.7) and s["deferred"] == 0


def test_token_wait_that_would_pass_max_wait_defers_with_time_to_next_token():
    c, _, clock = make(rate=parse_rate("5/s"), limiter=StubLimiter([0.6, 0.6]), max_wait_s=1.0)
    with pytest.raises(Defer) as info:
        c.get("/x")
    assert clock.sleeps == [0.6] and info.value.countdown_s == 0.6


def test_max_wait_defaults_to_the_runtime_config(stub_runtime):
    stub_runtime(throttle_max_wait=5.0)
    c, _, clock = make(rate=parse_rate("1/s"), limiter=StubLimiter([4.0, 0.0]))
    c.get("/x")
    assert clock.sleeps == [4.0]


def test_concurrency_permit_per_attempt_and_defer_when_full():
    sem = StubSemaphore([True])
    c, _, _ = make(answers=(503, 200), concurrency=2, semaphore=sem)
    c.get("/x")
    assert len(sem.acquired) == 2 and sem.released == sem.acquired  # one per attempt, all returned
    full = StubSemaphore([False])
    c2, seen, _ = make(concurrency=2, semaphore=full, max_wait_s=0.3)
    with pytest.raises(Defer) as info:
        c2.get("/x")
    assert info.value.kind == "concurrency" and seen == []


def test_limiter_down_outside_a_worker_raises():
    c, seen, _ = make(rate=parse_rate("5/s"), limiter=StubLimiter([RateLimiterUnavailable("down")]))
    with pytest.raises(RateLimiterUnavailable):
        c.get("/x")
    assert seen == []


def test_limiter_down_in_a_worker_defers_and_is_counted(stub_runtime):
    rt = stub_runtime()
    c, seen, _ = make(rate=parse_rate("5/s"), limiter=StubLimiter([RateLimiterUnavailable("down")]))
    with pytest.raises(Defer) as info:
        c.get("/x")
    assert info.value.kind == "rate_limit_unavailable" and info.value.countdown_s == 3.0
    assert isinstance(info.value.__cause__, RateLimiterUnavailable) and seen == []
    assert rt.stats.counters["http"]["t"]["deferred"] == 1


# -- retries -----------------------------------------------------------------------------------
def test_retries_5xx_with_bounded_jittered_backoff():
    c, seen, clock = make(answers=(503, 502, 500, 200))
    assert c.get("/x").status_code == 200
    assert len(seen) == 4 and len(clock.sleeps) == 3
    for attempt, slept in enumerate(clock.sleeps):
        assert 0.0 <= slept <= BACKOFF_BASE_S * 2**attempt
    s = c.stats()
    assert (s["requests"], s["retries"], s["responses_5xx"], s["errors"]) == (4, 3, 3, 0)
    assert s["backoff_s"] == pytest.approx(sum(clock.sleeps))


def test_retry_after_is_the_least_wait():
    c, _, clock = make(answers=((429, {"Retry-After": "2"}), (429, {"Retry-After": "1"}), 200))
    c.get("/x")
    assert clock.sleeps[0] >= 2.0 and clock.sleeps[1] >= 1.0
    assert c.stats()["responses_429"] == 2


def test_long_retry_after_defers_instead_of_sleeping():
    c, _, clock = make(answers=((429, {"Retry-After": "3600"}),))
    with pytest.raises(Defer) as info:
        c.get("/x")
    assert info.value.countdown_s == 3600 and clock.sleeps == []


def test_final_5xx_raises_http_status_error():
    c, seen, _ = make(answers=(503,), retries=2)
    with pytest.raises(httpx.HTTPStatusError) as info:
        c.post("/x", json={"a": 1}, idempotent=True)  # the API de-duplicates: retried like a GET
    assert info.value.response.status_code == 503 and "after 3 attempts" in str(info.value)
    assert len(seen) == 3 and c.stats()["errors"] == 1


def test_other_statuses_are_returned_not_retried():
    c, seen, _ = make(answers=(404,))
    assert c.get("/x").status_code == 404 and len(seen) == 1


def test_connection_errors_are_retried_then_raised_and_send_nothing():
    c, seen, clock = make(answers=(httpx.ConnectError("refused"),), retries=2)
    with pytest.raises(httpx.ConnectError):
        c.get("/x")
    assert len(seen) == 3 and len(clock.sleeps) == 2
    assert c.stats()["sent_bytes"] == 0 and c.stats()["errors"] == 1


def test_timeout_then_success():
    c, seen, _ = make(answers=(httpx.ReadTimeout("slow"), 200))
    assert c.get("/x").status_code == 200
    assert len(seen) == 2 and c.stats()["retries"] == 1
    assert c.stats()["sent_bytes"] > 0  # the timed-out request went out


# -- accounting --------------------------------------------------------------------------------
def test_counters_reach_the_runtime_stats(stub_runtime):
    rt = stub_runtime()
    c, _, _ = make(answers=(503, 200))
    c.get("/x")
    http = rt.stats.counters["http"]["t"]
    assert http["requests"] == 2 and http["retries"] == 1 and http["recv_bytes"] == c.stats()["recv_bytes"]
