"""A run claim stays held while this pool process is busy unloading a model.

The watcher thread of a pool process runs the unload hooks when the governor asks; a slow unload
(a model's own close hook, a large ``gc.collect()``) used to hold up the claim refresh that ran on
the same thread, so the claim of a body still running lapsed and a copy could start beside it.
Real Redis, a real ledger, the real watcher.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_lib

from rmq.celery.child import ChildWatcher
from rmq.core import keys
from rmq.core.claims import RunClaims, claim_token
from rmq.core.config import load_config
from rmq.core.ledger import Control, Ledger
from rmq.core.runtime import Runtime

MiB = 1 << 20


@pytest.fixture
def rt(tmp_path, redis_url):
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 4096 * MiB, 3500 * MiB, 100 * MiB, time.time(), "ok", 2, False))
    runtime = Runtime(load_config({}, environ={}), app=None, runtime_dir=str(tmp_path / "rt"), ledger=ledger,
                      redis_url=redis_url)
    yield runtime
    claims = runtime.made("claims")
    if claims is not None and hasattr(claims, "stop"):
        claims.stop()


def test_a_claim_outlives_its_ttl_while_the_watcher_is_busy_unloading(rt: Runtime, redis_url: str) -> None:
    # Given a copy of a task that holds its run claim (TTL 1.5 s) in this process
    claims = RunClaims(rt.redis, ttl_s=1.5)
    rt._local["claims"] = claims
    assert claims.acquire("long-body", claim_token("w1@host", 4242))
    # and an unload that takes 4 s once the governor asks this process to unload
    unloading = threading.Event()

    def slow_unload(_bytes: int) -> int:
        unloading.set()
        time.sleep(4.0)
        return 0

    rt.unload_hooks.append(slow_unload)
    watcher = ChildWatcher(rt, interval_s=0.05)
    watcher.start()
    try:
        # When the governor asks for an unload
        c = rt.ledger.read_control()
        rt.ledger.write_control(c._replace(unload_generation=c.unload_generation + 1, unload_bytes=MiB))
        assert unloading.wait(5), "the watcher never ran the unload"
        # Then, 3 s into the unload (twice the claim's TTL), the claim is still held by the body's run
        time.sleep(3.0)
        held = redis_lib.Redis.from_url(redis_url).get(keys.run_claim("long-body"))
        assert held == b"w1@host:4242"
    finally:
        watcher.stop()
