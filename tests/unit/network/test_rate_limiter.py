"""Cluster rate limits and semaphores against a real Redis (Lua needs one); one process here.

Cross-process behaviour (contention, SIGKILLed holders) is in
tests/integration/test_ratelimit_processes.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import pytest
import redis as redis_lib
import redis.exceptions as rexc

from rmq.core import keys
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.errors import ConfigError, Defer, RateLimiterUnavailable
from rmq.concern import TaskContext
from rmq.core.procstats import ProcessStats
from rmq.network.rate_limiter import (
    ClusterLimiter,
    ClusterSemaphore,
    ConcurrencyGuard,
    LeaseKeeper,
    RateLimitGuard,
    throttle,
)
from rmq.core.units import parse_rate


def _poll(predicate, timeout_s: float = 5.0, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(redis_url: str):
    c = redis_lib.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def dead_client():
    # redis-py 8 retries a refused connection 10 times (about 3.6 s); the error is the same without
    c = redis_lib.Redis(host="127.0.0.1", port=_dead_port(), retry=None)
    yield c
    c.close()


class FakeRuntime:
    """What the guards use of rmq.core.runtime.Runtime: config, redis(), stats, local()."""

    def __init__(self, client: Any, **conf: Any) -> None:
        self.config = load_config({f"rmq_{k}": v for k, v in conf.items()}, environ={})
        self.client = client
        self.stats = ProcessStats(None)
        self._local: dict[str, Any] = {}

    def redis(self) -> Any:
        return self.client

    def local(self, key: str, factory: Any) -> Any:
        if key not in self._local:
            self._local[key] = factory()
        return self._local[key]


@pytest.fixture
def install_runtime():
    made: list[FakeRuntime] = []

    def install(client: Any, **conf: Any) -> FakeRuntime:
        rt = FakeRuntime(client, **conf)
        made.append(rt)
        runtime.set_current(rt)  # type: ignore[arg-type]
        return rt

    yield install
    for rt in made:
        keeper = rt._local.get("rmq.network.rate_limiter.keeper")
        if keeper is not None:
            keeper.stop()
    runtime.set_current(None)


def _ctx(rt: FakeRuntime, task_id: str = "t1", **declared: Any) -> TaskContext:
    return TaskContext("app.tasks.call_api", task_id, parse_declaration(**declared), rt.config)


# --- rate limits -------------------------------------------------------------------------------


def test_grants_count_tokens_per_period_then_returns_the_wait(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("3/s")
    started = time.monotonic()
    grants = [limiter.acquire("api", rate) for _ in range(3)]
    denied = limiter.acquire("api", rate)
    elapsed = time.monotonic() - started
    assert grants == [0.0, 0.0, 0.0]
    # the oldest grant leaves the window one period after it was made
    assert 1.0 - elapsed - 0.05 <= denied <= 1.0
    assert client.zcard(keys.rate_limit("api")) == 3  # a denial records nothing


def test_a_token_is_available_after_the_returned_wait_and_not_before(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("4/s")
    for _ in range(4):
        assert limiter.acquire("api", rate) == 0.0
    wait = limiter.acquire("api", rate)
    assert wait > 0
    time.sleep(wait / 2)
    assert limiter.acquire("api", rate) > 0
    time.sleep(wait / 2 + 0.01)
    assert limiter.acquire("api", rate) == 0.0


def test_limits_with_different_names_do_not_share_tokens(client):
    limiter = ClusterLimiter(client)
    rate = parse_rate("1/m")
    assert limiter.acquire("a", rate) == 0.0
    assert limiter.acquire("b", rate) == 0.0
    assert 59.0 < limiter.acquire("a", rate) <= 60.0


def test_a_denial_by_one_limit_consumes_no_token_of_another(client):
    limiter = ClusterLimiter(client)
    limits = {"cheap": parse_rate("100/s"), "tight": parse_rate("1/m")}
    first = limiter.decide(limits)
    second = limiter.decide(limits)
    assert first.granted and first.wait_s == 0.0
    assert not second.granted and second.blocker == "tight" and 59.0 < second.wait_s <= 60.0
    assert client.zcard(keys.rate_limit("cheap")) == 1


def test_idle_limit_keys_expire(client):
    ClusterLimiter(client).acquire("api", parse_rate("5/s"))
    assert 0 < client.pttl(keys.rate_limit("api")) <= 2000


def test_decision_uses_redis_clock(client):
    decision = ClusterLimiter(client).decide({"api": parse_rate("5/s")})
    seconds, micros = client.time()
    assert abs(seconds * 1_000_000 + micros - decision.redis_time_us) < 1_000_000


class _NoScriptOnce:
    """A client whose first EVALSHA answers NOSCRIPT, as after a Redis restart or SCRIPT FLUSH."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls, self.loads = real, 0, 0
        self.connection_pool = real.connection_pool

    def evalsha(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise rexc.NoScriptError("NOSCRIPT No matching script.")
        return self.real.evalsha(*args)

    def script_load(self, text: str) -> str:
        self.loads += 1
        return self.real.script_load(text)


def test_noscript_loads_the_script_and_retries(client):
    proxy = _NoScriptOnce(client)
    assert ClusterLimiter(proxy).acquire("api", parse_rate("5/s")) == 0.0
    assert (proxy.calls, proxy.loads) == (2, 1)
    assert client.zcard(keys.rate_limit("api")) == 1


def test_unreachable_redis_raises_rate_limiter_unavailable_naming_it(dead_client):
    port = dead_client.connection_pool.connection_kwargs["port"]
    with pytest.raises(RateLimiterUnavailable, match=f"127.0.0.1:{port}.*ConnectionError"):
        ClusterLimiter(dead_client).acquire("api", parse_rate("5/s"))
    sem = ClusterSemaphore(dead_client, 5)
    for call in (lambda: sem.acquire("g", 1, "h"), lambda: sem.renew("g", "h"),
                 lambda: sem.release("g", "h"), lambda: sem.holders("g")):
        with pytest.raises(RateLimiterUnavailable, match=str(port)):
            call()


# --- throttle ----------------------------------------------------------------------------------


def test_throttle_defers_with_the_time_to_the_next_token(client):
    with throttle("api", "1/m", client=client):
        pass
    with pytest.raises(Defer) as info, throttle("api", "1/m", client=client, max_wait_s=0.5):
        pytest.fail("the block must not run without a token")
    assert info.value.kind == "rate_limit"
    assert 59.0 < info.value.countdown_s <= 60.0
    assert "'api'" in info.value.reason


def test_throttle_waits_for_a_token_within_max_wait(client):
    for _ in range(5):
        with throttle("api", "5/s", client=client):
            pass
    started = time.monotonic()
    with throttle("api", "5/s", client=client, max_wait_s=2):
        waited = time.monotonic() - started
    assert 0.5 < waited < 1.5


def test_throttle_outside_a_worker_without_client_is_unavailable():
    with pytest.raises(RateLimiterUnavailable, match="client="), throttle("api", "5/s"):
        pass


def test_throttle_refuses_a_bad_rate(client):
    with pytest.raises(ConfigError, match="10 per s"), throttle("api", "10 per s", client=client):
        pass


def test_throttle_in_a_worker_uses_its_redis_and_counts(client, install_runtime):
    rt = install_runtime(client, throttle_max_wait="0s")
    with throttle("api", "1/m"):
        pass
    with pytest.raises(Defer), throttle("api", "1/m"):
        pass
    assert rt.stats.counters["rate_limits"]["api"] == {"granted": 1, "denied": 1}


# --- RateLimitGuard ----------------------------------------------------------------------------


def test_rate_limit_guard_admits_then_defers_without_waiting(client, install_runtime):
    rt = install_runtime(client)
    guard = RateLimitGuard()
    ctx = _ctx(rt, rate_limits={"tts-api": "2/m"})
    assert guard.applies(ctx.declaration) and not guard.applies(parse_declaration())
    guard.enter(ctx)
    guard.enter(ctx)
    started = time.monotonic()
    with pytest.raises(Defer) as info:
        guard.enter(ctx)
    assert time.monotonic() - started < 0.5
    assert info.value.kind == "rate_limit" and 59.0 < info.value.countdown_s <= 60.0
    assert rt.stats.counters["rate_limits"]["tts-api"] == {"granted": 2, "denied": 1}


def test_rate_limit_guard_fails_closed_and_logs_why(dead_client, install_runtime, caplog):
    rt = install_runtime(dead_client, defer_countdown="3s")
    ctx = _ctx(rt, rate_limits={"tts-api": "10/s"})
    with caplog.at_level(logging.WARNING, logger="rmq.network.rate_limiter"), pytest.raises(Defer) as info:
        RateLimitGuard().enter(ctx)
    assert info.value.kind == "rate_limit_unavailable" and info.value.countdown_s == 3.0
    port = dead_client.connection_pool.connection_kwargs["port"]
    assert any(f"127.0.0.1:{port}" in r.getMessage() and "failing closed" in r.getMessage()
               for r in caplog.records)


def test_guards_do_nothing_outside_a_worker(dead_client, monkeypatch):
    # Given no current runtime (outside a governed worker) and contexts that carry none either
    monkeypatch.setattr(runtime, "_current", None)
    calls: list[str] = []

    def never(name: str) -> Any:
        def called(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)  # recorded too, in case a guard swallows the error
            raise AssertionError(f"{name} called outside a worker")
        return called

    monkeypatch.setattr(ClusterLimiter, "decide", never("ClusterLimiter.decide"))
    monkeypatch.setattr(ClusterSemaphore, "acquire_all", never("ClusterSemaphore.acquire_all"))
    monkeypatch.setattr(ClusterSemaphore, "release", never("ClusterSemaphore.release"))
    rt = FakeRuntime(dead_client)  # only for its config
    rated, bounded = _ctx(rt, rate_limits={"x": "1/s"}), _ctx(rt, concurrency={"x": 1})
    assert rated.runtime is None and bounded.runtime is None
    # When the guards run around a task
    RateLimitGuard().enter(rated)
    ConcurrencyGuard().enter(bounded)
    ConcurrencyGuard().exit(bounded, failed=False)
    # Then no limit was consulted, no token granted and no permit held (and nothing raised)
    assert calls == []
    assert rated.state == {} and bounded.state == {}
    assert rt._local == {} and rt.stats.counters == {}


# --- ClusterSemaphore, LeaseKeeper, ConcurrencyGuard -------------------------------------------


def test_semaphore_grants_up_to_the_limit_and_frees_on_release(client):
    sem = ClusterSemaphore(client, lease_s=30)
    assert sem.acquire("gpu", 2, "a") and sem.acquire("gpu", 2, "b")
    assert not sem.acquire("gpu", 2, "c")
    assert sem.acquire("gpu", 2, "a")  # a holder that holds renews, it takes no second permit
    assert sem.holders("gpu") == 2
    sem.release("gpu", "a")
    assert sem.holders("gpu") == 1 and sem.acquire("gpu", 2, "c")


def test_a_lease_that_is_not_renewed_lapses(client):
    sem = ClusterSemaphore(client, lease_s=0.3)
    assert sem.acquire("gpu", 1, "dead")
    assert not sem.acquire("gpu", 1, "next")
    assert _poll(lambda: sem.acquire("gpu", 1, "next"), timeout_s=3)
    assert not sem.renew("gpu", "dead")


def test_acquire_all_takes_every_permit_or_none(client):
    sem = ClusterSemaphore(client, lease_s=30)
    assert sem.acquire("b", 1, "other")
    assert sem.acquire_all({"a": 5, "b": 1}, "me") == "b"
    assert sem.holders("a") == 0


def test_lease_keeper_keeps_permits_alive_until_discarded(client):
    sem = ClusterSemaphore(client, lease_s=0.4)
    keeper = LeaseKeeper(sem)
    assert sem.acquire("gpu", 1, "me")
    keeper.add("gpu", "me", 1)
    keeper.start()
    try:
        time.sleep(1.0)  # 2.5 leases
        assert sem.holders("gpu") == 1 and not sem.acquire("gpu", 1, "other")
        keeper.discard("gpu", "me")
        assert _poll(lambda: sem.acquire("gpu", 1, "other"), timeout_s=3)
    finally:
        keeper.stop()


def test_lease_keeper_retakes_a_lapsed_permit_when_there_is_room(client):
    sem = ClusterSemaphore(client, lease_s=30)
    keeper = LeaseKeeper(sem)
    keeper.add("gpu", "me", 1)  # as after Redis lost the key
    assert keeper.renew_now() == 1 and sem.holders("gpu") == 1


def test_a_renewal_racing_a_release_never_retakes_the_permit(client):
    sem = ClusterSemaphore(client, lease_s=30)
    keeper = LeaseKeeper(sem)
    assert sem.acquire("gpu", 1, "me")
    keeper.add("gpu", "me", 1)
    stale = keeper._snapshot()  # the keeper thread read its list just before the task ended
    keeper.discard("gpu", "me")
    sem.release("gpu", "me")
    keeper._snapshot = lambda: stale  # type: ignore[method-assign]
    assert keeper.renew_now() == 0 and sem.holders("gpu") == 0


def test_concurrency_guard_holds_renews_and_releases(client, install_runtime):
    rt = install_runtime(client, concurrency_lease="600ms")
    guard = ConcurrencyGuard()
    first, second = _ctx(rt, "t1", concurrency={"gpu-api": 1}), _ctx(rt, "t2", concurrency={"gpu-api": 1})
    guard.enter(first)
    time.sleep(1.5)  # longer than the lease: only renewal keeps the permit
    with pytest.raises(Defer) as info:
        guard.enter(second)
    assert info.value.kind == "concurrency" and 0 < info.value.countdown_s <= 1.0
    guard.exit(first, failed=False)
    guard.enter(second)
    sem = ClusterSemaphore(client, 1)
    assert sem.holders("gpu-api") == 1
    guard.exit(second, failed=True)
    assert sem.holders("gpu-api") == 0
    assert rt.stats.counters["concurrency"]["gpu-api"] == {"granted": 2, "denied": 1}


def test_concurrency_guard_fails_closed(dead_client, install_runtime, caplog):
    rt = install_runtime(dead_client)
    with caplog.at_level(logging.WARNING, logger="rmq.network.rate_limiter"), pytest.raises(Defer) as info:
        ConcurrencyGuard().enter(_ctx(rt, concurrency={"gpu-api": 1}))
    assert info.value.kind == "concurrency_unavailable"
    assert info.value.countdown_s == rt.config.defer_countdown
    assert "failing closed" in caplog.text


def test_concurrent_threads_never_exceed_the_limit(client):
    sem = ClusterSemaphore(client, lease_s=30)
    active, peak, lock = [0], [0], threading.Lock()

    def worker(i: int) -> None:
        c = redis_lib.Redis(connection_pool=client.connection_pool)
        mine = ClusterSemaphore(c, 30)
        for n in range(15):
            holder = f"{i}:{n}"
            while not mine.acquire("gpu", 2, holder):
                time.sleep(0.002)
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.003)
            with lock:
                active[0] -= 1
            mine.release("gpu", holder)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 2 and sem.holders("gpu") == 0
