"""Worker memory without counting copy-on-write pages once per forked child (docs/design.md#governor)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from rmq.memory.meter import ProcessTreeMeter, TreeReading

MiB = 1024**2


def fork_sleepers(n: int) -> list[int]:
    """Forked children that only sleep: they share every page of the parent and write none."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:  # child: touch nothing, just wait to be killed
            try:
                time.sleep(120)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_forked_children_are_not_counted_for_shared_pages() -> None:
    # Given a parent holding a touched 200 MiB buffer and 3 forked children that share it
    buffer = bytearray(b"\x01") * (200 * MiB)
    assert buffer[-1] == 1
    children: list[int] = []
    try:
        children = fork_sleepers(3)
        meter = ProcessTreeMeter(os.getpid(), uss_interval_s=0)
        # When the meter samples the tree
        reading = meter.sample(children)
        parent_rss = psutil.Process().memory_info().rss
        # Then every child is seen, with its full RSS but a small private part
        assert set(reading.children) == set(children)
        naive = sum(reading.rss.values())
        assert naive > parent_rss + 3 * 150 * MiB, "children should show the shared buffer in their RSS"
        assert all(reading.rss[p] > 150 * MiB for p in children)
        assert all(reading.children[p] < 50 * MiB for p in children)
        # and the worker total counts the buffer once, not four times
        assert reading.worker_bytes < parent_rss + 100 * MiB
        assert reading.worker_bytes >= reading.main_bytes > 200 * MiB
        assert reading.worker_bytes == reading.main_bytes + sum(reading.children.values())
    finally:
        kill_all(children)
        del buffer


def test_shared_part_is_refreshed_only_every_uss_interval() -> None:
    now = [100.0]
    children: list[int] = []
    try:
        children = fork_sleepers(1)
        meter = ProcessTreeMeter(os.getpid(), uss_interval_s=2.0, clock=lambda: now[0])
        calls = []
        real = meter.fs.private

        def counting(pid):
            calls.append(pid)
            return real(pid)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(meter.fs, "private", counting)
            meter.sample(children)
            now[0] += 1.0
            second = meter.sample(children)
            now[0] += 1.5
            meter.sample(children)
        assert calls == children * 2  # at t=100 and t=102.5, not at t=101
        assert second.children[children[0]] < 50 * MiB  # the cached shared part still applies
    finally:
        kill_all(children)


def test_vanished_children_are_skipped_and_forgotten() -> None:
    children = fork_sleepers(2)
    try:
        meter = ProcessTreeMeter(os.getpid(), uss_interval_s=0)
        assert set(meter.sample(children).children) == set(children)
        kill_all(children[:1])
        reading = meter.sample(children)
        assert set(reading.children) == {children[1]}
        assert children[0] not in reading.rss
        # a pid no longer listed is dropped from the meter's caches
        meter.sample(children[1:])
        assert meter.fs.kept() == {os.getpid(), children[1]}
    finally:
        kill_all(children)


def test_no_children_is_the_main_process_alone() -> None:
    reading = ProcessTreeMeter(os.getpid()).sample([])
    assert isinstance(reading, TreeReading)
    assert reading.children == {}
    assert reading.worker_bytes == reading.main_bytes == reading.rss[os.getpid()] > 0
