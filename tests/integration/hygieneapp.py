"""Tasks for the memory hygiene acceptance tests (docs/design.md#hygiene): fragmenting and leaking bodies.

Every task reports its pid, RSS at the end of its body and start/end times, and (when given a
``runs_key``) appends one JSON line per run to that Redis list, so a test can prove that no task
ran twice (a process lost mid-task would be redelivered and run again).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rmq import governed_task
from rmq.core.runtime import current
from rmq.memory.hygiene import rss_bytes
from workers.app import make_app

app = make_app()
app.set_current()

MiB = 1 << 20
LEAKED: list[bytearray] = []  # what hy.leak keeps for good, per pool process
SURVIVORS: list[bytes] = []  # a bounded cache: replaced by each fragmenting run


def fragment(total_bytes: int, keep_every: int = 256) -> None:
    """About ``total_bytes`` of small objects in reference cycles; 1 in ``keep_every`` payloads
    survive in ``SURVIVORS`` until the next run. Once this returns, the rest is garbage only the
    cyclic gc frees, spread over a heap the survivors keep fragmented."""
    size = i = 0
    nodes = []
    kept = []
    while size < total_bytes:
        payload = bytes(600 + (i % 7) * 100)  # > 512 B: glibc malloc, not pymalloc arenas
        node: dict[str, Any] = {"i": i, "payload": payload, "tags": [str(i), i * 1.5]}
        node["self"] = node  # a cycle: only gc.collect frees it
        nodes.append(node)
        if i % keep_every == 0:
            kept.append(payload)
        size += len(payload) + 400
        i += 1
    SURVIVORS[:] = kept


def _report(started: float, runs_key: str | None, **extra: Any) -> dict[str, Any]:
    out = {"pid": os.getpid(), "rss": rss_bytes(), "started": started, "ended": time.time(), **extra}
    rt = current()
    if runs_key and rt is not None:
        rt.redis().rpush(runs_key, json.dumps(out))
    return out


@governed_task(name="hy.fragment", memory="160MiB")
def fragment_task(mib: int = 50, runs_key: str | None = None) -> dict[str, Any]:
    """Leaves ``mib`` MiB of fragmented garbage behind; hygiene on (the default)."""
    started = time.time()
    fragment(mib * MiB)
    return _report(started, runs_key)


@governed_task(name="hy.fragment_raw", memory="160MiB", hygiene=False)
def fragment_raw(mib: int = 50, runs_key: str | None = None) -> dict[str, Any]:
    """The same body with ``hygiene=False``."""
    started = time.time()
    fragment(mib * MiB)
    return _report(started, runs_key)


@governed_task(name="hy.leak", memory="64MiB")
def leak(mib: int = 30, runs_key: str | None = None) -> dict[str, Any]:
    """Really leaks ``mib`` MiB per run (kept in a module list, every page written)."""
    started = time.time()
    LEAKED.append(bytearray(b"\x01") * (mib * MiB))
    time.sleep(0.05)  # long enough for an outside sampler to see the process at its peak
    return _report(started, runs_key, leaked_bytes=sum(map(len, LEAKED)))


@governed_task(name="hy.noop", memory="16MiB")
def noop(runs_key: str | None = None) -> dict[str, Any]:
    """Does nothing; reports its pid."""
    return _report(time.time(), runs_key)
