"""The autoscaler's policy with fake readings, and the checks of bad ``--autoscale`` values."""

from __future__ import annotations

import pytest

from rmq.core.errors import ConfigError
from rmq.memory import scaling
from rmq.memory.admission import Need
from rmq.memory.scaling import Decision, ProcessReading, Readings, ScalePolicy

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
        scaling.check_bounds(high, low)


def test_check_bounds_accepts_good_values():
    for high, low in [(6, 1), (1, 0), (4, 4)]:
        scaling.check_bounds(high, low)


@pytest.mark.parametrize("argv", [
    ["celery", "-A", "app", "worker", "--autoscale=0,0"],
    ["celery", "-A", "app", "worker", "--autoscale", "6,-1"],
    ["celery", "worker", "--autoscale=a,b"],
    ["celery", "worker", "--autoscale=1,2,3"],
])
def test_command_line_values_are_read_as_typed(argv, exits):
    with pytest.raises(SystemExit):
        scaling.check_command_line(argv, {})
    assert exits and "--autoscale" in exits[0] and argv[-1].split("=")[-1] in exits[0]


def test_command_line_checks_only_workers_and_accepts_good_values(exits):
    scaling.check_command_line(["celery", "-A", "app", "worker", "--autoscale=6,1"], {})
    scaling.check_command_line(["celery", "-A", "app", "worker", "--autoscale=1,6"], {})  # as Celery: 6,1
    scaling.check_command_line(["celery", "inspect", "--autoscale=a,b"], {})
    with pytest.raises(SystemExit):
        scaling.check_command_line(["celery", "worker"], {"CELERY_WORKER_AUTOSCALE": "6,-1"})
    assert len(exits) == 1


@pytest.mark.parametrize(("value", "bounds"), [("1,6", (6, 1)), ("6,1", (6, 1)), ("4", (4, 0)), ("3,3", (3, 3))])
def test_autoscale_values_are_read_as_celery_reads_them_the_larger_first(value, bounds):
    assert scaling.parse_autoscale(value) == bounds
