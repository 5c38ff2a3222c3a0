#!/usr/bin/env python3
"""The soak (docs/guarantees.md#r1): mixed tasks through governed workers while pool processes are SIGKILLed at random.

Sends ``--tasks`` mixed governed tasks (``tests/integration/soakapp.py``: no-ops, short sleeps, small
allocations, a few longer sleeps and tasks that defer themselves once) to ``--workers`` real
``celery worker`` subprocesses (prefork, ``--concurrency`` each) while a killer thread SIGKILLs a
random pool process every 0.5-1 s. At the end it checks, per task id:

- the result backend holds a terminal state (``SUCCESS`` / ``FAILURE``); otherwise the task is LOST;
- no run whose body finished had started after the task's SUCCESS was stored (the backend keeps the
  first SUCCESS, so its ``date_done`` is the first success): such a run is a DUPLICATE success;
- how often the body started (``soak:starts:<id>``) and finished (``soak:done:<id>``). A body that
  finished twice, the first run killed between the body's end and the result store, is at-least-once
  delivery (reported, not a duplicate: the task succeeded once).

Prints the counts (succeeded, failed by type, lost, duplicates, kills, redeliveries) and exits 1 on any
lost task or duplicate success.

Usage: scripts/soak.py [--tasks 10000] [--workers 2] [--concurrency 4] [--seed 1] [--deadline 900]
Redis: RMQ_SOAK_REDIS_URL, else a private ``redis-server`` on a free port (the test suite flushes the
shared server's databases at any time), else redis://127.0.0.1:6379/13.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.join(ROOT, "tests", "integration")
for _p in (ROOT, TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis as redis_lib  # noqa: E402

from rmq.testing import redis as testing_redis  # noqa: E402
from rmq.testing.worker import WorkerProcess  # noqa: E402

TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")
META = "celery-task-meta-"


def private_redis(fallback: str = "redis://127.0.0.1:6379/13") -> contextlib.AbstractContextManager[str]:
    """A private ``redis-server`` on a free port (stopped by PID), else ``fallback``."""
    return testing_redis.private_redis(fallback)


class Killer(threading.Thread):
    """SIGKILLs a random pool process of a random worker every ``low``-``high`` seconds."""

    def __init__(self, workers: list[WorkerProcess], low: float, high: float, rng: random.Random) -> None:
        super().__init__(daemon=True, name="soak-killer")
        self.workers, self.low, self.high, self.rng = workers, low, high, rng
        self.kills = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.rng.uniform(self.low, self.high)):
            w = self.rng.choice(self.workers)
            pids = w.pool_pids()
            if not pids:
                continue
            pid = self.rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def mixed_plan(n: int, rng: random.Random) -> list[tuple[str, tuple]]:
    """``n`` (task name, args): 40 % no-ops, 30 % short sleeps, 25 % allocations, 3 % longer sleeps,
    2 % deferrals."""
    plan = []
    for _ in range(n):
        x = rng.random()
        if x < 0.40:
            plan.append(("soak.noop", ()))
        elif x < 0.70:
            plan.append(("soak.sleep", (round(rng.uniform(0.005, 0.05), 3),)))
        elif x < 0.95:
            plan.append(("soak.alloc", (rng.randint(1, 16),)))
        elif x < 0.98:
            plan.append(("soak.sleep", (round(rng.uniform(0.2, 0.5), 3),)))
        else:
            plan.append(("soak.defer_once", (0.3,)))
    return plan


@dataclass
class SoakResult:
    """What a soak found. ``ok`` is False on any lost task or duplicate success."""

    tasks: int
    by_name: Counter = field(default_factory=Counter)
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)
    #: no terminal state in the result backend
    lost: list[str] = field(default_factory=list)
    #: a run whose body finished had started after the task's SUCCESS was stored: succeeded twice
    duplicates: list[str] = field(default_factory=list)
    #: the body finished more than once, but every earlier finished run died before storing its
    #: result (SIGKILLed between the body's end and the store): at-least-once, one success
    reran_after_kill: list[str] = field(default_factory=list)
    #: SUCCESS stored but no finished body recorded
    success_without_body: list[str] = field(default_factory=list)
    kills: int = 0
    starts: int = 0
    redeliveries: int = 0
    deferred_runs: int = 0
    send_s: float = 0.0
    makespan_s: float = 0.0
    worker_logs: list[str] = field(default_factory=list)
    diagnoses: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.success_without_body)

    def table(self) -> str:
        """The printed summary."""
        rows = [
            ("tasks sent", f"{self.tasks} ({', '.join(f'{n} {k[5:]}' for k, n in sorted(self.by_name.items()))})"),
            ("succeeded", str(self.succeeded)),
            ("failed (by type)", ", ".join(f"{n} {t}" for t, n in self.failed.most_common()) or "0"),
            ("LOST (no terminal state)", str(len(self.lost))),
            ("DUPLICATE successes", str(len(self.duplicates))),
            ("SUCCESS without a finished body", str(len(self.success_without_body))),
            ("pool processes SIGKILLed", str(self.kills)),
            ("task body starts", str(self.starts)),
            ("redelivered runs", str(self.redeliveries)),
            ("deferred runs (rmq_deferrals > 0)", str(self.deferred_runs)),
            ("bodies re-run after a kill between", str(len(self.reran_after_kill))),
            ("  body end and result store (at-least-once)", ""),
        ]
        if self.makespan_s:
            rows.append(("send time / makespan", f"{self.send_s:.1f} s / {self.makespan_s:.1f} s "
                                                 f"({self.tasks / self.makespan_s:.0f} tasks/s)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}".rstrip() for k, v in rows)


def start_workers(url: str, queue: str, n: int, concurrency: int, **rmq: object) -> list[WorkerProcess]:
    """``n`` governed ``-A soakapp`` workers on ``queue``, started (not yet answering)."""
    env = {"RMQ_BROKER_URL": url, "RMQ_RESULT_BACKEND": url, "RMQ_APP_QUEUE": queue, "SOAK_MODE": "rmq",
           "PYTHONPATH": os.pathsep.join([TESTS_DIR, ROOT])}
    env.update({f"RMQ_{k.upper()}": str(v) for k, v in rmq.items()})
    workers = []
    for i in range(n):
        w = WorkerProcess(app="soakapp", env=env, queues=[queue], concurrency=concurrency, cwd=ROOT,
                          loglevel=os.environ.get("SOAK_LOGLEVEL", "WARNING"),
                          hostname=f"soak{i}-{uuid.uuid4().hex[:6]}@%h")
        workers.append(w.start())
    return workers


def client_app(url: str, queue: str) -> Any:
    """A client of the reference app on ``url`` whose default queue is ``queue``."""
    import soakapp  # noqa: F401  (registers the soak.* shared tasks)

    from workers.app import make_app

    return make_app(broker=url, backend=url, queue=queue)


def _started_after_success(starts: list[list[str]], done: list[tuple[float, int]], success_at: float) -> bool:
    """Whether a run whose body finished had started after the task's first SUCCESS was stored.

    The backend never overwrites SUCCESS, so the stored ``date_done`` is the first success. A
    finished run that started before it is at-least-once delivery (that run was killed before it
    stored its result); one that started after it ran a task that had already succeeded.
    """
    for t_done, pid in done:
        begun = [float(r[0]) for r in starts if int(r[1]) == pid and float(r[0]) <= t_done]
        if begun and max(begun) > success_at:
            return True
    return False


def _date(meta: dict) -> float:
    return datetime.fromisoformat(meta["date_done"]).timestamp()


def collect(client: redis_lib.Redis, ids: list[str], result: SoakResult) -> None:
    """Fill ``result`` from the result backend and the runs the tasks recorded."""
    chunk = 1000
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        metas = client.mget([META + t for t in part])
        pipe = client.pipeline(transaction=False)
        for t in part:
            pipe.lrange(f"soak:starts:{t}", 0, -1)
            pipe.lrange(f"soak:done:{t}", 0, -1)
        marks = pipe.execute()
        for j, (tid, raw) in enumerate(zip(part, metas, strict=True)):
            starts = [r.decode().split("|") for r in marks[2 * j]]
            done = sorted((float(t), int(p)) for t, p in (r.decode().split("|") for r in marks[2 * j + 1]))
            meta = json.loads(raw) if raw else {"status": "PENDING"}
            status = meta["status"]
            result.starts += len(starts)
            result.redeliveries += sum(1 for r in starts if r[2] == "1")
            result.deferred_runs += sum(1 for r in starts if int(r[4]) > 0)
            if len(done) > 1:
                success_at = _date(meta) if status == "SUCCESS" else float("inf")
                if _started_after_success(starts, done, success_at):
                    result.duplicates.append(tid)
                else:
                    result.reran_after_kill.append(tid)
            if status == "SUCCESS":
                result.succeeded += 1
                if not done:
                    result.success_without_body.append(tid)
            elif status in TERMINAL:
                result.failed[(meta.get("result") or {}).get("exc_type", status)] += 1
            else:
                result.lost.append(tid)


def diagnose(client: redis_lib.Redis, queue: str, task_id: str) -> str:
    """Where a task is: its stored state, its runs, and the broker lists or hash holding it."""
    meta = client.get(META + task_id)
    runs = [r.decode() for r in client.lrange(f"soak:starts:{task_id}", 0, -1)]
    done = [r.decode() for r in client.lrange(f"soak:done:{task_id}", 0, -1)]
    where = []
    for key in [queue, *(f"{queue}:{p}" for p in range(1, 10))]:
        for i, raw in enumerate(client.lrange(key, 0, -1)):
            if task_id.encode() in raw:
                where.append(f"{key}[{i}]")
    for tag, raw in client.hscan_iter("unacked"):
        if task_id.encode() in raw:
            score = client.zscore("unacked_index", tag)
            age = f"{time.time() - score:.1f} s old" if score else "not indexed"
            where.append(f"unacked[{tag.decode()}] ({age})")
    lost = client.get(f"rmq:lost:{task_id}")
    return (f"{task_id}: state {json.loads(meta)['status'] if meta else 'none'}, runs {runs}, finished {done}, "
            f"lost count {lost}, in broker: {where or 'nowhere'}")


def run_soak(url: str, tasks: int = 10_000, workers: int = 2, concurrency: int = 4, seed: int = 1,
             kill_every: tuple[float, float] = (0.5, 1.0), deadline_s: float = 900.0, stall_s: float = 90.0,
             kill: bool = True, progress: bool = False, **rmq: object) -> SoakResult:
    """Run one soak against the Redis at ``url`` (broker and backend); see the module docstring."""
    rng = random.Random(seed)
    queue = f"soak.{uuid.uuid4().hex[:8]}"
    plan = mixed_plan(tasks, rng)
    result = SoakResult(tasks, by_name=Counter(name for name, _ in plan))
    client = redis_lib.Redis.from_url(url)
    app = client_app(url, queue)
    procs = start_workers(url, queue, workers, concurrency, **rmq)
    killer: Killer | None = None
    try:
        for w in procs:
            w.wait_ready(app, timeout=90)
        killer = Killer(procs, *kill_every, rng=random.Random(seed + 1))
        t0 = time.monotonic()
        if kill:
            killer.start()
        ids = [app.tasks[name].apply_async(args).id for name, args in plan]
        result.send_s = time.monotonic() - t0
        end = t0 + deadline_s
        pending = list(ids)
        last_note = 0.0
        last_change = time.monotonic()
        while pending and time.monotonic() < end:
            metas = []
            for i in range(0, len(pending), 2000):
                metas += client.mget([META + t for t in pending[i:i + 2000]])
            before = len(pending)
            pending = [t for t, raw in zip(pending, metas, strict=True)
                       if not raw or json.loads(raw)["status"] not in TERMINAL]
            if len(pending) != before:
                last_change = time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                break  # nothing ended for stall_s: what is left is lost
            for w in procs:
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.node_name} died:\n{w.log()[-3000:]}")
            if progress and time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                print(f"  {time.monotonic() - t0:5.0f} s: {tasks - len(pending)}/{tasks} terminal, "
                      f"{killer.kills} kills", flush=True)
            if pending:
                time.sleep(0.5)
        result.makespan_s = time.monotonic() - t0
        killer.stop()
        result.kills = killer.kills
        collect(client, ids, result)
        odd = result.lost[:5] + result.duplicates[:5] + result.success_without_body[:5]
        result.diagnoses = [diagnose(client, queue, t) for t in odd]
        result.worker_logs = [w.log() for w in procs]
    finally:
        if killer is not None:
            killer.stop()
        for w in procs:
            kept = w.finish()
            if kept:
                print(f"  worker log kept: {kept}")
        app.close()
        client.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds before a task counts as lost")
    args = parser.parse_args()
    url = os.environ.get("RMQ_SOAK_REDIS_URL")
    with contextlib.nullcontext(url) if url else private_redis() as url:
        print(f"R1 soak: {args.tasks} mixed tasks, {args.workers} governed workers x {args.concurrency} "
              f"pool processes, a random pool process SIGKILLed every 0.5-1 s; Redis {url}", flush=True)
        r = run_soak(url, args.tasks, args.workers, args.concurrency, args.seed, deadline_s=args.deadline,
                     progress=True)
    print(r.table())
    for line in r.diagnoses:
        print(f"  {line}")
    print("PASS: every task reached one terminal state, none succeeded twice" if r.ok else "FAIL")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
