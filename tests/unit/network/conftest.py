"""Fixtures of the network tests: a real Redis (the limits are Lua scripts), a dead one, fake runtimes.

Cross-process behaviour (contention, SIGKILLed holders) is in
tests/integration/test_ratelimit_processes.py.
"""

from __future__ import annotations

import socket
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.procstats import ProcessStats
from rmq.network.lease_keeper import LeaseKeeper


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def poll() -> Callable[..., bool]:
    """``poll(predicate, timeout_s=5.0)``: True as soon as ``predicate()`` is, else its last answer."""

    def poll(predicate: Callable[[], Any], timeout_s: float = 5.0, step_s: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(step_s)
        return bool(predicate())

    return poll


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
def make_runtime() -> Callable[..., FakeRuntime]:
    """``make_runtime(client, **rmq_config)``: a fake runtime, not installed as the current one."""
    return FakeRuntime


@pytest.fixture
def install_runtime():
    """``install_runtime(client, **rmq_config)``: a fake runtime installed as the current one."""
    made: list[FakeRuntime] = []

    def install(client: Any, **conf: Any) -> FakeRuntime:
        rt = FakeRuntime(client, **conf)
        made.append(rt)
        runtime.set_current(rt)  # type: ignore[arg-type]
        return rt

    yield install
    for rt in made:
        for part in rt._local.values():
            if isinstance(part, LeaseKeeper):
                part.stop()
    runtime.set_current(None)


@pytest.fixture
def task_context() -> Callable[..., TaskContext]:
    """``task_context(rt, task_id="t1", **declared)``: the context of one task of ``app.tasks.call_api``."""

    def make(rt: FakeRuntime, task_id: str = "t1", **declared: Any) -> TaskContext:
        return TaskContext("app.tasks.call_api", task_id, parse_declaration(**declared), rt.config)

    return make


@pytest.fixture
def stub_runtime():
    """``stub_runtime(**config)``: a runtime with no Redis (what the HTTP clients use), installed as current."""

    def install(**config: Any) -> Any:
        cfg = types.SimpleNamespace(**{"throttle_max_wait": 2.0, "concurrency_lease": 30.0, "defer_countdown": 3.0,
                                       **config})
        rt = types.SimpleNamespace(config=cfg, stats=ProcessStats(None), process_exit_hooks=[],
                                   redis=lambda: pytest.fail("no Redis expected"))
        runtime.set_current(rt)
        return rt

    yield install
    runtime.set_current(None)
