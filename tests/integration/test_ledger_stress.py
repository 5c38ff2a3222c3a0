"""Stress: threads of several processes admit and release against one real ledger.

Admission goes through the real judge (:func:`rmq.memory.reservation._try_once`); model loads
reserve with ``try_add``; a governor thread in the main process publishes readings and the
reservations' use and drops dead processes' reservations, as the real one does, while a checker
thread reads the table under the lock. The run lasts ``RMQ_STRESS_SECONDS`` (10 s by default; run
it for a minute with ``RMQ_STRESS_SECONDS=60``).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time

import pytest

from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger, Reserved
from rmq.memory.admission import Need, judge
from rmq.memory.reservation import _try_once

pytestmark = pytest.mark.integration

MiB = 1 << 20
WORKER = 100 * MiB  # the governor's reading: constant, so the reservations alone move the total
ADMIT_LINE = 1000 * MiB
PROCESSES = 4
TASK_THREADS = 3  # per process, beside one model thread (the watcher's model relief does the same)


def _control() -> Control:
    return Control(0, 0, WORKER, 1200 * MiB, ADMIT_LINE, WORKER, time.time(), "ok", 64, False)


def _pool_process(ledger: Ledger, seconds: float, results: multiprocessing.Queue) -> None:
    pid = os.getpid()
    counts = {"admitted": 0, "refused": 0, "lost": 0, "models": 0}
    lock = threading.Lock()

    def tasks(n: int) -> None:
        rng = random.Random(pid * 100 + n)
        deadline = time.monotonic() + seconds
        mine = {"admitted": 0, "refused": 0, "lost": 0}
        i = 0
        while time.monotonic() < deadline:
            i += 1
            size = rng.randint(10, 120) * MiB
            e = Entry(KIND_TASK, pid, size, task_id=f"{pid}-{n}-{i}", name="stress.task")
            if not _try_once(ledger, e, Need(size), None).admitted:
                mine["refused"] += 1
                continue
            mine["admitted"] += 1
            time.sleep(rng.random() * 0.002)
            if ledger.release(e) is None:  # overwritten or dropped by another writer
                mine["lost"] += 1
        with lock:
            for k, v in mine.items():
                counts[k] += v

    def models() -> None:
        rng = random.Random(pid)
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            i += 1
            size = rng.randint(20, 80) * MiB
            e = Entry(KIND_MODEL, pid, size, task_id=f"model:{pid}-{i}", name=f"model:{pid}-{i}")

            def fits(reserved: Reserved, size: int = size) -> bool:
                w, idle, line, budget, slots = ledger.admission_readings()
                return judge(Need(size), reserved, w, idle, line, budget, slots).admitted

            if ledger.try_add(e, fits):
                time.sleep(rng.random() * 0.005)
                with lock:
                    counts["models"] += 1
                    counts["lost"] += ledger.remove(e) is None
            else:
                time.sleep(0.001)

    threads = [threading.Thread(target=tasks, args=(n,)) for n in range(TASK_THREADS)]
    threads.append(threading.Thread(target=models))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(counts)


def test_many_threads_and_processes_never_pass_the_admit_line_and_lose_nothing(tmp_path) -> None:
    seconds = float(os.environ.get("RMQ_STRESS_SECONDS", "10"))
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    ledger.publish(_control(), [])
    ctx = multiprocessing.get_context("fork")  # pool processes are forked from the main process
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_pool_process, args=(ledger, seconds, results)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    stop = threading.Event()
    seen = {"max_reserved": 0, "max_reservations": 0, "checks": 0, "over": 0, "ticks": 0}

    def governor() -> None:  # the main process's threads share one handle, as in a worker
        while not stop.is_set():
            ledger.release_dead(lambda pid: True)
            entries = ledger.entries()
            ledger.publish(_control(), [(e, 0) for e in entries])
            seen["ticks"] += 1
            time.sleep(0.002)

    def checker() -> None:  # a stats request or a scrape, reading under the lock
        while not stop.is_set():
            with ledger.locked():
                entries = ledger.entries_unlocked()
            reserved = sum(e.memory_bytes for e in entries)
            seen["checks"] += 1
            seen["over"] += WORKER + reserved > ADMIT_LINE
            seen["max_reserved"] = max(seen["max_reserved"], reserved)
            seen["max_reservations"] = max(seen["max_reservations"], len(entries))
            time.sleep(0.0005)

    helpers = [threading.Thread(target=governor), threading.Thread(target=checker)]
    for t in helpers:
        t.start()
    try:
        counts = [results.get(timeout=seconds + 60) for _ in procs]
    finally:
        stop.set()
        for t in helpers:
            t.join(10)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    print(f"\n[ledger stress] {seconds:.0f} s, {PROCESSES} processes x ({TASK_THREADS} task threads + 1 model thread):"
          f" {total['admitted']} tasks admitted, {total['refused']} refused, {total['models']} model loads,"
          f" {total['lost']} lost; {seen['checks']} checks, {seen['ticks']} governor ticks; at most"
          f" {seen['max_reservations']} reservations holding {seen['max_reserved'] // MiB} MiB"
          f" (room {(ADMIT_LINE - WORKER) // MiB} MiB), {seen['over']} checks over the admit line")
    # Then the reservations never passed the admit line, none was lost, and nothing is left behind
    assert seen["over"] == 0
    assert total["lost"] == 0
    assert ledger.entries() == []
    # and the run was a real contest: admissions were refused for room, and the room was nearly used
    assert total["admitted"] > 1000 and total["refused"] > 0
    assert seen["max_reserved"] > (ADMIT_LINE - WORKER) * 0.8
    ledger.close()
