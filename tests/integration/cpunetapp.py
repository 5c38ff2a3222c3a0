"""Test tasks for CPU slots, thread caps and cluster-wide limits.

Tasks report what they saw (pids, times, thread counts) in their results; tasks that must be
found while they run (to be killed) write their pid to the broker's Redis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import redis as redis_lib

from rmq import governed_task
from rmq.celery.task import rmq_headers
from workers.app import make_app

app = make_app()
app.set_current()

_clients: dict[str, Any] = {}


def broker() -> redis_lib.Redis:
    """This process's client of the broker's Redis (always the real one, unlike rmq_redis_url)."""
    url = os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    key = f"{os.getpid()}:{url}"
    if key not in _clients:
        _clients[key] = redis_lib.Redis.from_url(url)
    return _clients[key]


def redis_now_us() -> int:
    """Redis's clock (the limiter's clock) in microseconds."""
    s, us = broker().time()
    return int(s) * 1_000_000 + int(us)


def _span(fn: Any, hold_s: float) -> dict:
    started = time.time()
    fn(hold_s)
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "ended": time.time()}


# CPU slots ------------------------------------------------------------------
@governed_task(cpu=2, name="cn.heavy")
def heavy(hold_s: float = 1.0) -> dict:
    """Reserves 2 CPU slots for ``hold_s`` seconds."""
    return _span(time.sleep, hold_s)


@governed_task(name="cn.light")
def light(hold_s: float = 0.2) -> dict:
    """Reserves no CPU slot."""
    return _span(time.sleep, hold_s)


# thread caps ----------------------------------------------------------------
_PROBE = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))"
_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _thread_report() -> dict:
    import json

    import numpy  # loaded inside the task on purpose (the first task in the process loads it)
    from threadpoolctl import threadpool_info

    numpy.dot(numpy.ones((64, 64)), numpy.ones((64, 64)))
    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    out = subprocess.run([sys.executable, "-c", _PROBE % (_VARS,)], capture_output=True, text=True, check=True)
    return {"pid": os.getpid(), "blas_threads": blas, "child_env": json.loads(out.stdout),
            "own_env": {k: os.environ.get(k) for k in _VARS}}


@governed_task(cpu=1, name="cn.threads_capped")
def threads_capped() -> dict:
    """Reports BLAS threads and a subprocess's thread variables under ``cpu=1``."""
    return _thread_report()


@governed_task(name="cn.threads_free")
def threads_free() -> dict:
    """The same report without ``cpu=``: the process's defaults."""
    return _thread_report()


# rate limits -----------------------------------------------------------
@governed_task(bind=True, rate_limits={"x": "5/s"}, name="cn.limited")
def limited(self: Any) -> dict:
    """Rate-limited to 5/s across the cluster; reports its grant time and start time (Redis clock)."""
    started_us = redis_now_us()
    ctx = self.rmq_context
    return {"granted_us": ctx.state.get("rate_limit_granted_us") if ctx else None, "started_us": started_us,
            "pid": os.getpid(), "worker": self.request.hostname,
            "deferrals": int(rmq_headers(self.request).get("rmq_deferrals", 0) or 0)}


@governed_task(bind=True, name="cn.unlimited")
def unlimited(self: Any, hold_s: float = 0.1) -> dict:
    """No limit: runs as soon as a pool process is free."""
    return {**_span(time.sleep, hold_s), "worker": self.request.hostname}


@governed_task(rate_limits={"y": "5/s"}, name="cn.limited_marker")
def limited_marker(tag: str) -> str:
    """Rate-limited; marks in the broker's Redis that its body ran."""
    broker().set(f"cn:ran:{tag}", os.getpid())
    return "ran"


# concurrency limits ----------------------------------------------------------
@governed_task(concurrency={"api": 2}, name="cn.api")
def api(hold_s: float = 0.4) -> dict:
    """Holds one of 2 cluster-wide ``api`` permits for ``hold_s`` seconds."""
    return _span(time.sleep, hold_s)


@governed_task(concurrency={"api": 2}, name="cn.api_hold")
def api_hold(tag: str, max_s: float = 30.0) -> dict:
    """Holds an ``api`` permit until ``cn:release`` is set (or ``max_s``); pid in ``cn:pid:<tag>``."""
    client = broker()
    started = time.time()
    client.set(f"cn:pid:{tag}", os.getpid())
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and not client.exists("cn:release"):
        time.sleep(0.05)
    return {"pid": os.getpid(), "started": started, "ended": time.time()}

