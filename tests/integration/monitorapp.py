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
