"""rmq.network.http_registry against a real local API server and a real Redis, across real processes."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis as redis_lib

import rmq.network.http_registry as rhttp
from rmq.core.errors import Defer
from rmq.network.http_client import RATE_MARGIN_S
from workers.fake_api import start_in_thread

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    rhttp.close_all()


@pytest.fixture
def api_factory():
    started = []

    def make(**kwargs):
        api = start_in_thread(**kwargs)
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


def _wait_for(predicate, timeout_s=3.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


CALLER = r"""
import json, sys, redis, rmq.network.http_registry as h
url, redis_url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = h.client("api", base_url=url, rate="5/s", max_wait="30s", redis=redis.Redis.from_url(redis_url))
codes = [c.post("/translate", json={"text": f"t{i}", "target": "en"}).status_code for i in range(n)]
print(json.dumps({"codes": codes, "stats": h.stats("api")}))
"""


def test_two_processes_share_one_rate_and_reuse_connections(api_factory, redis_url):
    # Given a server that itself allows 5 requests per second
    api = api_factory(rate="5/s")
    # When two separate processes each send 6 requests through client("api", rate="5/s")
    procs = [_python(CALLER, api.url, redis_url, "6") for _ in range(2)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    s = api.stats(events=True)
    # Then every call succeeded, the server never saw more than 5 in a second and never had to refuse
    assert [r["codes"] for r in results] == [[200] * 6, [200] * 6]
    assert s["requests"] == 12 and s["status_429"] == 0
    assert s["max_per_window"] <= 5 and s["max_in_any_1s"] <= 5, s["windows"]
    # and 12 requests at 5/s were spread over more than two seconds: the limiter made callers wait
    times = sorted(e[0] for e in s["events"])
    assert times[-1] - times[0] >= 2.0
    assert sum(r["stats"]["throttled"] for r in results) >= 1
    # and each process kept one connection alive for all its requests
    assert s["connections_opened"] == 2


def test_429_and_503_are_retried_honouring_retry_after(api_factory, redis_url, unique):
    # Given a server allowing 5/s (429 + Retry-After: 1 beyond) and failing a quarter with 503
    # (seed 10: of the first 6 accepted requests only the 4th fails, so the first second fills up)
    api = api_factory(rate="5/s", fail_rate=0.25, retry_after_s=1, seed=10)
    c = rhttp.client(f"retry-{unique}", base_url=api.url, rate="50/s", retries=8,
                     redis=redis_lib.Redis.from_url(redis_url))
    c.http.get(api.url + "/health")  # connect first (uncounted): the calls below start at once
    assert _wait_for(lambda: time.time() % 1.0 < 0.3, timeout_s=1.5)  # most of a window is left
    # When 8 calls go out back to back
    answers = [c.post("/translate", json={"text": f"hi {i}", "target": "reverse"}, idempotent=True) for i in range(8)]
    # Then every call eventually succeeded
    assert [r.status_code for r in answers] == [200] * 8
    assert answers[3].json() == {"translation": "3 ih", "target": "reverse", "synthetic": True}
    s, mine = api.stats(events=True), c.stats()
    assert s["status_429"] >= 1 and s["status_503"] >= 1  # both paths were exercised
    # and the client's retry counters equal what the server refused
    assert mine["retries"] == s["status_429"] + s["status_503"]
    assert (mine["responses_429"], mine["responses_5xx"]) == (s["status_429"], s["status_503"])
    assert mine["requests"] == s["requests"] and mine["errors"] == 0
    # and after each 429 the next request came at least Retry-After (1 s) later
    events = s["events"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events) if a[2] == 429]
    assert gaps and min(gaps) >= 1.0, gaps


def test_bytes_per_client_name_match_the_server(api_factory):
    # Given two servers and one client name for each
    api_a, api_b = api_factory(fail_rate=0.3, seed=2), api_factory()
    a = rhttp.client("bytes-a", base_url=api_a.url, retries=10)
    b = rhttp.client("bytes-b", base_url=api_b.url, headers={"Authorization": "Bearer " + "k" * 40})
    # When they send bodies of many sizes (with retried 503s on a) and some odd requests
    for i, size in enumerate([0, 1, 10, 100, 1_000, 10_000, 60_000]):
        text = ("é" if i % 2 else "x") * size
        a.post("/translate", json={"text": text, "target": "reverse"}, idempotent=True)
        b.post("/translate", json={"text": text, "target": "de"}, params={"q": str(i)})
    assert b.get("/nothing-here").status_code == 404
    assert b.post("/translate", content=b"not json").status_code == 400
    # Then each name's bytes match what its server counted, within 5 %
    for client, api in ((a, api_a), (b, api_b)):
        mine, theirs = client.stats(), api.stats()
        assert theirs["bytes_received"] > 50_000
        assert mine["sent_bytes"] == pytest.approx(theirs["bytes_received"], rel=0.05)
        assert mine["recv_bytes"] == pytest.approx(theirs["bytes_sent"], rel=0.05)
    assert api_a.stats()["status_503"] >= 1


LAST_AT_EXIT = r"""
import atexit, sys
def last():
    print("exiting", flush=True)
    sys.stdin.readline()
atexit.register(last)  # registered before rmq.network.http_registry's handler, so it runs after it
import rmq.network.http_registry as h
c = h.client("closing", base_url=sys.argv[1])
for i in range(3):
    c.post("/translate", json={"text": "x"})
print("done", flush=True)
sys.stdin.readline()
"""


def test_a_process_that_ends_closes_its_clients(api_factory):
    api = api_factory()
    proc = _python(LAST_AT_EXIT, api.url, stdin=subprocess.PIPE)
    try:
        # Given a process that used a client and is still running: its connection stays open
        assert proc.stdout.readline().strip() == "done"
        assert api.stats()["open_connections"] == 1 and api.stats()["connections_opened"] == 1
        # When it ends (its last atexit handler then holds it alive)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "exiting"
        # Then the server saw the connection closed while the process was still alive
        assert _wait_for(lambda: api.stats()["open_connections"] == 0)
        assert proc.poll() is None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        _stop(proc)


def test_runtime_exit_hooks_close_clients(api_factory):
    import types

    from rmq.core import runtime
    from rmq.core.procstats import ProcessStats

    api = api_factory()
    cfg = types.SimpleNamespace(throttle_max_wait=2.0, concurrency_lease=30.0, defer_countdown=1.0)
    rt = types.SimpleNamespace(config=cfg, stats=ProcessStats(None), process_exit_hooks=[])
    runtime.set_current(rt)
    try:
        rhttp.client("hooks", base_url=api.url).post("/translate", json={"text": "x"})
        assert api.stats()["open_connections"] == 1
        for hook in rt.process_exit_hooks:  # what a pool process does as it exits
            hook(rt)
        assert _wait_for(lambda: api.stats()["open_connections"] == 0)
        assert rt.stats.counters["http"]["hooks"]["requests"] == 1
    finally:
        runtime.set_current(None)


def _child_uses_client(name: str, parent_id: int) -> None:
    c = rhttp.client(name)
    ok = id(c) != parent_id and c.pid == os.getpid() and c.post("/translate", json={"text": "c"}).status_code == 200
    os._exit(0 if ok else 1)


def test_a_forked_child_never_reuses_the_parent_connections(api_factory):
    api = api_factory()
    parent = rhttp.client("forked", base_url=api.url)
    parent.post("/translate", json={"text": "p"})
    assert api.stats()["connections_opened"] == 1
    child = multiprocessing.get_context("fork").Process(target=_child_uses_client, args=("forked", id(parent)))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    # the child opened its own connection; the parent's still works and was not closed by the child
    assert api.stats()["connections_opened"] == 2
    assert parent.post("/translate", json={"text": "p"}).status_code == 200
    assert api.stats()["connections_opened"] == 2 and api.stats()["requests"] == 3


def test_no_token_within_max_wait_defers_with_time_to_next_token(api_factory, redis_url, unique):
    api = api_factory()
    c = rhttp.client(f"defer-{unique}", base_url=api.url, rate="1/m", max_wait="200ms",
                     redis=redis_lib.Redis.from_url(redis_url))
    assert c.post("/translate", json={"text": "x"}).status_code == 200
    started = time.monotonic()
    with pytest.raises(Defer) as info:
        c.post("/translate", json={"text": "x"})
    assert time.monotonic() - started < 0.2  # a 60 s wait is not slept on: it defers at once
    assert info.value.kind == "rate_limit" and 55 < info.value.countdown_s <= 60 + RATE_MARGIN_S
    assert api.stats()["requests"] == 1 and c.stats()["deferred"] == 1


def test_cluster_concurrency_limit_holds_across_threads(api_factory, redis_url, unique):
    api = api_factory(latency_s=0.15)
    c = rhttp.client(f"conc-{unique}", base_url=api.url, concurrency=2, max_wait="10s",
                     redis=redis_lib.Redis.from_url(redis_url))
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(c.post("/translate", json={"text": "x"}).status_code))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert codes == [200] * 6
    assert api.stats()["max_in_flight"] == 2  # never more than the limit, and the limit was used
    assert redis_lib.Redis.from_url(redis_url).zcard(f"rmq:sem:http:conc-{unique}") == 0  # all returned


def test_fake_api_command_line():
    proc = subprocess.Popen([sys.executable, "-m", "workers.fake_api", "--port", "0", "--rate", "5/s"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as h:
            # 11 quick requests span at most two one-second windows: at least one gets refused
            codes = [h.post("/translate", json={"text": "ab"}) for _ in range(11)]
            stats = h.get("/stats").json()
            refused = [r for r in codes if r.status_code == 429]
            assert len(refused) == sum(max(0, n - 5) for n in stats["windows"].values()) >= 1
            assert all(r.headers["Retry-After"] == "1" for r in refused)
            assert codes[0].json() == {"translation": "AB", "target": "en", "synthetic": True}
            assert stats["requests"] == 11 and stats["status_429"] == len(refused)
            assert stats["connections_opened"] == 1
            assert h.post("/reset").json() == {"ok": True}
            assert h.get("/stats").json()["requests"] == 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_limiter_redis_down_in_a_worker_defers_and_sends_nothing(api_factory):
    import types

    from rmq.core import runtime
    from rmq.core.errors import RateLimiterUnavailable
    from rmq.core.procstats import ProcessStats

    api = api_factory()
    cfg = types.SimpleNamespace(throttle_max_wait=2.0, concurrency_lease=30.0, defer_countdown=4.0)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis_lib.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    rt = types.SimpleNamespace(config=cfg, stats=ProcessStats(None), process_exit_hooks=[], redis=lambda: dead)
    runtime.set_current(rt)
    try:
        c = rhttp.client("down", base_url=api.url, rate="5/s")
        with pytest.raises(Defer) as info:
            c.post("/translate", json={"text": "x"})
    finally:
        runtime.set_current(None)
    assert info.value.kind == "rate_limit_unavailable" and info.value.countdown_s == 4.0
    assert isinstance(info.value.__cause__, RateLimiterUnavailable)  # the log and the task say why
    assert api.stats()["requests"] == 0 and rt.stats.counters["http"]["down"]["deferred"] == 1
