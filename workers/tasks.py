"""Governed tasks of the reference app. Workloads are synthetic and say so."""

from __future__ import annotations

import os
import time

from rmq import governed_task
from workers.app import app  # noqa: F401  (binds the shared tasks to the reference app)


@governed_task(memory="64MiB", name="workers.noop")
def noop(x: int = 0) -> int:
    """Does nothing; for overhead and routing tests."""
    return x


@governed_task(memory="64MiB", name="workers.record")
def record(label: str, hold_s: float = 0.0) -> dict:
    """Returns when and where it ran (tests read the order and overlap)."""
    started = time.time()
    if hold_s:
        time.sleep(hold_s)
    return {"label": label, "pid": os.getpid(), "started": started, "ended": time.time()}


@governed_task(memory="64MiB", heavy=True, name="workers.heavy_record")
def heavy_record(label: str) -> dict:
    """A heavy-queue task (routing tests)."""
    return {"label": label, "pid": os.getpid()}


@governed_task(name="workers.touch", memory=None)
def touch(mib: int, hold_s: float = 1.0) -> int:
    """Synthetic workload: really touches ``mib`` MiB for ``hold_s`` seconds, then frees it."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(hold_s)
    del block
    return mib
