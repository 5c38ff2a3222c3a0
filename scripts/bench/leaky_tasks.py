"""The leaky workload of scripts/bench/leaky.py, as a Celery app (``celery -A leaky_tasks worker``).

Each task really leaks ``leak_mib`` MiB (kept in a module list, pages written) and creates
``frag_mib`` MiB of small objects in reference cycles, of which 1 in 256 stay in a bounded
cache until the next run replaces them (a memo, a connection's buffers): once it returns, the
rest is garbage that only the cyclic gc frees, spread over a heap that the survivors keep
fragmented, so that glibc only gives it back on ``malloc_trim``.

``LEAKY_MODE=plain`` builds a plain Celery app (no rmq imported; the bench passes
``worker_max_memory_per_child``); ``LEAKY_MODE=rmq`` builds the same app with ``rmq.install``
and adds the governed variant. ``LEAKY_BROKER`` is broker and result backend (scripts/bench/leaky.py
passes its private redis-server; the default, db 0 of the local Redis, is one tests never flush);
``LEAKY_QUEUE`` the queue. ``LEAKY_CONF`` is JSON merged into the conf.

``python leaky_tasks.py --frag-check {none,gc,trim} [--runs 20]`` runs the fragmenting body
in this process and prints RSS figures as JSON (no broker needed).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from celery import Celery

MiB = 1 << 20
MODE = os.environ.get("LEAKY_MODE", "plain")
BROKER = os.environ.get("LEAKY_BROKER", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("LEAKY_QUEUE", "bench.leaky")

LEAKED: list[bytearray] = []
SURVIVORS: list[bytes] = []


def rss_bytes() -> int:
    """This process's RSS from /proc/self/statm."""
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        return int(os.read(fd, 128).split()[1]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        os.close(fd)


def fragment(total_bytes: int, keep_every: int = 256) -> int:
    """Create about ``total_bytes`` of small objects in reference cycles; keep 1 in ``keep_every``.

    The kept ones replace the previous run's in ``SURVIVORS`` (a bounded cache, not a leak).
    """
    size = i = 0
    nodes = []
    kept = []
    while size < total_bytes:
        payload = bytes(600 + (i % 7) * 100)  # > 512 B: glibc malloc, not pymalloc arenas
        node: dict[str, object] = {"i": i, "payload": payload, "tags": [str(i), i * 1.5]}
        node["self"] = node  # a cycle: only gc.collect frees it
        nodes.append(node)
        if i % keep_every == 0:
            kept.append(payload)
        size += len(payload) + 400
        i += 1
    SURVIVORS[:] = kept
    return i


def work(leak_mib: int, frag_mib: int) -> dict[str, float]:
    """The task body: leak, fragment, report this process's pid, RSS and start/end times."""
    started = time.time()
    if leak_mib:
        LEAKED.append(bytearray(b"\x01") * (leak_mib * MiB))
    fragment(frag_mib * MiB)
    return {"pid": os.getpid(), "rss": rss_bytes(), "started": started, "ended": time.time()}


app = Celery("leaky_tasks", broker=BROKER, backend=BROKER, set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
app.conf.update(json.loads(os.environ.get("LEAKY_CONF", "{}")))


@app.task(name="bench.leaky.plain")
def leaky_plain(leak_mib: int, frag_mib: int) -> dict[str, float]:
    """Plain Celery task."""
    return work(leak_mib, frag_mib)


if MODE == "rmq":
    import rmq
    from rmq import governed_task

    rmq.install(app)

    @governed_task(name="bench.leaky.governed", memory="160MiB", hygiene=True)
    def leaky_governed(leak_mib: int, frag_mib: int) -> dict[str, float]:
        """The same body, governed (hygiene and leak detection after each run)."""
        return work(leak_mib, frag_mib)


def _frag_check(mode: str, runs: int, frag_mib: int) -> dict[str, object]:
    from rmq.memory.trim import malloc_trim

    gc.collect()
    malloc_trim()
    start = rss_bytes()
    rows = []
    for _ in range(runs):
        before = rss_bytes()
        fragment(frag_mib * MiB)
        after_task = rss_bytes()
        if mode in ("gc", "trim"):
            gc.collect()
        after_gc = rss_bytes()
        if mode == "trim":
            malloc_trim()
        rows.append({"before": before, "after_task": after_task, "after_gc": after_gc, "after": rss_bytes()})
    return {"mode": mode, "start": start, "runs": rows, "kept": sum(map(len, SURVIVORS))}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--frag-check", choices=("none", "gc", "trim"), required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--frag-mib", type=int, default=50)
    a = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print(json.dumps(_frag_check(a.frag_check, a.runs, a.frag_mib)))
