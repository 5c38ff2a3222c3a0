"""Test app for the model cache in a real worker: three 400 MiB synthetic models and tasks using them.

Every model here is SYNTHETIC (``rmq.testing.synthetic_models``): real, resident memory, no weights.
Tasks report the pool process they ran in and what its cache holds, so the test can follow
which process holds which model. Tasks given a ``hold`` key publish their pid in Redis and wait
for the test to release them: that is how the test keeps a pool process busy (Celery's fair
scheduling then sends the next task to the other process) or holds a lease while pressure hits.
"""

from __future__ import annotations

import os
import time

import redis as redis_lib

from rmq import governed_task, models
from rmq.core.runtime import current
from rmq.memory.trim import collect_and_trim
from rmq.testing.synthetic_models import synthetic_loader
from workers.app import make_app

app = make_app()
app.set_current()

MiB = 1024 * 1024
MODEL_SIZE = os.environ.get("MT_MODEL_SIZE", "400MiB")

models.register("mt.pinned", size=MODEL_SIZE, pinned=True, loader=synthetic_loader("mt.pinned", MODEL_SIZE))
models.register("mt.alpha", size=MODEL_SIZE, loader=synthetic_loader("mt.alpha", MODEL_SIZE))
models.register("mt.beta", size=MODEL_SIZE, loader=synthetic_loader("mt.beta", MODEL_SIZE))
models.register("mt.small", size="8MiB", loader=synthetic_loader("mt.small", "8MiB"))
models.register("mt.huge", size="4GiB", loader=synthetic_loader("mt.huge", "4GiB"))  # never loaded


@models.register("mt.broken", size="8MiB")
def load_broken() -> object:
    """A loader that fails the way real ones do: its weights file is missing."""
    partial = bytearray(4 * MiB)  # half-built state the cache must drop
    raise FileNotFoundError(f"weights not found: /nonexistent/mt.broken.bin (after {len(partial)} bytes)")


def _redis() -> redis_lib.Redis:
    return redis_lib.Redis.from_url(os.environ["RMQ_BROKER_URL"])


def _hold(key: str | None, limit_s: float = 60.0) -> None:
    """Publish this pid under ``<key>:pid`` and wait until the test sets ``<key>:go``."""
    if not key:
        return
    r = _redis()
    r.set(f"{key}:pid", os.getpid(), ex=300)
    deadline = time.monotonic() + limit_s
    while not r.exists(f"{key}:go"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} was never released")
        time.sleep(0.02)


def _held() -> list[dict]:
    return [
        {k: m[k] for k in ("name", "size_bytes", "pinned", "leased", "loads")} for m in models.cache().snapshot()
    ]


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    block[::4096] = b"\x01" * len(range(0, n, 4096))
    return block


@app.task(name="mt.block")
def block(key: str) -> int:
    """Keeps its pool process busy until released (not governed: reserves nothing)."""
    _hold(key)
    return os.getpid()


@governed_task(memory="32MiB", name="mt.infer")
def infer(name: str, x: int = 7, hold: str | None = None, then_hold: str | None = None) -> dict:
    """Leases model ``name`` for one inference (with ``hold``, until released), then, with
    ``then_hold``, keeps the process busy without the lease until released."""
    with models.use(name) as model:
        out = model.infer(x)
        _hold(hold)
        held = _held()  # taken while the lease is still on
    synthetic = model.synthetic
    del model  # a reference kept here would keep the model's memory after an eviction
    _hold(then_hold)
    return {"pid": os.getpid(), "model": name, "out": out, "synthetic": synthetic, "held": held,
            "after": _held()}


@governed_task(memory="96MiB", name="mt.pressure")
def pressure(
    ratio: float,
    hold: str | None = None,
    lease: str | None = None,
    then_hold: str | None = None,
    limit_mib: int = 256,
) -> dict:
    """Allocates 8 MiB at a time until the governor reads the worker at ``ratio`` of its budget or
    enters its unload zone (at most ``limit_mib``), then holds that memory until ``hold`` is
    released; with ``lease``, leases that model meanwhile; with ``then_hold``, keeps the memory
    (not the lease) until that is released too."""
    rt = current()
    assert rt is not None
    blocks = []

    def grow() -> int:
        while len(blocks) * 8 < limit_mib:
            c = rt.ledger.read_control()
            if c.zone != "ok" or c.worker_bytes >= ratio * c.budget_bytes:
                return c.worker_bytes  # the governor has seen it: stop before pushing further
            blocks.append(_touch(8 * MiB))
            allocated = time.time()
            while rt.ledger.read_control().sample_time <= allocated:  # a reading that sees it
                time.sleep(0.02)
        return rt.ledger.read_control().worker_bytes

    if lease:
        with models.use(lease):
            reached = grow()
            _hold(hold)
            held = _held()
    else:
        reached = grow()
        _hold(hold)
        held = _held()
    _hold(then_hold)
    after, grown = _held(), len(blocks) * 8
    # Give the blocks back now: freed heap stays in the process until trimmed, and rmq's hygiene
    # does not trim when a model unload during the task made the process smaller than before it.
    blocks.clear()
    collect_and_trim()
    return {"pid": os.getpid(), "grown_mib": grown, "worker_bytes": reached, "held": held, "after": after}


@governed_task(memory="32MiB", name="mt.get_unknown")
def get_unknown() -> str:
    """Asks for a model nobody registered."""
    return repr(models.get("nope"))


@governed_task(memory="32MiB", name="mt.use_broken")
def use_broken() -> str:
    """Uses the model whose loader raises."""
    with models.use("mt.broken") as model:
        return repr(model)

