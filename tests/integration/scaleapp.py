"""Tasks for the autoscaler tests and benchmark (``-A scaleapp``).

``SCALEAPP_AUTOSCALER=celery`` makes the worker use Celery's own autoscaler (for the
benchmark's side-by-side run); by default rmq's is used.
"""

from __future__ import annotations

import os
import time

from celery.worker.autoscale import Autoscaler

from rmq import governed_task, models
from rmq.core.runtime import current
from rmq.testing.synthetic_models import synthetic_loader
from workers.app import make_app

app = make_app()
app.set_current()


class CeleryAutoscaler(Autoscaler):
    """Celery's autoscaler under another name (``rmq.install`` replaces the default name)."""


if os.environ.get("SCALEAPP_AUTOSCALER") == "celery":
    app.conf.worker_autoscaler = "scaleapp:CeleryAutoscaler"

MiB = 1024 * 1024
HEAVY_MIB = int(os.environ.get("SCALEAPP_HEAVY_MIB", "300"))

models.register("scale.model_a", loader=synthetic_loader("scale.model_a", "120MiB"))
models.register("scale.model_b", loader=synthetic_loader("scale.model_b", "120MiB"))


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


def _report(started: float, **extra: object) -> dict:
    return {"pid": os.getpid(), "started": started, "ended": time.time(), **extra}


@governed_task(memory="16MiB", name="scale.light")
def light(seconds: float = 1.0) -> dict:
    """A light task: sleeps."""
    started = time.time()
    time.sleep(seconds)
    return _report(started)


@governed_task(memory=f"{HEAVY_MIB}MiB", name="scale.heavy")
def heavy(seconds: float = 2.0, touch_mib: int = 40) -> dict:
    """A heavy declaration (``SCALEAPP_HEAVY_MIB``, default 300 MiB) that touches ``touch_mib``."""
    started = time.time()
    block = _touch(touch_mib * MiB)
    time.sleep(seconds)
    ended = time.time()
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended}


@governed_task(memory="16MiB", name="scale.load_models")
def load_models(names: list[str], hold_s: float = 0.0) -> dict:
    """Loads the unpinned models ``names`` (in order) into this process's cache; they stay after the task."""
    started = time.time()
    for name in names:
        models.get(name)
    current().stats.flush(force=True)  # the models gauge reaches the main process now
    time.sleep(hold_s)
    return _report(started)


@governed_task(memory="64MiB", name="scale.press")
def press(ratio: float, hold_s: float, delay_s: float = 0.0) -> dict:
    """After ``delay_s``, grows until the worker's measured memory reaches ``ratio`` of its budget, then holds."""
    rt = current()
    assert rt is not None
    time.sleep(delay_s)
    started = time.time()
    blocks = []
    deadline = time.time() + 30
    while time.time() < deadline:
        c = rt.ledger.read_control()
        if c.worker_bytes >= ratio * c.budget_bytes:
            break
        blocks.append(_touch(8 * MiB))
        time.sleep(0.02)
    time.sleep(hold_s)
    return _report(started, held_mib=len(blocks) * 8)
