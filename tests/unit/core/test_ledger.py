"""The reservation ledger shared by a worker's processes, and its control block.

The SIGKILL tests start real processes: the point of the ledger is that a holder killed by
the kernel cannot leave it locked or leave its reservations behind.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from rmq.core import ledger as ledger_module
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger, LedgerFull, Reserved

MiB = 1024**2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def ledger(tmp_path) -> Iterator[Ledger]:
    led = Ledger(str(tmp_path / "rt"), create=True)
    yield led
    led.close()


def entry(pid: int = 4242, memory: int = 100 * MiB, task_id: str = "t1", **kw) -> Entry:
    return Entry(KIND_TASK, pid, memory, task_id=task_id, name=kw.pop("name", "media.transcribe"), **kw)


def spawn(code: str, *args: str) -> subprocess.Popen:
    """A fresh Python process running ``code`` with the repository on its path."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()


def lock_is_free(lock_path: str) -> bool:
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


# --- the table ---------------------------------------------------------------------------------------
def test_a_new_ledger_is_empty(ledger: Ledger) -> None:
    assert ledger.entries() == []
    assert os.path.exists(ledger.lock_path)


def test_add_and_read_back_every_field(ledger: Ledger) -> None:
    e = entry(cpu_slots=2, disk_bytes=3 * MiB, start_rss=50 * MiB, started=123.5)
    with ledger.locked():
        added = ledger.add_unlocked(e)
    assert added.slot == 0
    [got] = ledger.entries()
    assert got == Entry(KIND_TASK, 4242, 100 * MiB, 2, 3 * MiB, "t1", "media.transcribe", 123.5, 0, 50 * MiB, 0, 0)
    assert got.as_dict() == {
        "pid": 4242, "task_id": "t1", "task_name": "media.transcribe", "kind": "task",
        "memory_bytes": 100 * MiB, "cpu_slots": 2, "disk_bytes": 3 * MiB, "used_bytes": 0,
    }


def test_add_stamps_the_start_time(ledger: Ledger) -> None:
    before = time.time()
    with ledger.locked():
        ledger.add_unlocked(entry())
    assert before <= ledger.entries()[0].started <= time.time()


def test_models_are_reported_as_models(ledger: Ledger) -> None:
    with ledger.locked():
        ledger.add_unlocked(Entry(KIND_MODEL, 1, 2 * MiB, task_id="whisper", name="whisper"))
    assert ledger.entries()[0].as_dict()["kind"] == "model"


def test_another_handle_sees_the_same_table(ledger: Ledger) -> None:
    other = Ledger(ledger.directory)  # a pool process opens without create
    try:
        assert ledger.try_add(entry(), lambda entries: True)
        assert [e.task_id for e in other.entries()] == ["t1"]
    finally:
        other.close()


def test_remove_only_the_matching_reservation(ledger: Ledger) -> None:
    a = entry(task_id="a")
    b = entry(task_id="b")
    assert ledger.try_add(a, lambda _: True) and ledger.try_add(b, lambda _: True)
    assert ledger.remove(a).task_id == "a"
    assert [e.task_id for e in ledger.entries()] == ["b"]
    assert ledger.remove(a) is None  # already gone: a no-op
    # a stale handle for a slot now reused by someone else does not remove the newcomer
    c = entry(task_id="c")
    assert ledger.try_add(c, lambda _: True)
    assert c.slot == a.slot
    ledger.remove(a)
    assert sorted(e.task_id for e in ledger.entries()) == ["b", "c"]


def test_slots_are_reused(ledger: Ledger) -> None:
    first = entry(task_id="x")
    ledger.try_add(first, lambda _: True)
    ledger.remove(first)
    second = entry(task_id="y")
    ledger.try_add(second, lambda _: True)
    assert second.slot == first.slot == 0


def test_try_add_consults_fits_with_what_the_current_entries_hold(ledger: Ledger) -> None:
    limit = 250 * MiB

    def fits(reserved: Reserved) -> bool:
        return reserved.unused_bytes + 100 * MiB <= limit

    seen: list[int] = []
    assert ledger.try_add(entry(task_id="1"), lambda r: seen.append(r.reservations) is None and fits(r))
    assert ledger.try_add(entry(task_id="2"), fits)
    assert not ledger.try_add(entry(task_id="3"), fits)
    assert seen == [0]
    assert [e.task_id for e in ledger.entries()] == ["1", "2"]


def test_reserved_sums_read_from_the_table_match_the_entries(ledger: Ledger) -> None:
    ledger.try_add(Entry(KIND_TASK, 11, 300 * MiB, 2, 5 * MiB, task_id="t1", name="a"), lambda _: True)
    ledger.try_add(Entry(KIND_TASK, 12, 100 * MiB, 0, 0, task_id="t2", name="b"), lambda _: True)
    ledger.try_add(Entry(KIND_MODEL, 13, 120 * MiB, task_id="m", name="m"), lambda _: True)
    stored = ledger.entries()
    # the governor's readings: a task using part of its declaration, a model whose use fell from its peak
    ledger.set_usage([(stored[0], 200 * MiB), (stored[2], 100 * MiB)])
    ledger.set_usage([(stored[2], 40 * MiB)])
    with ledger.locked():
        reserved = ledger.reserved_unlocked()
    assert reserved == Reserved.of(ledger.entries())
    assert reserved == Reserved(reservations=3, unused_bytes=100 * MiB + 100 * MiB + 20 * MiB, cpu_slots=2,
                                disk_bytes=5 * MiB, model_bytes=120 * MiB)


def test_full_ledger_raises(ledger: Ledger) -> None:
    with ledger.locked():
        for i in range(128):
            ledger.add_unlocked(entry(task_id=str(i)))
        with pytest.raises(LedgerFull):
            ledger.add_unlocked(entry(task_id="one too many"))


def test_update_rewrites_in_place(ledger: Ledger) -> None:
    e = entry()
    ledger.try_add(e, lambda _: True)
    e.memory_bytes = 300 * MiB
    ledger.update(e)
    assert ledger.entries()[0].memory_bytes == 300 * MiB
    stranger = entry(task_id="someone-else")
    stranger.slot = e.slot
    stranger.memory_bytes = 1
    ledger.update(stranger)
    assert ledger.entries()[0].memory_bytes == 300 * MiB


def test_long_names_are_truncated_not_refused(ledger: Ledger) -> None:
    e = entry(name="n" * 200)
    ledger.try_add(e, lambda _: True)
    assert ledger.entries()[0].name == "n" * 96


def test_a_reservation_with_a_long_task_id_can_be_removed(ledger: Ledger) -> None:
    e = entry(task_id="pipeline-2024-06-01-" + "x" * 60)  # Celery allows any task id string
    ledger.try_add(e, lambda _: True)
    ledger.remove(e)
    assert ledger.entries() == []


def test_set_usage_records_usage_and_peak(ledger: Ledger) -> None:
    e = entry()
    ledger.try_add(e, lambda _: True)
    ledger.set_usage([(e, 40 * MiB)])
    ledger.set_usage([(e, 70 * MiB)])
    ledger.set_usage([(e, 20 * MiB)])
    [got] = ledger.entries()
    assert (got.used_bytes, got.peak_used_bytes) == (20 * MiB, 70 * MiB)
    assert got.unused_bytes == 80 * MiB


def test_remove_returns_the_governors_readings(ledger: Ledger) -> None:
    e = entry()
    ledger.try_add(e, lambda _: True)
    ledger.set_usage([(e, 70 * MiB)])
    ledger.set_usage([(e, 20 * MiB)])
    stored = ledger.remove(e)
    assert stored is not None and stored.peak_used_bytes == 70 * MiB and not ledger.entries()


def test_entries_and_free_slots_across_a_sparse_table(ledger: Ledger) -> None:
    added = [entry(task_id=f"t{i}") for i in range(10)]
    for e in added:
        ledger.try_add(e, lambda _: True)
    for e in added[::3]:  # free slots 0, 3, 6, 9
        ledger.remove(e)
    assert [e.slot for e in ledger.entries()] == [1, 2, 4, 5, 7, 8]
    newcomer = entry(task_id="new")
    ledger.try_add(newcomer, lambda _: True)
    assert newcomer.slot == 0  # the lowest free slot


def test_set_usage_ignores_gone_reservations(ledger: Ledger) -> None:
    e = entry()
    ledger.try_add(e, lambda _: True)
    ledger.remove(e)
    ledger.set_usage([(e, 40 * MiB)])
    assert ledger.entries() == []


def test_release_dead(ledger: Ledger) -> None:
    for pid, tid in ((10, "a"), (11, "b"), (10, "c")):
        ledger.try_add(entry(pid=pid, task_id=tid), lambda _: True)
    dropped = ledger.release_dead(lambda pid: pid != 10)
    assert sorted(e.task_id for e in dropped) == ["a", "c"]
    assert [e.task_id for e in ledger.entries()] == ["b"]
    assert ledger.release_dead(lambda pid: True) == []


# --- control block -----------------------------------------------------------------------------------
def test_control_block_round_trip(ledger: Ledger) -> None:
    c = Control(
        unload_generation=7, unload_bytes=123 * MiB, worker_bytes=900 * MiB, budget_bytes=2048 * MiB,
        admit_line_bytes=1740 * MiB, idle_bytes=80 * MiB, sample_time=1700000000.25, zone="pause",
        cpu_slots=4, paused=True,
    )
    ledger.write_control(c)
    assert ledger.read_control() == c
    other = Ledger(ledger.directory)
    try:
        assert other.read_control() == c
    finally:
        other.close()


@pytest.mark.parametrize("zone", ["ok", "unload", "pause", "kill"])
def test_every_zone_round_trips(ledger: Ledger, zone: str) -> None:
    c = Control(0, 0, 0, 1, 1, 0, 0.0, zone, 1, False)
    ledger.write_control(c)
    assert ledger.read_control().zone == zone


def test_a_fresh_control_block_reads_as_zeros(ledger: Ledger) -> None:
    c = ledger.read_control()
    assert (c.unload_generation, c.worker_bytes, c.zone, c.paused) == (0, 0, "ok", False)


def test_control_and_table_do_not_overlap(ledger: Ledger) -> None:
    ledger.try_add(entry(), lambda _: True)
    ledger.write_control(Control(2**63 - 1, -1, -1, -1, -1, -1, 1e300, "kill", -1, True))
    ledger.request_unload(2**62)
    [got] = ledger.entries()
    assert (got.pid, got.memory_bytes, got.task_id) == (4242, 100 * MiB, "t1")


def test_request_unload_bumps_a_generation(ledger: Ledger) -> None:
    assert ledger.read_unload_request() == (0, 0)
    ledger.request_unload(300 * MiB)
    ledger.request_unload(500 * MiB)
    assert ledger.read_unload_request() == (2, 500 * MiB)
    assert ledger.read_control().unload_generation == 0  # requests don't touch the governor's counter


# --- across real processes ---------------------------------------------------------------------------
HOLD_LOCK = """
    import sys, time
    from rmq.core.ledger import Entry, KIND_TASK, Ledger
    led = Ledger(sys.argv[1])
    with led.locked():
        led.add_unlocked(Entry(KIND_TASK, __import__("os").getpid(), 1 << 30, task_id="doomed", name="big"))
        print("locked", flush=True)
        time.sleep(60)
"""


def test_sigkilled_holder_releases_the_lock_and_its_reservation(ledger: Ledger) -> None:
    # Given a pool process that holds the ledger's lock and a reservation
    proc = spawn(HOLD_LOCK, ledger.directory)
    try:
        assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
        assert not lock_is_free(ledger.lock_path)  # it really holds it
        # When the kernel kills it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # Then the lock is free at once (flock dies with its holder)
        deadline = time.monotonic() + 2.0
        while not lock_is_free(ledger.lock_path):
            assert time.monotonic() < deadline, "the ledger lock stayed held after SIGKILL"
            time.sleep(0.01)
        with ledger.locked():
            entries = ledger.entries_unlocked()
        assert [(e.pid, e.task_id) for e in entries] == [(proc.pid, "doomed")]
        # and the governor drops the dead process's reservation
        dropped = ledger.release_dead(lambda pid: pid != proc.pid)
        assert [e.task_id for e in dropped] == ["doomed"]
        assert ledger.entries() == []
    finally:
        stop(proc)


def test_the_lock_held_by_a_stopped_process_is_given_up_on_within_the_timeout(ledger: Ledger) -> None:
    # Given a pool process that holds the ledger's lock and does not let it go (stopped by the kernel
    # at the pools' cap, say)
    proc = spawn(HOLD_LOCK, ledger.directory)
    try:
        assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
        os.kill(proc.pid, signal.SIGSTOP)
        # When the governor asks for the lock with a deadline: it is told no, once the deadline passed
        started = time.monotonic()
        with ledger.locked_within(0.05) as locked:
            waited = time.monotonic() - started
            assert locked is False
        assert 0.05 <= waited < 1.0
        with ledger.locked_within(0.0) as locked:  # no wait at all
            assert locked is False
        # and nothing of this process stays held: once the holder is gone, the lock is had at once
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with ledger.locked_within(2.0) as locked:
            assert locked is True
            assert not lock_is_free(ledger.lock_path)
        assert lock_is_free(ledger.lock_path)
        with ledger.locked():  # the blocking lock works as before
            pass
    finally:
        stop(proc)


ADDER = """
    import sys, time
    from rmq.core.ledger import Entry, KIND_TASK, Ledger
    led = Ledger(sys.argv[1])
    limit, attempts, tag = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    def fits(reserved):
        time.sleep(0.0005)  # widen the window between the check and the write
        return reserved.unused_bytes + 1 <= limit
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    ok = 0
    for i in range(attempts):
        ok += led.try_add(Entry(KIND_TASK, 1, 1, task_id=f"{tag}{i}", name=tag), fits)
    print(ok, flush=True)
"""


def test_concurrent_adders_never_exceed_the_limit(ledger: Ledger) -> None:
    # Given two processes racing to reserve 1 byte at a time under a limit of 40 bytes
    limit, attempts = 40, 30
    procs = [spawn(ADDER, ledger.directory, str(limit), str(attempts), tag) for tag in ("a", "b")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        admitted = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            admitted.append(int(out))
    finally:
        for p in procs:
            stop(p)
    entries = ledger.entries()
    # Then exactly the limit was admitted, every admitted reservation is in its own slot, none lost
    assert sum(admitted) == limit
    assert len(entries) == limit
    assert len({e.slot for e in entries}) == limit
    assert sum(e.memory_bytes for e in entries) == limit
    # and neither could take more than its attempts, so both got a share
    assert all(n > 0 for n in admitted), admitted


def test_running_tells_whether_another_process_holds_a_task_s_reservation(ledger: Ledger) -> None:
    ledger.try_add(entry(pid=11, task_id="t1"), lambda _: True)
    ledger.try_add(Entry(KIND_MODEL, 12, MiB, task_id="t2", name="model:t2"), lambda _: True)
    assert ledger.running("t1") and ledger.running("t1", other_than=12)
    assert not ledger.running("t1", other_than=11)  # only the asking process holds it
    assert not ledger.running("t2")  # a model's reservation is not a running task
    assert not ledger.running("t3")


def test_release_frees_only_its_own_reservation_and_returns_the_governor_s_peak(ledger: Ledger) -> None:
    a = entry(task_id="a")
    assert ledger.try_add(a, lambda _: True)
    [seen] = ledger.entries()  # the governor's read, then its usage write
    ledger.set_usage([(seen, 30 * MiB)])
    ledger.set_usage([(seen, 10 * MiB)])
    assert ledger.release(a) == 30 * MiB
    assert ledger.entries() == []
    assert ledger.release(a) is None  # already gone
    b = entry(task_id="b")
    assert ledger.try_add(b, lambda _: True) and b.slot == a.slot
    assert ledger.release(a) is None  # a stale handle for a reused slot frees nothing
    assert [e.task_id for e in ledger.entries()] == ["b"]


def test_a_release_between_the_governor_s_check_and_its_usage_write_stays_released(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner releases without the lock: it can clear its slot right after the governor, under
    # the lock, found the reservation there and before it writes the usage.
    a = entry(task_id="a")
    assert ledger.try_add(a, lambda _: True)
    [seen] = ledger.entries()
    read = ledger_module.read_slot

    def read_then_the_owner_releases(buf: mmap.mmap, i: int) -> Entry | None:
        found = read(buf, i)
        assert ledger.release(a) is not None
        return found

    monkeypatch.setattr(ledger_module, "read_slot", read_then_the_owner_releases)
    ledger.set_usage([(seen, 7 * MiB)])
    monkeypatch.undo()
    assert ledger.entries() == []  # a whole-slot write would have brought it back


# --- across threads of one process -------------------------------------------------------------------
def test_threads_of_one_process_never_admit_past_the_limit_nor_lose_a_reservation(ledger: Ledger) -> None:
    # Given one process's ledger handle shared by several threads (in the main process: the governor,
    # the stats and Prometheus handler threads, the autoscaler; in a pool process: the task thread and
    # the watcher's model relief), racing to reserve 1 byte at a time under a limit of 40 bytes
    import threading

    limit, attempts, threads = 40, 30, 4
    start = threading.Barrier(threads)
    admitted: list[Entry] = []

    def fits(reserved: Reserved) -> bool:
        time.sleep(0.0005)  # widen the window between the check and the write
        return reserved.unused_bytes + 1 <= limit

    def adder(tag: str) -> None:
        start.wait()
        for i in range(attempts):
            e = Entry(KIND_TASK, 1, 1, task_id=f"{tag}{i}", name=tag)
            if ledger.try_add(e, fits):
                admitted.append(e)

    workers = [threading.Thread(target=adder, args=(f"t{n}-",)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    # Then exactly the limit was admitted, and every admitted reservation is still there
    entries = ledger.entries()
    assert len(admitted) == limit
    assert sorted(e.task_id for e in entries) == sorted(e.task_id for e in admitted)
    assert all(ledger.release(e) is not None for e in admitted)


def test_a_child_forked_while_a_thread_holds_the_lock_can_take_it_once_the_parent_lets_go(
    ledger: Ledger,
) -> None:
    # Given a thread of this process holding the ledger's lock when a pool process is forked
    import threading

    holding, let_go = threading.Event(), threading.Event()

    def hold() -> None:
        with ledger.locked():
            holding.set()
            let_go.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    read, write = os.pipe()
    ready: list[int] = []
    child = os.fork()
    if child == 0:  # the pool process: takes the lock through its own handle
        try:
            ledger.try_add(entry(pid=os.getpid(), task_id="child"), lambda _: True)
            os.write(write, b"ok")
        finally:
            os._exit(0)
    os.close(write)
    try:
        # Then the child waits for the parent's lock, not for a thread that does not exist in it
        time.sleep(0.2)
        assert [e.task_id for e in ledger.entries_unlocked()] == []
        let_go.set()
        holder.join(5)
        import select

        ready, _, _ = select.select([read], [], [], 5)
        assert ready, "the child is stuck on a lock held by a thread of its parent"
        assert os.read(read, 2) == b"ok"
        assert [e.task_id for e in ledger.entries()] == ["child"]
    finally:
        let_go.set()
        os.close(read)
        if not ready:
            os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# --- size ---------------------------------------------------------------------------------------------
def test_a_ledger_for_a_large_pool_has_room_for_each_process_and_its_models(tmp_path) -> None:
    # Given the worker of a large host (the light profile starts 2 pool processes per CPU: 128 on 64 CPUs)
    from rmq.core.ledger import slots_for

    big = Ledger(str(tmp_path / "big"), create=True, slots=slots_for(128))
    pool_process = Ledger(big.directory)  # opens the file without knowing its size
    try:
        # Then every process can hold its task and a few models, and every handle sees all the slots
        assert big.slots == pool_process.slots == 512
        with pool_process.locked():
            for i in range(512):
                pool_process.add_unlocked(entry(task_id=str(i)))
            with pytest.raises(LedgerFull, match="512"):
                pool_process.add_unlocked(entry(task_id="one too many"))
        assert len(big.entries()) == 512
        assert slots_for(2) == 128  # never fewer than 128
    finally:
        pool_process.close()
        big.close()
