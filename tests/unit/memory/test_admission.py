"""Admission: does a new task fit beside what runs? (docs/design.md#admission)"""

from __future__ import annotations

import pytest

from rmq.core.ledger import KIND_MODEL, KIND_TASK, Entry, Reserved
from rmq.memory.admission import Need, Verdict, judge, percentile

MiB = 1024**2
GiB = 1024**3

BUDGET = 10 * GiB
ADMIT = int(BUDGET * 0.85)  # 8.5 GiB


def task(memory: int, used: int = 0, cpu: int = 0, disk: int = 0) -> Entry:
    return Entry(KIND_TASK, 100, memory, cpu, disk, task_id="t", name="job", used_bytes=used)


def run(need: Need, running: list[Entry] = (), worker: int = GiB, idle: int = GiB, cpu_slots: int = 4,
        disk_free: int | None = None, disk_size: int | None = None) -> Verdict:
    return judge(need, Reserved.of(running), worker, idle, ADMIT, BUDGET, cpu_slots, disk_free, disk_size)


def test_fits_on_an_idle_worker() -> None:
    v = run(Need(2 * GiB))
    assert v == Verdict(True)


def test_exactly_at_the_admit_line_fits() -> None:
    assert run(Need(ADMIT - GiB), worker=GiB).admitted


def test_one_byte_over_the_admit_line_waits() -> None:
    v = run(Need(ADMIT - GiB + 1), worker=GiB, idle=GiB // 2)
    assert not v.admitted and not v.never and v.resource == "memory"


def test_unused_part_of_running_declarations_counts() -> None:
    # Given a running task that declared 4 GiB and uses 1 GiB so far (already inside worker_bytes)
    running = [task(4 * GiB, used=GiB)]
    # Then 3 GiB of it may still come: worker 2 GiB + 3 GiB unused + 3 GiB new = 8 GiB <= 8.5 GiB fits
    assert run(Need(3 * GiB), running, worker=2 * GiB).admitted
    # but 4 GiB new would reach 9 GiB, above the admit line
    v = run(Need(4 * GiB), running, worker=2 * GiB)
    assert not v.admitted and not v.never
    assert v.resource == "memory"
    assert v.declared == 4 * GiB
    assert v.available == ADMIT - 2 * GiB - 3 * GiB
    assert v.budget == BUDGET
    assert "admit line 8.5GiB" in v.reason and "reserved-unused 3.0GiB" in v.reason


def test_a_task_over_its_declaration_adds_no_negative_room() -> None:
    # a task using more than it declared has no unused part (never negative)
    running = [task(GiB, used=3 * GiB)]
    assert running[0].unused_bytes == 0
    v = run(Need(5 * GiB), running, worker=4 * GiB)
    assert not v.admitted  # 4 + 0 + 5 = 9 GiB > 8.5 GiB


def test_model_reservations_count_like_tasks() -> None:
    model = Entry(KIND_MODEL, 100, 3 * GiB, task_id="m", name="whisper")
    assert not run(Need(5 * GiB), [model], worker=GiB).admitted  # 1 + 3 + 5 = 9 > 8.5
    assert run(Need(4 * GiB), [model], worker=GiB).admitted


def test_never_fits_when_larger_than_admit_line_minus_idle() -> None:
    # Given an idle worker of 1 GiB: an idle worker admits at most 7.5 GiB
    v = run(Need(8 * GiB), idle=GiB, worker=GiB)
    assert not v.admitted and v.never
    assert v.resource == "memory"
    assert (v.declared, v.available, v.budget) == (8 * GiB, ADMIT - GiB, BUDGET)
    assert "idle worker admits at most 7.5GiB" in v.reason


def test_never_is_judged_against_idle_not_current_memory() -> None:
    # a busy worker (6 GiB) cannot take 7 GiB now, but it could once idle: wait, don't fail
    v = run(Need(7 * GiB), worker=6 * GiB, idle=GiB)
    assert not v.admitted and not v.never


def test_cpu_slots() -> None:
    running = [task(MiB, cpu=3)]
    assert run(Need(MiB, cpu_slots=1), running, cpu_slots=4).admitted
    v = run(Need(MiB, cpu_slots=2), running, cpu_slots=4)
    assert not v.admitted and not v.never
    assert (v.resource, v.declared, v.available, v.budget) == ("cpu", 2, 1, 4)


def test_cpu_more_than_the_worker_has_never_fits() -> None:
    v = run(Need(MiB, cpu_slots=5), cpu_slots=4)
    assert v.never and v.resource == "cpu"
    assert (v.declared, v.available) == (5, 4)


def test_tasks_without_cpu_ignore_busy_slots() -> None:
    assert run(Need(MiB), [task(MiB, cpu=4)], cpu_slots=4).admitted


def test_disk_counts_other_reservations() -> None:
    running = [task(MiB, disk=3 * GiB)]
    assert run(Need(MiB, disk_bytes=2 * GiB), running, disk_free=5 * GiB).admitted
    v = run(Need(MiB, disk_bytes=3 * GiB), running, disk_free=5 * GiB)
    assert not v.admitted and not v.never
    assert (v.resource, v.declared, v.available, v.budget) == ("disk", 3 * GiB, 2 * GiB, 5 * GiB)


def test_disk_larger_than_the_filesystem_never_fits() -> None:
    """It used to wait (resource "disk", never=False), and was deferred
    rmq_max_deferrals times before failing with ResourceUnavailable."""
    v = run(Need(MiB, disk_bytes=101 * GiB), disk_free=40 * GiB, disk_size=100 * GiB)
    assert (v.admitted, v.never, v.resource) == (False, True, "disk")
    assert (v.declared, v.available, v.budget) == (101 * GiB, 100 * GiB, 100 * GiB)
    assert "101.0GiB" in v.reason and "100.0GiB" in v.reason


def test_disk_that_the_filesystem_could_hold_waits_for_room() -> None:
    v = run(Need(MiB, disk_bytes=100 * GiB), disk_free=40 * GiB, disk_size=100 * GiB)
    assert (v.admitted, v.never, v.resource) == (False, False, "disk")
    others_hold_the_rest = [task(MiB, disk=60 * GiB)]
    assert run(Need(MiB, disk_bytes=100 * GiB), others_hold_the_rest, disk_free=100 * GiB,
               disk_size=100 * GiB).resource == "disk"


def test_disk_not_checked_when_free_space_is_unknown() -> None:
    assert run(Need(MiB, disk_bytes=100 * GiB), disk_free=None).admitted


def test_memory_is_judged_before_cpu_and_disk() -> None:
    v = run(Need(8 * GiB, cpu_slots=9, disk_bytes=GiB), disk_free=0)
    assert v.resource == "memory" and v.never


# --- percentile --------------------------------------------------------------------------------------
def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.0) == 1
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.5) == pytest.approx(50, abs=1)
    assert percentile(values, 0.95) == pytest.approx(95, abs=1)


def test_percentile_ignores_order_and_handles_edges() -> None:
    assert percentile([], 0.95) == 0.0
    assert percentile([7], 0.95) == 7.0
    assert percentile([300, 100, 200], 1.0) == 300.0
    assert percentile([300, 100, 200], 0.0) == 100.0
