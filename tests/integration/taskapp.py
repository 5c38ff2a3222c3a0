"""A test app: the reference app plus tasks that exist to provoke the governor."""

from __future__ import annotations

import os
import time

import workers.tasks  # noqa: F401  (the reference tasks)
from rmq import governed_task
from rmq.core.runtime import current
from workers.app import make_app

app = make_app()
app.set_current()

MiB = 1024 * 1024


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


@governed_task(memory="400MiB", name="t.touch400")
def touch400(mib: int = 300, hold_s: float = 1.0) -> dict:
    """Declares 400 MiB, touches ``mib`` MiB for ``hold_s`` seconds."""
    started = time.time()
    block = _touch(mib * MiB)
    time.sleep(hold_s)
    ended = time.time()  # before the memory goes back
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended}


@app.task(name="t.plain_touch")
def plain_touch(mib: int = 300, hold_s: float = 1.0) -> dict:
    """The same workload as a plain Celery task."""
    started = time.time()
    block = _touch(mib * MiB)
    time.sleep(hold_s)
    ended = time.time()  # before the memory goes back
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended}


@governed_task(memory="64MiB", name="t.hold_until_ratio")
def hold_until_ratio(ratio: float, hold_s: float) -> dict:
    """Grows until the worker's measured memory reaches ``ratio`` of its budget, then holds."""
    rt = current()
    assert rt is not None
    blocks = []
    deadline = time.time() + 30
    while time.time() < deadline:
        c = rt.ledger.read_control()
        if c.worker_bytes >= ratio * c.budget_bytes:
            break
        blocks.append(_touch(8 * MiB))
        time.sleep(0.05)  # slow enough for the governor's readings to keep up
    time.sleep(hold_s)
    return {"held_mib": len(blocks) * 8, "pid": os.getpid()}


@governed_task(memory="100MiB", name="t.runaway")
def runaway(step_mib: int = 50, pause_s: float = 0.05) -> None:
    """Allocates without bound (a bug in a real task)."""
    blocks = []
    while True:
        blocks.append(_touch(step_mib * MiB))
        time.sleep(pause_s)


@governed_task(memory="2GiB", name="t.huge")
def huge() -> str:
    """Declares more than a small worker can ever admit."""
    return "ran"


@governed_task(memory="700MiB", name="t.big_hold")
def big_hold(hold_s: float) -> dict:
    """Holds a 700 MiB declaration (touching little) for ``hold_s`` seconds."""
    time.sleep(hold_s)
    return {"pid": os.getpid()}


@governed_task(memory="500MiB", name="t.medium")
def medium() -> str:
    """Fits an idle small worker, not a busy one."""
    return "ran"


@governed_task(name="t.undeclared_touch")
def undeclared_touch(mib: int = 300, hold_s: float = 1.0) -> dict:
    """Declares nothing: admitted with its learned peak."""
    started = time.time()
    block = _touch(mib * MiB)
    time.sleep(hold_s)
    ended = time.time()  # before the memory goes back
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended}


@governed_task(memory="64MiB", name="t.sleep")
def sleep(seconds: float) -> dict:
    """Sleeps; reports its pid."""
    started = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "started": started, "ended": time.time()}
