"""Task app of the memory benches (``pressure.py``, ``reaction.py``); started as ``-A benchapp``.

``BENCH_MODE`` picks the app the worker runs:

- ``rmq`` (default): the reference app (``workers.app.make_app``) with rmq installed, and the
  tasks below as governed tasks.
- ``plain``: a plain Celery app, no rmq at all, same broker settings as the reference app
  (prefetch multiplier 1), the same task functions as plain ``app.task``s, Celery's defaults
  (early ack: a task whose process dies ends as ``FAILURE`` with ``WorkerLostError``).
- ``careful``: plain Celery as a careful user sets it up: ``task_acks_late`` and
  ``task_reject_on_worker_lost`` (a task whose process dies is redelivered).

Every task records each start in Redis (``bench:starts:<task id>``, JSON ``{"pid", "t"}``
with ``time.time()``) so that the benches see re-runs and redeliveries of the same task id.
"""

from __future__ import annotations

import json
import os
import time

import redis as redis_lib

MiB = 1 << 20
#: Redis key layout rmq uses (separator, priority lists); the plain apps and the bench clients use it
#: too, so that all of them read each other's bindings. Crash recovery options stay Celery's defaults.
KEY_LAYOUT = {"sep": ":", "priority_steps": list(range(10)), "queue_order_strategy": "priority"}
MODE = os.environ.get("BENCH_MODE", "rmq")
BROKER = os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/12")

if MODE == "rmq":
    from rmq import governed_task
    from workers.app import make_app

    app = make_app()
else:
    from celery import Celery

    app = Celery("benchapp", broker=BROKER, backend=os.environ.get("RMQ_RESULT_BACKEND", BROKER))
    app.conf.update(
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_acks_late=MODE == "careful",
        task_reject_on_worker_lost=MODE == "careful",
        broker_transport_options=dict(KEY_LAYOUT),
    )
app.set_current()

_redis: redis_lib.Redis | None = None
_redis_pid = -1


def _client() -> redis_lib.Redis:
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis, _redis_pid = redis_lib.Redis.from_url(BROKER), os.getpid()
    return _redis


def record_start(task_id: str | None) -> float:
    """Note this run's start (pid, wall clock) under the task id; returns the time."""
    now = time.time()
    if task_id:
        key = f"bench:starts:{task_id}"
        pipe = _client().pipeline()
        pipe.rpush(key, json.dumps({"pid": os.getpid(), "t": now}))
        pipe.expire(key, 3600)
        pipe.execute()
    return now


def _trace(task_id: str | None, event: str) -> None:
    if task_id:
        key = f"bench:trace:{task_id}"
        pipe = _client().pipeline()
        pipe.rpush(key, json.dumps([event, time.time()]))
        pipe.expire(key, 3600)
        pipe.execute()


def _touch(n: int) -> bytearray:
    block = bytearray(n)
    for i in range(0, n, 4096):
        block[i] = 1
    return block


def touch_work(task_id: str | None, mib: int, hold_s: float) -> dict:
    """Touch ``mib`` MiB for ``hold_s`` seconds; the P2 workload.

    ``ended``: the memory is still held; ``freed``: it went back (unmapping 300 MiB takes 0.1-0.3 s).
    """
    started = record_start(task_id)
    block = _touch(mib * MiB)
    time.sleep(hold_s)
    ended = time.time()  # before the memory goes back
    del block
    return {"pid": os.getpid(), "started": started, "ended": ended, "freed": time.time()}


class KillLineWatch:
    """Notes (once per run) when the worker's memory, as the governor measures it, crosses the kill line.

    The estimate is the governor's last published reading plus how much this process's RSS grew since
    that reading (the only thing changing). The recorded time is the START of the allocation step that
    crosses (conservative: the crossing happens somewhere during that step): either a step whose
    result is over the line, or, when the previous estimate plus one step reaches the line, the
    next step, recorded before it allocates (the governor may kill during that very step).
    Records go to ``bench:cross:<task id>`` as JSON ``{"pid", "t", "bytes"}``.
    """

    def __init__(self, task_id: str | None, slot: int, step_bytes: int) -> None:
        from rmq.core.runtime import current

        self.rt = current()
        self.task_id, self.slot, self.step_bytes = task_id, slot, step_bytes
        self.done = self.rt is None or not task_id or slot < 0
        self.next_crosses = False

    def before_step(self, t_step: float) -> None:
        if not self.done and self.next_crosses:
            self._record(t_step, -1)

    def after_step(self, t_step: float) -> None:
        if self.done:
            return
        from rmq.core.selfmem import own_rss_bytes

        assert self.rt is not None
        rss, ledger = own_rss_bytes(), self.rt.ledger
        with ledger.locked():  # the governor publishes its reading and each entry's usage together
            control = ledger.read_control()
            entry = next((e for e in ledger.entries_unlocked() if e.slot == self.slot), None)
        if entry is None:
            return
        estimate = control.worker_bytes + rss - (entry.start_rss + entry.used_bytes)
        line = self.rt.config.kill_ratio * control.budget_bytes
        if estimate >= line:
            self._record(t_step, estimate)
        elif estimate + self.step_bytes >= line:
            self.next_crosses = True

    def _record(self, t: float, estimate: int) -> None:
        self.done = True
        key = f"bench:cross:{self.task_id}"
        pipe = _client().pipeline()
        pipe.rpush(key, json.dumps({"pid": os.getpid(), "t": t, "bytes": estimate}))
        pipe.expire(key, 3600)
        pipe.execute()


def runaway_work(task_id: str | None, rate_mib_s: float, step_mib: int, limit_s: float, slot: int = -1) -> dict:
    """Allocate ``step_mib`` MiB at a time at a steady ``rate_mib_s`` until killed (or ``limit_s``)."""
    started = record_start(task_id)
    watch = KillLineWatch(task_id, slot, step_mib * MiB)
    blocks = []
    step_s = step_mib / rate_mib_s
    n = 0
    while time.time() - started < limit_s:
        t_step = time.time()
        watch.before_step(t_step)
        blocks.append(_touch(step_mib * MiB))
        watch.after_step(t_step)
        n += 1
        delay = started + n * step_s - time.time()
        if delay > 0:
            time.sleep(delay)
    return {"pid": os.getpid(), "allocated_mib": n * step_mib}


def sleep_work(task_id: str | None, seconds: float) -> dict:
    """Sleep; the victim of outside SIGKILLs."""
    started = record_start(task_id)
    time.sleep(seconds)
    return {"pid": os.getpid(), "started": started}


if MODE == "rmq":

    @governed_task(memory="400MiB", name="bench.touch", bind=True)
    def touch(self, mib: int = 300, hold_s: float = 1.0) -> dict:
        """Declares 400 MiB, touches ``mib`` MiB for ``hold_s`` seconds."""
        return touch_work(self.request.id, mib, hold_s)

    @governed_task(memory="64MiB", name="bench.runaway", bind=True)
    def runaway(self, rate_mib_s: float = 200.0, step_mib: int = 2, limit_s: float = 30.0) -> dict:
        """Declares 64 MiB, then allocates without bound (a bug in a real task)."""
        ctx = self.rmq_context
        entry = ctx.state.get("admission") if ctx is not None else None
        return runaway_work(self.request.id, rate_mib_s, step_mib, limit_s, entry.slot if entry else -1)

    @governed_task(memory="32MiB", name="bench.sleep", bind=True)
    def sleep(self, seconds: float = 3.0) -> dict:
        """Sleeps ``seconds``."""
        return sleep_work(self.request.id, seconds)

else:

    @app.task(name="bench.touch", bind=True)
    def touch(self, mib: int = 300, hold_s: float = 1.0) -> dict:
        """The same workload as a plain Celery task."""
        return touch_work(self.request.id, mib, hold_s)

    @app.task(name="bench.sleep", bind=True)
    def sleep(self, seconds: float = 3.0) -> dict:
        """Sleeps ``seconds``."""
        return sleep_work(self.request.id, seconds)


def _experimental_fixes() -> None:
    """Opt-in patches of rmq that the bench reports measure (``BENCH_FIX=credit,...``); never on by default.

    ``credit``: rmq.memory.reservation.AdmissionGuard.exit, when it releases a reservation, takes the memory
    its process gave back since the governor's last sample off the published worker memory (under
    the ledger lock), so waiting admissions see the room at once instead of at the next sample.
    ``poll``: admission re-checks every 10 ms instead of 20 ms.
    ``trace``: no change of behaviour; records when each guard's enter/exit starts and ends
    (``bench:trace:<task id>``, JSON ``[event, time.time()]``), for pressure.py's breakdown.
    """
    fixes = set(filter(None, os.environ.get("BENCH_FIX", "").split(",")))
    if MODE != "rmq" or not fixes:
        return
    if "credit" in fixes:
        import struct

        from rmq.core.ledger_layout import fit, read_slot, write_slot
        from rmq.core.runtime import current
        from rmq.core.selfmem import own_rss_bytes
        from rmq.memory import reservation
        from rmq.memory.learning import learner

        worker_bytes_at = 24  # offset of worker_bytes in the ledger header (magic, generation, unload bytes)

        def exit_(self, ctx, failed: bool) -> None:  # type: ignore[no-untyped-def]
            rt = current()
            entry = ctx.state.pop("admission", None)
            if rt is None or entry is None:
                return
            ledger = rt.ledger
            rss_now = own_rss_bytes()
            peak = max(rss_now - entry.start_rss, 0)
            with ledger.locked():
                cur = read_slot(ledger._map, entry.slot)
                if cur is not None and cur.pid == entry.pid and cur.task_id == fit(entry.task_id, 48):
                    peak = max(peak, cur.peak_used_bytes)
                    write_slot(ledger._map, entry.slot, None)
                    freed = max(0, cur.start_rss + cur.used_bytes - rss_now)
                    if freed:
                        (published,) = struct.unpack_from("<q", ledger._map, worker_bytes_at)
                        struct.pack_into("<q", ledger._map, worker_bytes_at, max(0, published - freed))
            if not failed:
                learner(rt).observe(ctx.task_name, peak)

        reservation.AdmissionGuard.exit = exit_
    if "trace" in fixes:
        from rmq.celery.concerns import default_concerns

        def traced(cls: type, method: str) -> None:
            inner = getattr(cls, method)

            def wrapper(self, ctx, *args):  # type: ignore[no-untyped-def]
                _trace(ctx.task_id, f"{self.name}.{method}")
                try:
                    return inner(self, ctx, *args)
                finally:
                    _trace(ctx.task_id, f"{self.name}.{method}.done")

            setattr(cls, method, wrapper)

        for guard in default_concerns():
            traced(type(guard), "enter")
            traced(type(guard), "exit")
    if "poll" in fixes:
        from rmq.memory import reservation

        reservation._POLL_S = 0.01


_experimental_fixes()
