"""Test app for monitoring: governed tasks that count, drive memory, and a signal receiver.

The receiver of :data:`rmq.celery.signals.alert` runs in the worker's main process; it appends what it
got, one JSON line per call, to the file named by ``MONITOR_SIGNAL_FILE`` so that a test can see it.
"""

from __future__ import annotations

import json
import os
import time

from rmq import governed_task
from rmq.celery.signals import alert
from rmq.core.runtime import current
from workers.app import make_app

app = make_app()
app.set_current()

MiB = 1024 * 1024


@alert.connect(weak=False)
def _record_alert(sender: str, alert: dict, **kwargs: object) -> None:
    path = os.environ.get("MONITOR_SIGNAL_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"sender": sender, "alert": alert}) + "\n")


@governed_task(memory="16MiB", name="m.noop")
def noop(i: int) -> dict:
    """Does nothing; reports its pool process."""
    return {"i": i, "pid": os.getpid()}


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


def _fresh_ratio(rt, after: float, timeout_s: float = 5.0) -> float:
    """The worker's memory ratio from a governor sample taken after ``after`` (epoch s)."""
    deadline = time.time() + timeout_s
    c = rt.ledger.read_control()
    while c.sample_time <= after and time.time() < deadline:
        time.sleep(0.02)
        c = rt.ledger.read_control()
    return c.worker_bytes / c.budget_bytes


@governed_task(memory="64MiB", name="m.memory_phases")
def memory_phases(phases: list, step_mib: int = 4) -> list:
    """For each ``[ratio, hold_s]``: grow (or free) until the worker's measured memory is at
    ``ratio`` of its budget (at or above when growing, at or below when shrinking), then hold.

    Each step halves the remaining distance (at least ``step_mib``) and waits for a fresh
    governor sample, so it overshoots by about one step. Returns the ratio reached in each phase.
    """
    rt = current()
    assert rt is not None
    blocks: list[bytearray] = []
    reached = []
    for target, hold_s in phases:
        ratio = _fresh_ratio(rt, time.time())
        deadline = time.time() + 30
        step = step_mib * MiB
        budget = rt.ledger.read_control().budget_bytes
        if ratio < target:
            while ratio < target and time.time() < deadline:
                n = max(1, int((target - ratio) * budget / 2 / step))  # halve the distance, then step
                blocks.extend(_touch(step) for _ in range(n))
                ratio = _fresh_ratio(rt, time.time())
        else:
            while ratio > target and blocks and time.time() < deadline:
                n = max(1, int((ratio - target) * budget / 2 / step))
                del blocks[-n:]
                ratio = _fresh_ratio(rt, time.time())
        reached.append(round(ratio, 3))
        time.sleep(hold_s)
    return reached


@governed_task(memory="64MiB", name="m.hold_ratio_until")
def hold_ratio_until(ratio: float, redis_url: str, release_key: str, max_s: float = 60.0) -> float:
    """Grow until the worker's measured memory is at ``ratio`` of its budget, then hold it until
    ``release_key`` exists in Redis at ``redis_url`` (at most ``max_s``). Returns the ratio reached."""
    import redis

    rt = current()
    assert rt is not None
    client = redis.Redis.from_url(redis_url)
    budget = rt.ledger.read_control().budget_bytes
    blocks: list[bytearray] = []
    reached = _fresh_ratio(rt, time.time())
    deadline = time.time() + 30
    while reached < ratio and time.time() < deadline:
        n = max(1, int((ratio - reached) * budget / 2 / (4 * MiB)))  # halve the distance, then step
        blocks.extend(_touch(4 * MiB) for _ in range(n))
        reached = _fresh_ratio(rt, time.time())
    until = time.time() + max_s
    while not client.exists(release_key) and time.time() < until:
        time.sleep(0.05)
    return round(reached, 3)


@governed_task(memory="32MiB", name="m.runaway")
def runaway(step_mib: int = 32) -> None:
    """Allocates without bound, far past what it declared, until the governor kills it."""
    blocks = []
    deadline = time.time() + 60
    while time.time() < deadline:
        blocks.append(_touch(step_mib * MiB))
        time.sleep(0.05)
