"""The main process's heap frozen before each fork (rmq/memory/shared_heap.py)."""

from __future__ import annotations

import gc
import os
import weakref

import pytest

from rmq.memory.shared_heap import SharedHeap


@pytest.fixture(autouse=True)
def _thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_main_process_freezes_its_objects_before_a_fork() -> None:
    heap = SharedHeap(os.getpid())
    kept = [[] for _ in range(1000)]  # tracked by the collector
    heap.before_fork()
    assert gc.get_freeze_count() >= len(kept)
    assert heap.forks == 1 and heap.thaws == 0


def test_a_fork_by_another_process_freezes_nothing():
    heap = SharedHeap(os.getpid() + 1)  # a pool process forking a task's subprocess
    heap.before_fork()
    assert gc.get_freeze_count() == 0 and heap.forks == 0


def test_once_per_interval_the_heap_is_thawed_and_collected_before_freezing_again():
    clock = Clock()
    heap = SharedHeap(os.getpid(), thaw_every_s=60, clock=clock)
    heap.before_fork()
    # a cycle frozen while alive, then dropped: not collected while frozen
    collected = []
    class Node:
        pass

    node = Node()
    node.self = node  # type: ignore[attr-defined]
    ref = weakref.ref(node, lambda _: collected.append(True))
    heap.before_fork()
    del node
    gc.collect()
    assert ref() is not None and heap.thaws == 0
    clock.now += 61  # the next fork after the interval thaws and collects everything first
    heap.before_fork()
    assert ref() is None and collected == [True] and heap.thaws == 1
    assert gc.get_freeze_count() > 0


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError, match="thaw_every_s"):
        SharedHeap(os.getpid(), thaw_every_s=0)
