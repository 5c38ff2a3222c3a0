"""The governor counts, kills and reaps a task's whole tree (docs/design.md#task-trees)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmq.core.ledger import KIND_TASK

from .test_governor import MiB, World, pct

STOP, KILL = signal.SIGSTOP, signal.SIGKILL


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.gov.stop()
    w.ledger.close()


def test_a_tasks_use_counts_its_subprocesses_and_the_kill_picks_the_tree_that_exceeds_most(world: World) -> None:
    # Given a task whose pool process grew 250 MiB, and one whose encoder subprocess holds 300 MiB
    world.reserve(11, "grew", 100 * MiB, start_rss=50 * MiB, started=2.0)
    world.reserve(12, "encodes", 100 * MiB, start_rss=50 * MiB, started=1.0)
    world.meter.children = {11: 300 * MiB, 12: 60 * MiB}
    world.meter.descendants = {12: {200: 300 * MiB, 201: 10 * MiB}}
    # When the worker reaches the kill line
    world.at(pct(0.96))
    # Then the reservation's use is the tree's, and the task with the encoder is the one killed
    used = {e.task_id: e.used_bytes for e in world.ledger.entries() if e.kind == KIND_TASK}
    assert used == {"grew": 250 * MiB, "encodes": 10 * MiB + 310 * MiB}
    assert world.actuator.kills() == [12]
    # stopped top down before anything dies, the pool process killed first, then its descendants
    assert world.signals == [(12, STOP), (200, STOP), (201, STOP), (200, KILL), (201, KILL)]
    record = world.gov.pop_kill("encodes")
    assert record is not None and record.observed_bytes == 60 * MiB + 310 * MiB


def test_a_descendant_that_shows_only_once_the_tree_is_stopped_is_killed_too(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=50 * MiB)
    world.meter.children = {11: 60 * MiB}
    world.meter.descendants = {11: {200: 800 * MiB}}
    world.meter.late = {11: [202]}  # forked just before the stop reached its parent
    world.at(pct(0.97))
    assert world.actuator.kills() == [11]
    assert world.signals == [(11, STOP), (200, STOP), (202, STOP), (200, KILL), (202, KILL)]


def test_leftovers_of_a_killed_tree_are_killed_on_the_next_ticks_and_others_are_left_alone(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=50 * MiB)
    world.meter.children = {11: 60 * MiB}
    world.meter.descendants = {11: {200: 800 * MiB}}
    world.at(pct(0.97))
    assert world.actuator.kills() == [11]
    world.signals.clear()
    # Then: the pool has reaped pid 11; a process of its tree turns up under the main process, beside
    # a daemon another task left behind and one of unknown origin
    world.dead.add(11)
    del world.meter.children[11]
    world.meter.descendants = {}
    world.meter.strays = {205: (11, 50 * MiB), 206: (12, 5 * MiB), 207: (0, 5 * MiB)}
    world.at(pct(0.70))
    assert world.signals == [(205, KILL)]
    assert world.gov.counters["strays_killed"] == 1
    # strays count in the worker's memory and show in the snapshot
    snap = world.gov.memory_snapshot()
    assert snap["strays"] == {"205": 50 * MiB, "206": 5 * MiB, "207": 5 * MiB}


def test_a_killed_pool_pid_reused_by_a_new_pool_process_is_not_killed_again(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=50 * MiB)
    world.meter.children = {11: 60 * MiB}
    world.meter.descendants = {11: {200: 800 * MiB}}
    world.at(pct(0.97))
    world.signals.clear()
    world.dead.add(11)
    saved = world.meter.children.pop(11)
    world.meter.descendants = {}
    world.at(pct(0.5))  # pid 11 gone
    world.dead.discard(11)
    world.meter.children[11] = saved  # a new pool process got pid 11, and runs a subprocess
    world.meter.descendants = {11: {300: 10 * MiB}}
    world.at(pct(0.5))
    assert world.signals == []


def test_zombies_under_the_main_process_are_reaped_once_seen_twice(world: World) -> None:
    world.meter.zombies = [400, 401]
    world.at(pct(0.5))
    assert world.reaped == []
    world.meter.zombies = [401, 402]
    world.at(pct(0.5))
    assert world.reaped == [401]
    assert world.gov.counters["reaped"] == 1


def test_the_snapshot_lists_each_pool_processs_descendants(world: World) -> None:
    world.meter.children = {11: 40 * MiB, 12: 30 * MiB}
    world.meter.descendants = {11: {200: 300 * MiB}}
    world.at(pct(0.6))
    snap = world.gov.memory_snapshot()
    assert snap["children"] == {"11": 340 * MiB, "12": 30 * MiB}
    assert snap["descendants"] == {"11": {"200": 300 * MiB}}
