"""The autoscaler's Celery glue: the concern that refuses bad bounds, and the autoscaler against a
fake pool and a real ledger."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rmq.celery import autoscale
from rmq.celery.autoscale import ResourceAutoscaler
from rmq.core.config import load_config
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger
from rmq.core.runtime import set_current
from rmq.memory.admission import Need

MiB = 1024**2


def test_the_concern_refuses_bad_bounds_and_adds_the_snapshot_part(exits):
    rt = SimpleNamespace(snapshot_parts={})
    autoscale.AutoscaleConcern().worker_boot(rt, SimpleNamespace(autoscale=None))
    assert rt.snapshot_parts == {}  # no --autoscale, no autoscaler
    with pytest.raises(SystemExit):
        bad = SimpleNamespace(autoscale=[1, 6], max_concurrency=1, min_concurrency=6)
        autoscale.AutoscaleConcern().worker_boot(rt, bad)
    worker = SimpleNamespace(autoscale=(6, 1), max_concurrency=6, min_concurrency=1, autoscaler=None)
    autoscale.AutoscaleConcern().worker_boot(rt, worker)
    assert rt.snapshot_parts["autoscaler"]() is None
    worker.autoscaler = SimpleNamespace(info=lambda: {"current": 2})
    assert rt.snapshot_parts["autoscaler"]() == {"current": 2}


# -- the Celery glue, against a fake pool and a real ledger ---------------------------


class FakeProc:
    def __init__(self, pid: int, index: int) -> None:
        self.pid, self.index, self.inqW_fd = pid, index, 100 + index
        self.terminated = False

    def terminate_controlled(self) -> None:
        self._controlled_termination = True
        self.terminated = True


class FakeJob:
    def __init__(self, pid=None, write_to=None) -> None:
        self._worker_pid, self._write_to, self._scheduled_for = pid, write_to, None

    def worker_pids(self):
        return [self._worker_pid] if self._worker_pid else []


class FakeBilliard:
    def __init__(self, procs) -> None:
        self._pool = list(procs)
        self._processes = len(procs)
        self._busy_workers: set[int] = set()
        self._cache: dict[int, FakeJob] = {}
        self._putlock = SimpleNamespace(shrunk=0)
        self._putlock.shrink = lambda: setattr(self._putlock, "shrunk", self._putlock.shrunk + 1)
        self.write_stats: dict[int, int] = {}
        self.grown = 0

    def on_shrink(self, n):
        pass

    def grow(self, n):
        self._processes += n
        self.grown += n


class FakeTaskPool:
    def __init__(self, procs) -> None:
        self._pool = FakeBilliard(procs)

    @property
    def num_processes(self):
        return self._pool._processes

    def grow(self, n):
        self._pool.grow(n)

    def maintain_pool(self):
        pass


@pytest.fixture
def glue(tmp_path):
    ledger = Ledger(str(tmp_path), create=True)
    ledger.write_control(Control(0, 0, 100 * MiB, 1000 * MiB, 870 * MiB, 80 * MiB, 0.0, "ok", 2, False))
    rt = SimpleNamespace(
        config=load_config({}, {"RMQ_AUTOSCALE_KEEPALIVE": "3s"}), ledger=ledger, runtime_dir=str(tmp_path),
        governor=SimpleNamespace(last=SimpleNamespace(children={11: 20 * MiB, 12: 22 * MiB, 13: 145 * MiB})),
    )
    set_current(rt)
    pool = FakeTaskPool([FakeProc(11, 0), FakeProc(12, 1), FakeProc(13, 2)])
    clock = [100.0]
    scaler = ResourceAutoscaler(pool, 6, 1, worker=None, clock=lambda: clock[0])
    yield SimpleNamespace(rt=rt, ledger=ledger, pool=pool, bp=pool._pool, scaler=scaler, clock=clock)
    set_current(None)
    ledger.close()


def test_glue_reads_busy_processes_models_and_idle_time_from_the_pool_and_ledger(glue):
    glue.ledger.try_add(Entry(KIND_TASK, 11, 300 * MiB, 1, task_id="t1", name="heavy"), lambda e: True)
    glue.ledger.try_add(Entry(KIND_MODEL, 13, 120 * MiB, task_id="m", name="m"), lambda e: True)
    glue.bp._busy_workers.add(glue.bp._pool[1].inqW_fd)  # a job written to 12, not acked yet
    r = glue.scaler.readings(glue.clock[0])
    assert [(p.pid, p.busy) for p in r.processes] == [(11, True), (12, True), (13, False)]
    assert r.processes[2].unpinned_model_bytes == 120 * MiB and r.processes[2].memory_bytes == 145 * MiB
    assert r.unused_reserved_bytes == 420 * MiB and r.cpu_slots_used == 1 and r.admit_line_bytes == 870 * MiB
    # a process by itself: private memory less models and task growth (median)
    assert r.keepalive_s == 3.0 and r.current == 3 and r.new_process_bytes == 22 * MiB
    # idle time runs from the last time a process was seen busy or was handed a job
    glue.clock[0] += 5
    glue.bp.write_stats[2] = 1
    r = glue.scaler.readings(glue.clock[0])
    assert r.processes[2].idle_s == 0.0
    glue.clock[0] += 4
    assert glue.scaler.readings(glue.clock[0]).processes[2].idle_s == 4.0
    # a process seen busy is idle from the first look that finds it idle, not from the last busy look
    for e in glue.ledger.entries():
        glue.ledger.remove(e)
    glue.bp._busy_workers.clear()
    glue.clock[0] += 0.5
    assert [p.idle_s for p in glue.scaler.readings(glue.clock[0]).processes] == [0.0, 0.0, 4.5]
    glue.clock[0] += 2
    assert [p.idle_s for p in glue.scaler.readings(glue.clock[0]).processes] == [2.0, 2.0, 6.5]


def test_glue_ends_only_processes_that_are_still_idle_and_records_why(glue):
    glue.clock[0] += 10  # every process idle for 10 s > keepalive 3 s
    glue.scaler.readings(glue.clock[0] - 10)
    glue.bp._cache[1] = FakeJob(pid=12)  # 12 got a job meanwhile
    assert glue.scaler._maybe_scale() is True
    ended = [p.pid for p in glue.bp._pool if p.terminated]
    assert 12 not in ended and len(ended) == 2 and glue.bp._processes == 1
    assert glue.bp._putlock.shrunk == 2
    info = glue.scaler.info()
    assert info["current"] == 1 and info["min"] == 1 and info["max"] == 6
    assert info["last_change"]["action"] == "shrink" and info["last_change"]["pids"] == ended
    assert "idle for 3s" in info["reason"] and info["shrunk"] == 2


def test_glue_rechecks_each_process_before_ending_it_and_stops_at_min(glue):
    glue.bp._cache[1] = FakeJob(write_to=glue.bp._pool[0])  # a job being written to 11
    assert glue.scaler._end([11]) == []
    assert glue.scaler._end([12, 13]) == [12, 13] and glue.bp._processes == 1
    glue.bp._cache.clear()
    assert glue.scaler._end([11]) == []  # MIN is 1
    assert not glue.bp._pool[0].terminated


def test_glue_grows_one_process_for_reserved_work(glue, monkeypatch):
    from celery.worker import state

    class Req:
        name = "light"
        worker_pid = None
        task = SimpleNamespace(rmq=SimpleNamespace(memory_bytes=16 * MiB, cpu_slots=0))

    reqs = [Req() for _ in range(5)]
    monkeypatch.setattr(state, "reserved_requests", set(reqs))
    glue.bp._busy_workers.update(p.inqW_fd for p in glue.bp._pool)
    assert glue.scaler._maybe_scale() is True
    assert glue.bp.grown == 1 and glue.scaler.info()["decision"] == "grow"
    # a task message right after does not trigger a second look at once
    assert glue.scaler._maybe_scale(req=reqs[0]) is False
    assert glue.bp.grown == 1


def test_a_task_without_memory_declared_needs_its_learned_peak(glue, monkeypatch):
    learned = {"light": 48 * MiB}
    monkeypatch.setattr(autoscale, "learner", lambda rt: SimpleNamespace(learned=lambda name: learned.get(name, 0)))

    class Req:
        def __init__(self, name):
            self.name = name
            self.task = SimpleNamespace(rmq=SimpleNamespace(memory_bytes=None, cpu_slots=1))

    assert glue.scaler._need(Req("light")) == Need(48 * MiB, 1)
    assert glue.scaler._need(Req("new")) == Need(glue.rt.config.default_task_memory, 1)  # nothing learned yet


def test_remote_control_update_refuses_bad_bounds(glue):
    with pytest.raises(ValueError, match="MAX must not be below MIN"):
        glue.scaler.update(max=2, min=4)


def test_glue_counts_work_being_handed_to_a_process_as_taken(glue, monkeypatch):
    from celery.worker import state

    class Req:
        def __init__(self, memory):
            self.name, self.worker_pid = "t", None
            self.task = SimpleNamespace(rmq=SimpleNamespace(memory_bytes=memory, cpu_slots=0))

    req = Req

    running = req(300 * MiB)
    running.worker_pid = 11
    reqs = [running, req(16 * MiB), req(300 * MiB), req(300 * MiB)]
    monkeypatch.setattr(state, "reserved_requests", set(reqs))
    monkeypatch.setattr(state, "active_requests", {running})
    glue.bp._busy_workers.update({glue.bp._pool[0].inqW_fd, glue.bp._pool[1].inqW_fd})  # 12: written, not acked
    r = glue.scaler.readings(glue.clock[0])
    # 11 accepted its task (not admitted yet); 12 is being handed one (assumed the largest waiting)
    assert [n.memory_bytes for n in r.starting] == [300 * MiB, 300 * MiB]
    assert [n.memory_bytes for n in r.waiting] == [300 * MiB, 16 * MiB]
    assert [p.busy for p in r.processes] == [True, True, False]


def test_on_a_pool_other_than_prefork_it_scales_like_celery(glue, monkeypatch):
    from celery.worker import state

    class OtherPool:
        _pool = object()  # not billiard's
        num_processes = 1
        grown = 0

        def grow(self, n):
            self.grown += n

    pool = OtherPool()
    scaler = ResourceAutoscaler(pool, 6, 1)
    monkeypatch.setattr(state, "reserved_requests", {object.__new__(type("R", (), {})) for _ in range(3)})
    assert scaler._maybe_scale() is True
    assert pool.grown == 2  # Celery's rule: up to the reserved count at once
