"""The autoscaler (SPEC C10): the policy with fake readings, bad ``--autoscale`` values, and the
Celery glue against a fake pool and a real ledger."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rmq.celery import autoscale
from rmq.memory.admission import Need
from rmq.celery.autoscale import Decision, ProcessReading, Readings, ResourceAutoscaler, ScalePolicy
from rmq.core.config import load_config
from rmq.core.errors import ConfigError
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Control, Entry, Ledger
from rmq.core.runtime import set_current

MiB = 1024**2
LIGHT = Need(16 * MiB)
HEAVY = Need(300 * MiB)


def idle(pid: int, idle_s: float = 0.0, unpinned: int = 0, pinned: int = 0, memory: int = 20 * MiB) -> ProcessReading:
    return ProcessReading(pid, False, idle_s, unpinned, pinned, memory)


def busy(pid: int) -> ProcessReading:
    return ProcessReading(pid, True, 0.0, 0, 0, 50 * MiB)


def readings(**kw) -> Readings:
    base = dict(current=1, min_procs=1, max_procs=6, processes=[busy(1)], admit_line_bytes=870 * MiB,
                worker_bytes=100 * MiB, cpu_slots=2, new_process_bytes=20 * MiB, keepalive_s=3.0)
    base.update(kw)
    if "current" not in kw:
        base["current"] = len(base["processes"])
    return Readings(**base)


decide = ScalePolicy().decide


# -- growing ---------------------------------------------------------------------------


def test_grows_by_one_when_work_waits_and_its_declaration_fits():
    d = decide(readings(waiting=[LIGHT] * 5))
    assert d == Decision("grow", d.reason, 1)
    assert "backlog 5" in d.reason and "16.0MiB fits" in d.reason


def test_never_grows_above_max():
    d = decide(readings(processes=[busy(i) for i in range(6)], waiting=[LIGHT] * 5))
    assert d.action == "hold" and "at MAX 6" in d.reason


def test_idle_processes_take_the_backlog_first():
    d = decide(readings(processes=[busy(1), idle(2), idle(3)], waiting=[LIGHT, LIGHT]))
    assert d.action == "hold" and "served by 2 idle" in d.reason
    # a process just started (counted by the pool, not yet listed) is idle too
    d = decide(readings(current=2, processes=[busy(1)], waiting=[LIGHT]))
    assert d.action == "hold"
    assert decide(readings(waiting=[])).reason == "no backlog"


def test_no_growth_when_the_waiting_declaration_has_no_room_under_the_admit_line():
    # two heavy tasks already hold their declarations: 870 - 100 - 2*300 = 170 MiB left
    d = decide(readings(processes=[busy(1), busy(2)], unused_reserved_bytes=600 * MiB, waiting=[HEAVY] * 4))
    assert d.action == "hold"
    assert "no room under the admit line" in d.reason and "320.0MiB" in d.reason


def test_a_light_task_behind_heavy_ones_still_gets_a_process():
    d = decide(readings(processes=[busy(1), busy(2)], unused_reserved_bytes=600 * MiB,
                        waiting=[HEAVY, HEAVY, LIGHT, HEAVY]))
    assert d.action == "grow" and "16.0MiB fits" in d.reason


def test_the_new_process_costs_memory_too():
    r = dict(processes=[busy(1)], worker_bytes=100 * MiB, admit_line_bytes=420 * MiB, waiting=[HEAVY])
    assert decide(readings(**r, new_process_bytes=10 * MiB)).action == "grow"  # 300 + 10 <= 320
    assert decide(readings(**r, new_process_bytes=30 * MiB)).action == "hold"  # 300 + 30 > 320


def test_work_handed_to_processes_but_not_yet_admitted_counts_against_the_room():
    # one heavy just started in process 1 (not in the ledger yet): the second heavy does not fit
    r = dict(processes=[busy(1)], admit_line_bytes=700 * MiB, waiting=[HEAVY])
    assert decide(readings(**r)).action == "grow"
    assert decide(readings(**r, starting=[HEAVY])).action == "hold"
    # the same for work an idle process is about to take
    r2 = dict(processes=[busy(1), idle(2)], admit_line_bytes=700 * MiB, waiting=[HEAVY, HEAVY])
    assert decide(readings(**r2)).action == "hold"


def test_work_that_will_not_fit_anyway_does_not_block_growth():
    # a heavy task waiting for admission in process 1 will be deferred: it takes no room
    d = decide(readings(processes=[busy(1)], admit_line_bytes=300 * MiB, starting=[HEAVY], waiting=[LIGHT]))
    assert d.action == "grow"


def test_cpu_declaring_work_needs_free_slots_and_other_work_does_not():
    cpu_task = Need(16 * MiB, cpu_slots=1)
    full = dict(processes=[busy(1), busy(2)], cpu_slots=2, cpu_slots_used=2)
    d = decide(readings(**full, waiting=[cpu_task, cpu_task]))
    assert d.action == "hold" and "no free CPU slots" in d.reason
    assert decide(readings(**full, waiting=[cpu_task, LIGHT])).action == "grow"
    assert decide(readings(**{**full, "cpu_slots_used": 1}, waiting=[cpu_task])).action == "grow"
    # a slot about to be taken by work already started is not free
    assert decide(readings(**{**full, "cpu_slots_used": 1}, starting=[cpu_task], waiting=[cpu_task])).action == "hold"


@pytest.mark.parametrize("zone", ["pause", "kill"])
def test_no_growth_under_pressure(zone):
    d = decide(readings(zone=zone, waiting=[LIGHT] * 5))
    assert d.action == "hold" and f"{zone} zone" in d.reason


def test_growth_is_allowed_in_the_unload_zone_when_there_is_room():
    assert decide(readings(zone="unload", waiting=[LIGHT] * 3)).action == "grow"


# -- shrinking -------------------------------------------------------------------------


def test_pause_zone_ends_idle_processes_at_once_model_holders_first():
    procs = [busy(1), idle(2, idle_s=9), idle(3, unpinned=200 * MiB), idle(4, unpinned=50 * MiB),
             idle(5, pinned=400 * MiB, memory=420 * MiB)]
    d = decide(readings(zone="pause", processes=procs, min_procs=2, waiting=[LIGHT] * 3))
    assert d.action == "shrink"
    assert d.pids == (3, 4, 2)  # most unpinned model memory first; the pinned holder is kept longest
    assert d.count == 3 and "pause zone" in d.reason and "250.0MiB of unpinned models" in d.reason


def test_pause_zone_never_ends_a_busy_process_nor_goes_below_min():
    d = decide(readings(zone="pause", processes=[busy(1), busy(2), busy(3)], min_procs=1))
    assert d.action == "hold" and "all processes busy" in d.reason
    d = decide(readings(zone="kill", processes=[busy(1), idle(2), idle(3)], min_procs=3))
    assert d.action == "hold" and "at MIN 3" in d.reason
    d = decide(readings(zone="pause", processes=[idle(1), idle(2, unpinned=MiB)], min_procs=1))
    assert d.pids == (2,)


def test_idle_processes_go_after_the_keepalive_longest_idle_first():
    procs = [busy(1), idle(2, idle_s=1.0), idle(3, idle_s=5.0), idle(4, idle_s=3.0)]
    d = decide(readings(processes=procs, min_procs=1, keepalive_s=3.0))
    assert d.action == "shrink" and d.pids == (3, 4)
    assert "idle for 3s" in d.reason


def test_keepalive_shrinking_stops_at_min_and_keeps_processes_for_waiting_work():
    procs = [idle(1, idle_s=60), idle(2, idle_s=60), idle(3, idle_s=60)]
    assert decide(readings(processes=procs, min_procs=2)).pids == (1,)
    assert decide(readings(processes=procs, min_procs=3)).action == "hold"
    assert decide(readings(processes=procs, min_procs=0, waiting=[HEAVY, HEAVY])).pids == (1,)


def test_keepalive_prefers_to_keep_warm_model_caches_among_equals():
    procs = [idle(1, idle_s=10, unpinned=100 * MiB), idle(2, idle_s=10)]
    assert decide(readings(processes=procs, min_procs=1)).pids == (2,)


def test_a_busy_process_is_never_ended_after_the_keepalive():
    old_busy = ProcessReading(1, True, 999.0)
    assert decide(readings(processes=[old_busy, busy(2)], min_procs=0)).action == "hold"


# -- bad --autoscale values ------------------------------------------------------------


@pytest.mark.parametrize(("high", "low"), [(1, 6), (6, -1), (0, 0), (-1, 0), ("6", 1), (True, 0)])
def test_check_bounds_refuses_bad_values(high, low):
    with pytest.raises(ConfigError, match="--autoscale"):
        autoscale.check_bounds(high, low)


def test_check_bounds_accepts_good_values():
    for high, low in [(6, 1), (1, 0), (4, 4)]:
        autoscale.check_bounds(high, low)


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    said: list[str] = []

    def fake_exit(message, status=2, now=False):
        said.append(message)
        raise Exited(message)

    monkeypatch.setattr(autoscale, "exit_with_line", fake_exit)
    return said


@pytest.mark.parametrize("argv", [
    ["celery", "-A", "app", "worker", "--autoscale=1,6"],
    ["celery", "-A", "app", "worker", "--autoscale", "6,-1"],
    ["celery", "worker", "--autoscale=a,b"],
    ["celery", "worker", "--autoscale=1,2,3"],
])
def test_command_line_values_are_read_as_typed(argv, exits):
    with pytest.raises(Exited):
        autoscale.check_command_line(argv, {})
    assert exits and "--autoscale" in exits[0] and argv[-1].split("=")[-1] in exits[0]


def test_command_line_checks_only_workers_and_accepts_good_values(exits):
    autoscale.check_command_line(["celery", "-A", "app", "worker", "--autoscale=6,1"], {})
    autoscale.check_command_line(["celery", "inspect", "--autoscale=1,6"], {})
    with pytest.raises(Exited):
        autoscale.check_command_line(["celery", "worker"], {"CELERY_WORKER_AUTOSCALE": "1,6"})
    assert len(exits) == 1


def test_the_concern_refuses_bad_bounds_and_adds_the_snapshot_part(exits):
    rt = SimpleNamespace(snapshot_parts={})
    autoscale.AutoscaleConcern().worker_boot(rt, SimpleNamespace(autoscale=None))
    assert rt.snapshot_parts == {}  # no --autoscale, no autoscaler
    with pytest.raises(Exited):
        autoscale.AutoscaleConcern().worker_boot(rt, SimpleNamespace(autoscale=[1, 6], max_concurrency=1, min_concurrency=6))
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
        learner=SimpleNamespace(learned=lambda name: 0),
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
