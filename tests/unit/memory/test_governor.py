"""The governor's policy with fake readings: pause, resume, unload, kill, dead reservations (docs/design.md#governor).

The actuator, the meter, the clock and ``alive`` are fakes; the ledger is real (in tmp_path),
so what pool processes would read from the control block is checked too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rmq.core.config import load_config
from rmq.core.ledger import KIND_MODEL, KIND_TASK, Entry, Ledger
from rmq.memory.budget import Budget
from rmq.memory.governor import Governor, KillRecord
from rmq.memory.meter import TreeReading
from rmq.memory.probes import CgroupMemory

MiB = 1024**2
BUDGET = 1000 * MiB
MAIN = 1


class FakeActuator:
    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.calls: list[tuple] = []

    def pool_pids(self) -> list[int]:
        return list(self.pids)

    def pause(self) -> None:
        self.calls.append(("pause",))

    def resume(self) -> None:
        self.calls.append(("resume",))

    def kill(self, pid: int) -> None:
        self.calls.append(("kill", pid))

    def kills(self) -> list[int]:
        return [c[1] for c in self.calls if c[0] == "kill"]


class FakeMeter:
    """Returns the reading set in ``self.rss`` (pid -> bytes; main counted, children as private)."""

    def __init__(self) -> None:
        self.main_bytes = 100 * MiB
        self.children: dict[int, int] = {}
        self.extra = 0  # memory not attributed to a pool child (to reach any total)
        self.asked: list[list[int]] = []
        self.descendants: dict[int, dict[int, int]] = {}  # pool pid -> {descendant: bytes}
        self.strays: dict[int, tuple[int, int]] = {}  # pid -> (former owner, bytes)
        self.zombies: list[int] = []
        self.late: dict[int, list[int]] = {}  # pool pid -> descendants that show only once it is stopped
        self.reads = 0

    def sample(self, pids) -> TreeReading:
        pids = list(pids)
        self.asked.append(pids)
        children = {p: b for p, b in self.children.items() if p in pids}
        rss = {MAIN: self.main_bytes + self.extra, **children}
        descendants = {p: dict(t) for p, t in self.descendants.items() if p in children}
        trees = {p: b + sum(descendants.get(p, {}).values()) for p, b in children.items()}
        strays = {p: b for p, (_, b) in self.strays.items()}
        total = self.main_bytes + self.extra + sum(trees.values()) + sum(strays.values())
        return TreeReading(total, self.main_bytes + self.extra, trees, rss, descendants, strays,
                           {p: o for p, (o, _) in self.strays.items()}, list(self.zombies))

    def tree_now(self, pool_pid: int) -> list[int]:
        self.reads += 1
        found = list(self.descendants.get(pool_pid, {}))
        return found + (self.late.get(pool_pid, []) if self.reads > 1 else [])

    def total(self, worker_bytes: int) -> None:
        """Make the next readings total ``worker_bytes``."""
        self.extra = 0
        self.extra = worker_bytes - self.main_bytes - sum(self.children.values())
        self.extra -= sum(sum(t.values()) for p, t in self.descendants.items() if p in self.children)
        self.extra -= sum(b for _, b in self.strays.values())
        assert self.extra >= 0


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


class World:
    def __init__(self, tmp_path: Path, budget: Budget | None = None) -> None:
        self.ledger = Ledger(str(tmp_path / "rt"), create=True)
        self.actuator = FakeActuator([11, 12, 13])
        self.meter = FakeMeter()
        self.clock = Clock()
        self.dead: set[int] = set()
        self.signals: list[tuple[int, int]] = []
        self.reaped: list[int] = []
        self.config = load_config({}, {})
        self.budget = budget or Budget(BUDGET, "configured", 2 * BUDGET)
        self.gov = Governor(
            self.config, self.budget, self.ledger, self.actuator, meter=self.meter, cpu_slots=4,
            clock=self.clock, alive=lambda pid: pid not in self.dead,
            signal_pid=lambda pid, sig: self.signals.append((pid, sig)),
            reap=lambda pid: self.reaped.append(pid) is None,
        )

    def at(self, worker_bytes: int, dt: float = 0.25) -> None:
        """One tick, ``dt`` seconds after the previous one, with the worker at ``worker_bytes``."""
        self.clock.t += dt
        self.meter.total(worker_bytes)
        self.gov.tick()

    def reserve(self, pid: int, task_id: str, memory: int, start_rss: int = 0, started: float = 0.0,
                kind: int = KIND_TASK) -> Entry:
        e = Entry(kind, pid, memory, task_id=task_id, name=f"media.{task_id}", start_rss=start_rss,
                  started=started)
        assert self.ledger.try_add(e, lambda _: True)
        return e


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.gov.stop()
    w.ledger.close()


def pct(ratio: float) -> int:
    return int(BUDGET * ratio)


# --- pause and resume --------------------------------------------------------------------------------
def test_pause_edge_at_085_and_resume_below_075(world: World) -> None:
    world.at(pct(0.84))
    assert world.actuator.calls == []
    world.at(pct(0.85))
    assert world.actuator.calls == [("pause",)]
    assert world.gov.paused and world.ledger.read_control().paused
    # no second pause while paused, no resume inside the hysteresis band
    for r in (0.90, 0.80, 0.76, 0.75):
        world.at(pct(r))
    assert world.actuator.calls == [("pause",)]
    assert world.ledger.read_control().zone == "pause"
    world.at(pct(0.74))
    assert world.actuator.calls == [("pause",), ("resume",)]
    assert not world.gov.paused and not world.ledger.read_control().paused
    assert world.gov.counters["pauses"] == 1


def test_readings_are_published_in_the_control_block(world: World) -> None:
    before = time.time()
    world.at(pct(0.5))
    c = world.ledger.read_control()
    assert (c.worker_bytes, c.budget_bytes, c.admit_line_bytes) == (pct(0.5), BUDGET, pct(0.85))
    assert (c.zone, c.cpu_slots, c.paused) == ("ok", 4, False)
    assert before <= c.sample_time <= time.time()
    assert world.meter.asked[-1] == [11, 12, 13]  # the pool's pids from the actuator
    assert world.gov.peak_bytes == pct(0.5)
    world.at(pct(0.3))
    assert world.gov.peak_bytes == pct(0.5)
    assert world.gov.zone == "ok"


# --- unloading ---------------------------------------------------------------------------------------
def test_unload_generation_increments_and_repeats_while_above_target(world: World) -> None:
    world.at(pct(0.79))
    assert world.ledger.read_control().unload_generation == 0
    world.at(pct(0.80))
    c = world.ledger.read_control()
    assert (c.unload_generation, c.zone) == (1, "unload")
    assert c.unload_bytes == pct(0.80) - pct(0.70)
    world.at(pct(0.78), dt=0.25)  # still above the target, before the repeat interval
    assert world.ledger.read_control().unload_generation == 1
    # the figure stays with its generation, so a watcher polling later still reads it
    assert world.ledger.read_control().unload_bytes == pct(0.80) - pct(0.70)
    world.at(pct(0.78), dt=1.0)  # a repeat
    assert world.ledger.read_control().unload_generation == 2
    world.at(pct(0.69))  # below the target: the episode ends
    world.at(pct(0.75), dt=5.0)
    assert world.ledger.read_control().unload_generation == 2
    assert world.gov.counters["unload_requests"] == 2


def test_pool_process_unload_request_is_relayed(world: World) -> None:
    world.at(pct(0.5))
    assert world.ledger.read_control().unload_generation == 0
    # a pool process whose task does not fit asks for 200 MiB
    other = Ledger(world.ledger.directory)
    try:
        other.request_unload(200 * MiB)
    finally:
        other.close()
    world.at(pct(0.5))
    c = world.ledger.read_control()
    assert (c.unload_generation, c.unload_bytes) == (1, 200 * MiB)
    world.at(pct(0.5))  # relayed once
    assert world.ledger.read_control().unload_generation == 1


# --- killing -----------------------------------------------------------------------------------------
def test_kill_selects_the_task_exceeding_its_declaration_most(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=50 * MiB, started=1.0)  # uses 350, 250 over
    world.reserve(12, "b", 100 * MiB, start_rss=50 * MiB, started=3.0)  # uses 150, 50 over (newest)
    world.reserve(13, "c", 400 * MiB, start_rss=50 * MiB, started=2.0)  # uses 150, under
    world.meter.children = {11: 400 * MiB, 12: 200 * MiB, 13: 200 * MiB}
    world.at(pct(0.94))
    assert world.actuator.kills() == []
    world.at(pct(0.95))
    assert world.actuator.kills() == [11]
    assert world.gov.counters["killed"] == 1
    assert world.ledger.read_control().zone == "kill"
    # the governor wrote each task's usage and peak into the ledger
    used = {e.task_id: (e.used_bytes, e.peak_used_bytes) for e in world.ledger.entries()}
    assert used == {"a": (350 * MiB,) * 2, "b": (150 * MiB,) * 2, "c": (150 * MiB,) * 2}


def test_kill_record_carries_the_figures_once(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=50 * MiB)
    world.meter.children = {11: 400 * MiB}
    world.at(pct(0.96))
    detected = world.clock.t
    record = world.gov.pop_kill("a")
    assert record == KillRecord(
        task_id="a", task_name="media.a", pid=11, observed_bytes=400 * MiB, declared_bytes=100 * MiB,
        budget_bytes=BUDGET, detected_at=detected, killed_at=detected,
        room_bytes=world.gov.admit_line - world.gov.idle_bytes, neighbours=0,
    )
    assert world.gov.pop_kill("a") is None
    assert world.gov.pop_kill("never-killed") is None


def test_recent_kills_stay_in_the_snapshot_after_the_record_is_consumed(world: World) -> None:
    world.gov.recent_kills = deque(maxlen=2)  # keeps the last RECENT_KILLS (20); two show the bound
    before = time.time()
    for pid, task in ((11, "a"), (12, "b"), (13, "c")):
        world.reserve(pid, task, 100 * MiB, start_rss=50 * MiB)
        world.meter.children = {pid: 400 * MiB}
        world.at(pct(0.96), dt=3.0)  # past the 2 s between two kills
        assert world.gov.pop_kill(task) is not None  # the request handler consumed it
        world.ledger.release_dead(lambda p, pid=pid: p != pid)
        world.meter.children = {}
    kills = world.gov.memory_snapshot()["recent_kills"]
    assert [k["task_id"] for k in kills] == ["b", "c"]  # the newest, oldest first
    assert kills[-1] == {
        "task_id": "c", "task_name": "media.c", "pid": 13, "observed_bytes": 400 * MiB,
        "declared_bytes": 100 * MiB, "budget_bytes": BUDGET, "worker_bytes": pct(0.96),
        "time": kills[-1]["time"],
    }
    assert before <= kills[0]["time"] <= kills[1]["time"] <= time.time()
    assert world.gov.counters["killed"] == 3


def test_the_snapshot_reports_kernel_oom_kills_of_the_cgroup(tmp_path: Path) -> None:
    cg_dir = tmp_path / "cg"
    cg_dir.mkdir()
    (cg_dir / "memory.current").write_text(str(pct(0.3)))
    (cg_dir / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    w = World(tmp_path, Budget(BUDGET, "cgroup-v2", BUDGET, CgroupMemory(2, cg_dir, BUDGET)))
    try:
        w.at(pct(0.3))
        assert w.gov.memory_snapshot()["oom_kills"] == 2
    finally:
        w.ledger.close()


def test_kill_the_newest_when_no_task_exceeds_its_declaration(world: World) -> None:
    world.reserve(11, "old", 500 * MiB, start_rss=0, started=100.0)
    world.reserve(12, "new", 500 * MiB, start_rss=0, started=200.0)
    world.reserve(13, "mid", 500 * MiB, start_rss=0, started=150.0)
    world.meter.children = {11: 200 * MiB, 12: 100 * MiB, 13: 300 * MiB}
    world.at(pct(0.97))
    assert world.actuator.kills() == [12]


def test_models_are_never_killed_as_tasks(world: World) -> None:
    world.reserve(11, "whisper", 100 * MiB, kind=KIND_MODEL)
    world.meter.children = {11: 800 * MiB}
    world.at(pct(0.99))
    assert world.actuator.kills() == []


def test_no_second_kill_while_the_killed_process_is_still_there(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=0, started=1.0)
    world.reserve(12, "b", 100 * MiB, start_rss=0, started=2.0)
    world.meter.children = {11: 500 * MiB, 12: 300 * MiB}
    world.at(pct(0.96))
    assert world.actuator.kills() == [11]
    # the pool has not reaped pid 11 yet: its memory still counts, but one kill is enough
    for _ in range(3):
        world.at(pct(0.96), dt=0.25)
    assert world.actuator.kills() == [11]
    # once pid 11 is gone and the worker is still above the kill line, the next task goes
    world.actuator.pids.remove(11)
    del world.meter.children[11]
    world.at(pct(0.96), dt=0.25)
    assert world.actuator.kills() == [11, 12]


def test_a_kill_that_did_not_take_effect_is_followed_by_another_after_2s(world: World) -> None:
    world.reserve(11, "a", 100 * MiB, start_rss=0, started=1.0)
    world.reserve(12, "b", 100 * MiB, start_rss=0, started=2.0)
    world.meter.children = {11: 500 * MiB, 12: 300 * MiB}
    world.at(pct(0.96))
    world.at(pct(0.96), dt=1.9)
    assert world.actuator.kills() == [11]
    world.at(pct(0.96), dt=0.2)  # 2.1 s after the first kill, pid 11 still there
    assert world.actuator.kills() == [11, 12]  # never the same task twice


def test_above_kill_line_without_governed_tasks_logs_and_kills_nothing(world: World, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="rmq.memory.governor"):
        world.at(pct(0.99))
    assert world.actuator.kills() == []
    assert "no governed task to kill" in caplog.text


# --- dead processes and idle memory ------------------------------------------------------------------
def test_release_dead_drops_reservations_of_dead_pids(world: World, caplog) -> None:
    world.reserve(11, "alive", 100 * MiB)
    world.reserve(77, "ghost", 300 * MiB)
    world.dead.add(77)
    with caplog.at_level(logging.WARNING, logger="rmq.memory.governor"):
        world.at(pct(0.5))
    assert [e.task_id for e in world.ledger.entries()] == ["alive"]
    assert world.gov.counters["dead_released"] == 1
    assert "media.ghost[ghost] pid 77" in caplog.text


def test_idle_bytes_is_worker_memory_minus_models_when_no_task_runs(world: World) -> None:
    world.reserve(11, "whisper", 200 * MiB, kind=KIND_MODEL)
    world.at(500 * MiB)
    assert world.gov.idle_bytes == 300 * MiB
    assert world.ledger.read_control().idle_bytes == 300 * MiB
    # while tasks run, the idle figure is kept from the last idle moment
    world.reserve(12, "job", 100 * MiB)
    world.at(800 * MiB)
    assert world.ledger.read_control().idle_bytes == 300 * MiB


def test_cgroup_working_set_counts_when_larger(tmp_path: Path) -> None:
    cg_dir = tmp_path / "cg"
    cg_dir.mkdir()
    (cg_dir / "memory.current").write_text(str(pct(0.90)))
    (cg_dir / "memory.stat").write_text(f"inactive_file {pct(0.02)}\n")
    budget = Budget(BUDGET, "cgroup-v2", BUDGET, CgroupMemory(2, cg_dir, BUDGET))
    w = World(tmp_path, budget)
    try:
        # the process tree looks small, but the cgroup (page cache, other processes) is at 88 %
        w.at(pct(0.40))
        c = w.ledger.read_control()
        assert c.worker_bytes == pct(0.90) - pct(0.02)
        assert w.actuator.calls == [("pause",)]
        snap = w.gov.memory_snapshot()
        assert snap["cgroup_working_set_bytes"] == pct(0.90) - pct(0.02)
        assert snap["budget_source"] == "cgroup-v2"
    finally:
        w.ledger.close()


# --- snapshot and loop -------------------------------------------------------------------------------
def test_memory_snapshot_schema(world: World) -> None:
    world.meter.children = {11: 50 * MiB}
    world.at(pct(0.8))
    snap = world.gov.memory_snapshot()
    assert set(snap) == {
        "budget_bytes", "budget_source", "limit_bytes", "worker_bytes", "main_bytes", "children",
        "cgroup_working_set_bytes", "host_total_bytes", "host_available_bytes", "peak_bytes", "ratio",
        "zone", "admit_line_bytes", "idle_bytes", "descendants", "strays", "line_ratios", "oom_kills",
        "recent_kills", "accounting", "lines_source",
    }
    assert snap["accounting"]["mode"] == "proc" and snap["accounting"]["wakeups"] == "polling"
    assert snap["lines_source"] == "polling defaults"
    assert snap["line_ratios"] == {"admit": 0.85, "unload": 0.80, "pause": 0.85, "resume": 0.75, "kill": 0.95}
    assert snap["oom_kills"] is None and snap["recent_kills"] == []  # no cgroup, no kill
    assert snap["budget_bytes"] == BUDGET and snap["budget_source"] == "configured"
    assert snap["worker_bytes"] == pct(0.8)
    assert snap["ratio"] == pytest.approx(0.8, abs=1e-3)
    assert snap["zone"] == "unload"
    assert snap["children"] == {"11": 50 * MiB}
    assert snap["cgroup_working_set_bytes"] is None
    assert snap["host_total_bytes"] > 0


def test_the_loop_ticks_until_stopped(world: World) -> None:
    world.meter.total(pct(0.86))
    world.gov.start()
    deadline = time.monotonic() + 5
    while world.gov.ticks < 2:
        assert time.monotonic() < deadline, "the governor loop did not tick"
        time.sleep(0.02)
    world.gov.stop()
    assert not world.gov._loop.running
    assert world.actuator.calls[0] == ("pause",)
    ticks = world.gov.ticks
    time.sleep(0.3)
    assert world.gov.ticks == ticks


def test_a_failing_tick_does_not_stop_the_loop(world: World, caplog) -> None:
    calls = []

    def broken(pids):
        calls.append(1)
        raise OSError("reading failed")

    world.meter.sample = broken
    with caplog.at_level(logging.ERROR, logger="rmq.memory.governor"):
        world.gov.start()
        deadline = time.monotonic() + 5
        while len(calls) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        world.gov.stop()
    assert "rmq governor tick failed" in caplog.text


# --- a stale victim, with a real process -------------------------------------------------------------
SWAPPER = """
    import os, sys, time
    from rmq.core.ledger import Entry, KIND_TASK, Ledger
    led = Ledger(sys.argv[1])
    old = Entry(KIND_TASK, os.getpid(), 100 << 20, task_id="old", name="media.old")
    assert led.try_add(old, lambda _: True)
    print("holding", flush=True)
    sys.stdin.readline()  # the task ends and the pool hands this process the next one
    assert led.release(old) is not None
    assert led.try_add(Entry(KIND_TASK, os.getpid(), 100 << 20, task_id="new", name="media.new"), lambda _: True)
    print("swapped", flush=True)
    time.sleep(60)
"""


def test_a_task_that_ended_before_the_kill_is_not_killed_for_its_successor(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from rmq.memory.governor import kill_pid

    root = str(Path(__file__).resolve().parents[3])
    world = World(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SWAPPER), world.ledger.directory],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        world.actuator.pids = [proc.pid]
        world.gov.alive = lambda pid: True
        world.meter.children = {proc.pid: 400 * MiB}  # far above its 100 MiB declaration

        # Given a tick that reads the ledger while "old" runs in the process, and that process ending
        # "old" and starting "new" after that read (here: while the governor pauses fetching)
        def pause() -> None:
            world.actuator.calls.append(("pause",))
            proc.stdin.write("next\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "swapped"

        world.actuator.pause = pause  # type: ignore[method-assign]
        world.actuator.kill = lambda pid: (world.actuator.calls.append(("kill", pid)), kill_pid(pid))  # type: ignore[method-assign]
        # When the worker is in the kill zone
        world.at(pct(0.97))
        # Then the process that now runs "new" is not killed for "old"
        time.sleep(0.1)
        assert proc.poll() is None, "the process running 'new' was killed for 'old'"
        assert world.gov.pop_kill("old") is None and world.gov.counters["killed"] == 0
        assert [e.task_id for e in world.ledger.entries()] == ["new"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()
        world.ledger.close()


# --- kernel accounting (docs/design.md#kernel-accounting) ------------------------------------------
class FakeEvents:
    """The kernel's memory events, as :class:`~rmq.memory.kernel_events.KernelEvents` gives them."""

    mode, reason, hold_reason = "eventfd", "fake", None

    def __init__(self) -> None:
        self.thresholds: list[int] = []
        self.held = False
        self.oom = False
        self.high: list[int] = []
        self.closed = threading.Event()

    def set_thresholds(self, thresholds) -> None:
        self.thresholds = list(thresholds)

    def set_thresholds_soon(self, thresholds) -> None:
        self.thresholds = list(thresholds)

    def watch_worker(self, worker, thresholds) -> None:
        self.worker_thresholds = list(thresholds)

    def set_high(self, value: int) -> None:
        self.high.append(value)

    def hold_oom(self) -> bool:
        self.held = True
        return True

    def release_oom(self) -> None:
        self.held = False

    def under_oom(self) -> bool:
        return self.oom

    def wait(self, timeout_s: float) -> list[str]:
        self.closed.wait(timeout_s)  # the tests tick by hand: the loop only waits
        return []

    def close(self) -> None:
        self.closed.set()


def _kernel_world(tmp_path: Path, lines=None):
    from rmq.memory.lines import KERNEL
    from rmq.memory.pool_cgroups import choose_accounting

    cg_path = tmp_path / "cg"
    cg_path.mkdir()
    (cg_path / "memory.limit_in_bytes").write_text(str(BUDGET))
    cgroup = CgroupMemory(1, cg_path, BUDGET)
    acc = choose_accounting(cgroup, MAIN)
    assert acc.pools is not None
    ledger = Ledger(str(tmp_path / "rt"), create=True)
    actuator, meter, events = FakeActuator([11, 12]), FakeMeter(), FakeEvents()

    def kernel(worker: int, pools: dict[int, int]) -> None:
        (cg_path / "memory.usage_in_bytes").write_text(str(worker))
        (cg_path / "memory.stat").write_text("total_inactive_file 0\n")
        fill_root = acc.pools.root
        (fill_root / "memory.usage_in_bytes").write_text(str(sum(pools.values())))
        for pid, used in pools.items():
            d = acc.pools.path_for(pid)
            d.mkdir(exist_ok=True)
            (d / "memory.usage_in_bytes").write_text(str(used))
            (d / "memory.stat").write_text("total_inactive_file 0\n")
            (d / "cgroup.procs").write_text(f"{pid}\n")

    kernel(100 * MiB, {11: 10 * MiB, 12: 10 * MiB})
    gov = Governor(load_config({"rmq_monitor_interval": "1h"}, {}), Budget(BUDGET, "cgroup-v1", BUDGET, cgroup),
                   ledger, actuator,
                   meter=meter, clock=Clock(), alive=lambda pid: True, signal_pid=lambda pid, sig: None,
                   reap=lambda pid: False, accounting=acc, lines=lines or KERNEL, events=events)
    return gov, ledger, actuator, meter, events, kernel, acc


def _held_at_cap(kernel: Callable[[int, dict[int, int]], None], events: FakeEvents, main_share: int,
                 cap: int) -> None:
    """The kernel holds pool 11's runaway at the pools' cap ``cap`` (its OOM event up), pool 12 idle
    beside it, the main process holding ``main_share`` outside the pools."""
    kernel(main_share + cap, {11: cap - 10 * MiB, 12: 10 * MiB})
    events.oom = True


def test_kernel_accounting_reads_the_kernels_counts_caps_the_pools_and_holds_bursts(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    try:
        gov.start()
        # the pools are capped so that the worker reaches the kill line (0.985) when they reach the cap:
        # the main process's share is the worker's count less the pools' (100 - 20 MiB)
        assert (acc.pools.root / "memory.limit_in_bytes").read_text() == str(int(BUDGET * 0.985) - 80 * MiB)
        # woken at each line, and at the kill line a charge batch short of the cap, where the kernel's
        # count may stop
        assert events.held and events.thresholds == sorted(
            [int(BUDGET * r) - 80 * MiB for r in {0.97, 0.93, 0.98}] + [int(BUDGET * 0.985) - 80 * MiB - 512 * 1024])
        # and at the same lines of the worker's own count, whatever share the main process grows to
        assert events.worker_thresholds == sorted(int(BUDGET * r) for r in {0.97, 0.93, 0.98, 0.985})
        # a task in pool 11 measured from its cgroup's count at admission
        ledger.try_add(Entry(KIND_TASK, 11, 100 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                       lambda _: True)
        ledger.try_add(Entry(KIND_TASK, 12, 100 * MiB, task_id="b", name="media.b", start_rss=10 * MiB),
                       lambda _: True)
        # /proc would see far more (shared pages counted twice); the kernel's count is the reading
        meter.children = {11: 700 * MiB, 12: 700 * MiB}
        kernel(600 * MiB, {11: 310 * MiB, 12: 210 * MiB})
        gov.tick()
        assert ledger.read_control().worker_bytes == 600 * MiB
        assert {e.task_id: e.used_bytes for e in ledger.entries()} == {"a": 300 * MiB, "b": 200 * MiB}
        assert actuator.kills() == []
        # when the kernel holds the pools at their cap, the governor kills at once, the worst first
        events.oom = True
        kernel(900 * MiB, {11: 510 * MiB, 12: 310 * MiB})
        gov.tick()
        assert actuator.kills() == [11]
        record = gov.pop_kill("a")
        assert record is not None and record.observed_bytes == 500 * MiB
        assert record.room_bytes == int(BUDGET * 0.97) - gov.idle_bytes
        # and not a second one while the first one's memory is still in its cgroup
        gov.tick()
        assert actuator.kills() == [11]
    finally:
        gov.stop()
        ledger.close()
    assert not events.held  # the kernel's OOM killer is given back on stop


def test_pools_a_charge_batch_short_of_their_cap_are_held_and_a_stale_oom_event_kills_nobody(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    try:
        gov.start()
        cap = int(BUDGET * 0.985) - 80 * MiB
        for pid, task_id in ((11, "a"), (12, "b")):
            ledger.try_add(Entry(KIND_TASK, pid, 100 * MiB, task_id=task_id, name="media.a", start_rss=10 * MiB),
                           lambda _: True)
        meter.children = {11: 500 * MiB, 12: 300 * MiB}
        # the kernel reports no OOM yet (it is still reclaiming), and the worker's reading is under the
        # kill line; but the pools are within a charge batch of their cap: their allocations wait
        kernel(80 * MiB + cap - MiB // 4, {11: cap - 300 * MiB, 12: 300 * MiB - MiB // 4})
        gov.tick()
        assert actuator.kills() == [11]
        # the OOM event that this burst raised, read once the kill freed the memory: nobody else dies
        kernel(600 * MiB, {11: 10 * MiB, 12: 300 * MiB})
        (acc.pools.path_for(11) / "cgroup.procs").write_text("")
        gov.woken = ["oom"]
        gov.tick()
        assert actuator.kills() == [11]
    finally:
        gov.stop()
        ledger.close()


def test_the_pools_cap_follows_the_main_process_down_only_once_it_stayed_smaller(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    limit = acc.pools.root / "memory.limit_in_bytes"
    try:
        gov.start()
        assert limit.read_text() == str(int(BUDGET * 0.985) - 80 * MiB)
        # the main process's share grows (the pool replaced a process): the cap comes down at once
        kernel(140 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.tick()
        assert limit.read_text() == str(int(BUDGET * 0.985) - 120 * MiB)
        # it dips (an old process's pages freed) and grows back within seconds: the cap stays, so that
        # the tasks never fill a dip the main process needs back
        kernel(80 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.clock.t += 1
        gov.tick()
        assert limit.read_text() == str(int(BUDGET * 0.985) - 120 * MiB)
        # smaller for the whole window: the room goes back to the pools
        gov.clock.t += 3
        gov.tick()
        assert limit.read_text() == str(int(BUDGET * 0.985) - 60 * MiB)
    finally:
        gov.stop()
        ledger.close()


def test_pools_held_at_a_cap_kept_for_a_dip_go_on_to_the_kill_line_as_far_as_the_limit_allows(tmp_path) -> None:
    from rmq.memory.lines import kernel_lines

    lines = kernel_lines(BUDGET)  # a small worker: 48 MiB between the kill line and the limit
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path, lines)
    limit = acc.pools.root / "memory.limit_in_bytes"
    line = int(BUDGET * lines.kill)
    try:
        gov.start()
        ledger.try_add(Entry(KIND_TASK, 11, 100 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                       lambda _: True)
        meter.children = {11: 700 * MiB, 12: 10 * MiB}
        # the main process's share grows to 120 MiB, then dips to 60 (a pool process replaced)
        kernel(140 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.tick()
        kernel(80 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.clock.t += 1
        gov.tick()
        assert limit.read_text() == str(line - 120 * MiB)
        # a runaway reaches that cap and the kernel holds it there, 60 MiB short of the kill line: the
        # cap rises by the 32 MiB the limit leaves over the line (less 16), and nobody is killed yet
        cap = line - 120 * MiB
        _held_at_cap(kernel, events, 60 * MiB, cap)
        gov.tick()
        room = BUDGET - line - 16 * MiB
        assert limit.read_text() == str(line - 120 * MiB + room)
        assert actuator.kills() == []
        # held again at the raised cap (the main process may grow back to 120 MiB and still fit): killed
        cap += room
        _held_at_cap(kernel, events, 60 * MiB, cap)
        gov.tick()
        assert actuator.kills() == [11]
    finally:
        gov.stop()
        ledger.close()


def test_pools_held_at_a_cap_a_mib_short_of_the_line_are_let_go_on_to_it_before_a_kill(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    limit = acc.pools.root / "memory.limit_in_bytes"
    line = int(BUDGET * 0.985)
    try:
        gov.start()
        ledger.try_add(Entry(KIND_TASK, 11, 100 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                       lambda _: True)
        meter.children = {11: 700 * MiB, 12: 10 * MiB}
        assert limit.read_text() == str(line - 80 * MiB)
        # the main process's share fell by 2 MiB while a runaway grew (no refit on a moving count); the
        # kernel holds the runaway at the cap, the worker 2 MiB short of its kill line: the cap rises to
        # the line, and nobody is killed in that tick
        cap = line - 80 * MiB
        _held_at_cap(kernel, events, 78 * MiB, cap)
        gov.tick()
        assert limit.read_text() == str(line - 78 * MiB)
        assert actuator.kills() == []
        # held again at the line: killed
        cap += 2 * MiB
        _held_at_cap(kernel, events, 78 * MiB, cap)
        gov.tick()
        assert actuator.kills() == [11]
    finally:
        gov.stop()
        ledger.close()


def test_a_pool_process_stuck_holding_the_ledgers_lock_does_not_stop_the_kill_that_frees_it(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)", ledger.lock_path],
        stdout=subprocess.PIPE, text=True)
    try:
        gov.start()
        cap = int(BUDGET * 0.985) - 80 * MiB
        ledger.try_add(Entry(KIND_TASK, 11, 100 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                       lambda _: True)
        meter.children = {11: 700 * MiB, 12: 10 * MiB}
        # a pool process admitting its task holds the lock, stopped by the kernel on a page it touched
        # beside pools held at their cap: it waits for a kill
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        _held_at_cap(kernel, events, 80 * MiB, cap)
        started = time.monotonic()
        gov.tick()
        # the tick gave up on the lock after its 50 ms, and killed without it
        assert time.monotonic() - started < 2.0
        assert actuator.kills() == [11]
        assert gov.pop_kill("a") is not None
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
        gov.stop()
        ledger.close()


def test_the_pools_cap_is_never_written_under_what_they_hold_by_the_time_of_the_write(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    limit = acc.pools.root / "memory.limit_in_bytes"
    try:
        gov.start()
        cap = int(BUDGET * 0.985) - 80 * MiB
        # the main process grows while the pools hold a runaway well under their cap: lowered, the cap
        # stays 16 MiB above what they held (they may have grown since the reading)
        kernel(250 * MiB + cap - 100 * MiB, {11: cap - 110 * MiB, 12: 10 * MiB})
        gov.tick()
        assert int(limit.read_text()) == cap - 100 * MiB + 16 * MiB
        # held at that cap, and the main process grows again: the cap stays where it is, at or
        # above what they hold, and the worker's kill line deals with the runaway
        kernel(300 * MiB + cap - 84 * MiB, {11: cap - 94 * MiB - MiB // 2, 12: 10 * MiB})
        gov.tick()
        assert int(limit.read_text()) == cap - 100 * MiB + 16 * MiB
    finally:
        gov.stop()
        ledger.close()


def test_the_pools_cap_ignores_a_reading_taken_while_memory_moved_between_its_two_counts(tmp_path,
                                                                                        monkeypatch) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    limit = acc.pools.root / "memory.limit_in_bytes"
    try:
        gov.start()
        fitted = limit.read_text()
        # a burst grows the pools by 200 MiB between their count and the worker's: read as a main process
        # 200 MiB larger, it would have cut the pools' cap by as much for seconds (as would a kill
        # freeing between the worker's count and the pools')
        kernel(100 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        counts = iter([20 * MiB, 220 * MiB])

        class Moving:  # the pools' cgroup, counted twice in one refit
            def usage_bytes(self) -> int:
                return next(counts, 220 * MiB)

        monkeypatch.setattr(type(acc.pools), "pools_cgroup", property(lambda self: Moving()))
        (tmp_path / "cg" / "memory.usage_in_bytes").write_text(str(300 * MiB))  # read after the growth
        gov.tick()
        assert limit.read_text() == fitted
    finally:
        gov.stop()
        ledger.close()


def test_with_nothing_to_kill_the_choice_goes_back_to_the_kernel(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    try:
        gov.start()
        events.oom = True  # held at the cap, and no governed task runs
        kernel(990 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.tick()
        assert actuator.kills() == [] and not events.held and gov.accounting_info()["oom_hold"] is False
        events.oom = False  # back in the ok zone (and the pools' cap back to the main process's share): held again
        kernel(100 * MiB, {11: 10 * MiB, 12: 10 * MiB})
        gov.clock.t += 11
        gov.tick()
        assert events.held
    finally:
        gov.stop()
        ledger.close()


def test_held_at_the_cap_with_nobody_over_their_reservation_the_largest_is_killed(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    try:
        gov.start()
        # an older task using 300 MiB of its 310, and a re-run just started (40 of its 310)
        ledger.try_add(Entry(KIND_TASK, 11, 310 * MiB, task_id="old", name="media.a", start_rss=10 * MiB,
                             started=1.0), lambda _: True)
        ledger.try_add(Entry(KIND_TASK, 12, 310 * MiB, task_id="new", name="media.a", start_rss=10 * MiB,
                             started=2.0), lambda _: True)
        meter.children = {11: 310 * MiB, 12: 50 * MiB}
        events.oom = True
        kernel(900 * MiB, {11: 310 * MiB, 12: 50 * MiB})
        gov.tick()
        assert actuator.kills() == [11]  # not the newest: killing it again would free nothing
        # and what admission let in did not fit: it admits less for a while
        events.oom = False
        kernel(600 * MiB, {11: 10 * MiB, 12: 50 * MiB})
        gov.tick()
        assert ledger.read_control().admit_line_bytes == gov.admit_line - 32 * MiB
    finally:
        gov.stop()
        ledger.close()


def _held_and_one_killed(tmp_path):
    """Two tasks over their reservations with the pools held: the first tick kills pool 11's."""
    world = gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    gov.start()
    for pid, task_id in ((11, "a"), (12, "b")):
        ledger.try_add(Entry(KIND_TASK, pid, 100 * MiB, task_id=task_id, name="media.a", start_rss=10 * MiB),
                       lambda _: True)
    meter.children = {11: 500 * MiB, 12: 400 * MiB}
    events.oom = True
    kernel(990 * MiB, {11: 510 * MiB, 12: 410 * MiB})
    gov.tick()
    assert actuator.kills() == [11]
    return world


def test_a_killed_pool_process_shown_as_a_zombie_frees_only_once_its_cgroup_count_falls(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _held_and_one_killed(tmp_path)
    try:
        # its main thread has exited (a zombie), but another thread still holds its memory: the
        # kernel still holds the pools, and nobody else is killed for that one excess
        gov.alive = lambda pid: pid != 11
        gov.tick()
        assert actuator.kills() == [11]
        # the memory is back (the cgroup holds what it held at admission): a new excess is another
        # task's, killed on a reading taken after the memory came back
        kernel(990 * MiB, {11: 12 * MiB, 12: 900 * MiB})
        meter.children = {12: 900 * MiB}
        gov.tick()
        assert actuator.kills() == [11, 12]
    finally:
        gov.stop()
        ledger.close()


def test_a_kill_freed_after_the_ticks_reading_is_not_followed_by_another_on_that_reading(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _held_and_one_killed(tmp_path)
    try:
        # the reading says the kill still frees (the cgroup holds 510 MiB); it is done by the time the
        # governor would choose again: the reading is stale, and no one else dies on it
        tidy = gov.trees.tidy

        def freed_meanwhile(*args):  # runs between the reading and the choice
            (acc.pools.path_for(11) / "memory.usage_in_bytes").write_text(str(12 * MiB))
            gov.alive = lambda pid: pid != 11
            tidy(*args)

        gov.trees.tidy = freed_meanwhile  # type: ignore[method-assign]
        gov.tick()
        assert actuator.kills() == [11]
    finally:
        gov.stop()
        ledger.close()


def test_a_zombie_left_in_a_killed_pool_cgroup_is_reaped_and_does_not_hold_up_the_next_kill(tmp_path) -> None:
    gov, ledger, actuator, meter, events, kernel, acc = _kernel_world(tmp_path)
    reaped: list[int] = []
    gov.trees.reap = lambda pid: reaped.append(pid) or True
    try:
        gov.start()
        ledger.try_add(Entry(KIND_TASK, 11, 100 * MiB, task_id="a", name="media.a", start_rss=10 * MiB),
                       lambda _: True)
        meter.children = {11: 600 * MiB, 12: 10 * MiB}
        events.oom = True
        kernel(900 * MiB, {11: 610 * MiB, 12: 10 * MiB})
        gov.tick()
        assert actuator.kills() == [11]
        # the killed task's subprocess (pid 4242) ended, orphaned to the main process, unreaped: a
        # zombie holds no memory, but stays in the cgroup's list until its parent reaps it
        ledger.try_add(Entry(KIND_TASK, 12, 100 * MiB, task_id="b", name="media.b", start_rss=10 * MiB),
                       lambda _: True)
        meter.children = {12: 600 * MiB}
        kernel(900 * MiB, {11: 0, 12: 610 * MiB})
        (acc.pools.path_for(11) / "cgroup.procs").write_text("4242\n")
        gov.alive = lambda pid: pid != 4242
        gov.tick()
        assert 4242 in reaped and actuator.kills() == [11, 12]
        # a killed pool process seen as a zombie is left to the pool, which reaps it and so learns that
        # its task was lost: reaped here, the task never ended
        gov.alive = lambda pid: pid not in (4242, 12)
        for _ in range(3):
            gov.tick()
        assert 12 not in reaped
    finally:
        gov.stop()
        ledger.close()
