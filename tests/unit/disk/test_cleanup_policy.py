"""The cleanup policy alone: made-up readings in, the chosen sessions and their reasons out."""

from __future__ import annotations

import pytest

from rmq.disk.cleanup_policy import SessionReading, choose_removals

from .helpers import DAY, NOW

KNOBS = {"now": NOW, "max_age_s": DAY, "failed_ttl_s": 3600.0, "high_ratio": 0.8, "low_ratio": 0.7}


def reading(sid: str, seconds_ago: float, size: int = 100) -> SessionReading:
    return SessionReading(f"session_{sid}", NOW - seconds_ago, size, ino=0, mtime_ns=0)


def choose(sessions, live=frozenset(), failed=None, disk=(1000, 0, 1000), **knobs):
    return choose_removals(sessions, live, failed or {}, disk, **{**KNOBS, **knobs})


def test_age_counts_from_the_newest_mtime_and_older_than_replaces_max_age():
    sessions = [reading("new", 3600), reading("old", 2 * DAY)]
    assert [(c.name, c.reason) for c in choose(sessions).candidates] == [("session_old", "age")]
    assert [c.session_id for c in choose(sessions, older_than_s=60).candidates] == ["old", "new"]


def test_a_failed_session_lives_by_its_ttl_not_by_its_age():
    sessions = [reading("f", 30 * DAY)]
    # Given a failure marked 10 minutes ago, When the TTL is one hour, Then the ancient session stays
    assert choose(sessions, failed={"f": NOW - 600}).candidates == []
    # and once the mark is older than the TTL it goes, for that reason
    [c] = choose(sessions, failed={"f": NOW - 3601}).candidates
    assert (c.name, c.reason) == ("session_f", "failed")


def test_a_live_session_is_never_chosen_and_is_reported_for_each_reason():
    sessions = [reading("busy", 30 * DAY, 500), reading("idle", 30 * DAY, 100)]
    plan = choose(sessions, live={"busy"}, disk=(1000, 900, 100))
    assert [c.name for c in plan.candidates] == ["session_idle"]
    assert plan.skipped_live == ["session_busy", "session_busy"]  # due by age, and wanted for disk


def test_disk_pressure_takes_the_oldest_until_below_the_low_ratio():
    sessions = [reading(f"d{i}", 3600 * (10 - i), 100) for i in range(4)]  # d0 oldest, none due by age
    plan = choose(sessions, disk=(1000, 850, 150))
    assert [(c.name, c.reason) for c in plan.candidates] == [("session_d0", "disk"), ("session_d1", "disk")]
    assert plan.ratio_before == pytest.approx(0.85)
    assert plan.ratio_projected == pytest.approx(0.65)


def test_below_the_high_ratio_only_age_and_failures_count():
    plan = choose([reading("d0", 3600)], disk=(1000, 790, 210))
    assert plan.candidates == [] and plan.ratio_projected == pytest.approx(0.79)


@pytest.mark.parametrize("disk", [None, (0, 0, 0)])
def test_an_unreadable_disk_leaves_age_and_failures_alone(disk):
    plan = choose([reading("aged", 2 * DAY), reading("young", 60)], disk=disk)
    assert [c.name for c in plan.candidates] == ["session_aged"]
    assert (plan.ratio_before, plan.ratio_projected) == (None, None)


def test_the_candidate_keeps_the_identity_measured():
    [c] = choose([SessionReading("session_x", NOW - 2 * DAY, 7, ino=42, mtime_ns=123)]).candidates
    assert (c.bytes, c.ino, c.mtime_ns, c.newest_mtime) == (7, 42, 123, NOW - 2 * DAY)
