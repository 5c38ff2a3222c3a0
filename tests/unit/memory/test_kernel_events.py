"""Kernel wake-ups on fake cgroup v1 and v2 trees: mode and reason, what is registered with the
kernel, holding off the OOM killer and restoring it, counters, waiting and closing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from rmq.memory.kernel_events import KernelEvents, open_kernel_events
from rmq.memory.probes import CgroupMemory

MiB = 1024**2
GiB = 1024**3


def v1_cgroup(root: Path, oom_control: str = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") -> CgroupMemory:
    d = root / "memory" / "worker"
    d.mkdir(parents=True)
    (d / "cgroup.event_control").write_text("")
    (d / "memory.usage_in_bytes").write_text(f"{300 * MiB}\n")
    (d / "memory.oom_control").write_text(oom_control)
    (d / "cgroup.procs").write_text("")
    return CgroupMemory(1, d, GiB)


def v2_cgroup(root: Path, limit: int | None = GiB, high: str = "max", pressure: bool = True) -> CgroupMemory:
    d = root / "unified" / "worker"
    d.mkdir(parents=True)
    (d / "memory.events").write_text("low 0\nhigh 2\nmax 0\noom 0\noom_kill 4\noom_group_kill 0\n")
    (d / "memory.high").write_text(f"{high}\n")
    if pressure:
        (d / "memory.pressure").write_text("")
    return CgroupMemory(2, d, limit)


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed"


def registrations(cg: CgroupMemory) -> list[list[int]]:
    """What was written to cgroup.event_control, one registration a line, as the kernel parses it."""
    return [[int(x) for x in line.split()] for line in (cg.path / "cgroup.event_control").read_text().splitlines()]


@pytest.fixture
def events():
    opened: list[KernelEvents] = []

    def make(*args, **kwargs) -> KernelEvents:
        ke = open_kernel_events(*args, **kwargs)
        opened.append(ke)
        return ke

    yield make
    for ke in opened:
        ke.close()


# --- mode, reason, registrations -----------------------------------------------------------------


def test_v1_registers_an_oom_eventfd_and_one_eventfd_per_threshold(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    ke = events(cg, [200 * MiB, 100 * MiB, 200 * MiB])
    assert ke.mode == "eventfd"
    assert "memory.usage_in_bytes" in ke.reason and "memory.oom_control" in ke.reason
    assert ke.thresholds == (100 * MiB, 200 * MiB)
    oom, *thresholds = registrations(cg)
    # "<eventfd> <fd of memory.oom_control>", then "<eventfd> <fd of memory.usage_in_bytes> <bytes>"
    assert len(oom) == 2 and fd_target(oom[0]) == "anon_inode:[eventfd]"
    assert fd_target(oom[1]) == str(cg.path / "memory.oom_control")
    assert sorted(t[2] for t in thresholds) == [100 * MiB, 200 * MiB]
    for efd, usage_fd, _ in thresholds:
        assert fd_target(efd) == "anon_inode:[eventfd]"
        assert fd_target(usage_fd) == str(cg.path / "memory.usage_in_bytes")


def test_v1_set_thresholds_keeps_unchanged_ones_and_closes_dropped_ones(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    ke = events(cg, [100 * MiB, 200 * MiB])
    by_bytes = {t[2]: t[0] for t in registrations(cg)[1:]}
    ke.set_thresholds([200 * MiB])
    assert fd_target(by_bytes[100 * MiB]) != "anon_inode:[eventfd]"  # closing it unregisters it
    assert fd_target(by_bytes[200 * MiB]) == "anon_inode:[eventfd]"
    ke.set_thresholds([200 * MiB, 300 * MiB])
    assert [t[2] for t in registrations(cg)[1:]] == [100 * MiB, 200 * MiB, 300 * MiB]  # only 300 MiB is new
    assert ke.thresholds == (200 * MiB, 300 * MiB)


def test_v1_thresholds_set_soon_are_written_by_a_thread_of_their_own_the_latest_winning(tmp_path, events):
    import threading
    import time

    cg = v1_cgroup(tmp_path)
    ke = events(cg, [100 * MiB])
    callers = []
    original = ke.set_thresholds

    def recording(thresholds):
        callers.append(threading.current_thread().name)
        original(thresholds)

    ke.set_thresholds = recording  # type: ignore[method-assign]
    ke.set_thresholds_soon([150 * MiB])
    ke.set_thresholds_soon([200 * MiB, 250 * MiB])
    deadline = time.monotonic() + 5
    while ke.thresholds != (200 * MiB, 250 * MiB) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ke.thresholds == (200 * MiB, 250 * MiB)
    assert set(callers) == {"rmq-thresholds"}  # never the caller's thread (the governor's)
    ke.close()  # and the writer ends with the events
    assert ke._writer is not None
    ke._writer.join(2)
    assert not ke._writer.is_alive()


def test_v1_eventfds_of_dropped_thresholds_are_closed_on_the_writer_thread(tmp_path, events, monkeypatch):
    import threading
    import time

    cg = v1_cgroup(tmp_path)
    ke = events(cg, [100 * MiB, 200 * MiB])
    dropped = {t[2]: t[0] for t in registrations(cg)[1:]}[100 * MiB]
    closed_on: list[str] = []
    real_close = os.close

    def close(fd: int) -> None:
        if fd == dropped:
            closed_on.append(threading.current_thread().name)
        real_close(fd)

    monkeypatch.setattr(os, "close", close)
    ke.set_thresholds_soon([200 * MiB])  # the writer exists from here on
    deadline = time.monotonic() + 5
    while not closed_on and time.monotonic() < deadline:
        time.sleep(0.01)
    # closing a registered eventfd unregisters it (an RCU grace period): never on the caller's thread
    assert closed_on == ["rmq-thresholds"]


def test_v1_worker_thresholds_are_registered_on_the_worker_cgroup(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    pools = cg.path / "pools"
    pools.mkdir()
    for name, text in (("cgroup.event_control", ""), ("memory.usage_in_bytes", "0\n"),
                       ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n")):
        (pools / name).write_text(text)
    ke = events(CgroupMemory(1, pools, None), [100 * MiB])
    ke.watch_worker(cg, [700 * MiB, 900 * MiB])
    # written to the worker's own cgroup.event_control, on its own memory.usage_in_bytes
    worker = registrations(cg)
    assert sorted(t[2] for t in worker) == [700 * MiB, 900 * MiB]
    assert all(fd_target(t[1]) == str(cg.path / "memory.usage_in_bytes") for t in worker)
    ke.watch_worker(cg, [900 * MiB])
    assert ke.worker_thresholds == (900 * MiB,)


def test_v2_polls_memory_events_and_arms_a_psi_trigger(tmp_path, events):
    cg = v2_cgroup(tmp_path)
    ke = events(cg, [100 * MiB], psi_stall_us=150_000, psi_window_us=2_000_000)
    assert ke.mode == "psi+events"
    assert "memory.events" in ke.reason and "some 150000 2000000" in ke.reason
    assert (cg.path / "memory.pressure").read_bytes() == b"some 150000 2000000\0"
    assert ke.psi_trigger == "some 150000 2000000"
    assert ke.thresholds == (100 * MiB,)  # kept; the kernel has no v2 usage thresholds


def test_v2_without_memory_pressure_still_polls_memory_events(tmp_path, events):
    ke = events(v2_cgroup(tmp_path, pressure=False))
    assert ke.mode == "psi+events"
    assert ke.psi_trigger is None
    assert "no PSI trigger" in ke.reason and "No such file" in ke.reason


def test_no_cgroup_means_mode_none(events):
    ke = events(None, [100 * MiB])
    assert ke.mode == "none"
    assert ke.reason == "no memory cgroup: nothing to watch"
    assert ke.oom_kills() == 0 and not ke.under_oom()


@pytest.mark.parametrize("missing", ["cgroup.event_control", "memory.usage_in_bytes", "memory.oom_control"])
def test_v1_missing_file_falls_back_to_none_naming_it(tmp_path, events, missing):
    cg = v1_cgroup(tmp_path)
    (cg.path / missing).unlink()
    ke = events(cg, [100 * MiB])
    assert ke.mode == "none"
    assert "No such file" in ke.reason and missing in ke.reason and "cgroup v1" in ke.reason


def test_v2_missing_memory_events_falls_back_to_none(tmp_path, events):
    cg = v2_cgroup(tmp_path)
    (cg.path / "memory.events").unlink()
    ke = events(cg)
    assert ke.mode == "none"
    assert "memory.events" in ke.reason


def test_v1_refused_registration_falls_back_to_none(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    (cg.path / "cgroup.event_control").unlink()
    (cg.path / "cgroup.event_control").symlink_to("/dev/full")  # open works, every write fails
    ke = events(cg)
    assert ke.mode == "none"
    assert "No space left" in ke.reason and "cgroup.event_control" in ke.reason


def test_permission_denied_falls_back_to_none(tmp_path, events, monkeypatch):
    cg = v1_cgroup(tmp_path)
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith("cgroup.event_control"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    ke = events(cg)
    assert ke.mode == "none"
    assert "Permission denied" in ke.reason and "cgroup.event_control" in ke.reason


def test_v1_thresholds_refused_by_the_kernel_keep_the_oom_wakeup(tmp_path, events, monkeypatch):
    cg = v1_cgroup(tmp_path)
    ke = events(cg)
    real_write = os.write

    def refuse_thresholds(fd, data):
        if data.count(b" ") == 2:  # "<eventfd> <usage fd> <bytes>": as on PREEMPT_RT kernels
            raise OSError(95, "Operation not supported")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refuse_thresholds)
    ke.set_thresholds([100 * MiB])
    assert ke.mode == "eventfd"
    assert ke.threshold_reason is not None and "Operation not supported" in ke.threshold_reason
    assert len(registrations(cg)) == 1  # the OOM notification only


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"thresholds": [-1]}, "threshold"),
        ({"thresholds": [1.5]}, "threshold"),
        ({"high_bytes": 0}, "high_bytes"),
        ({"psi_stall_us": 2_000_000, "psi_window_us": 1_000_000}, "psi_stall_us"),
        ({"psi_window_us": 20_000_000}, "psi_window_us"),
    ],
)
def test_bad_arguments_raise_and_register_nothing(tmp_path, kwargs, needle):
    cg = v1_cgroup(tmp_path)
    with pytest.raises(ValueError, match=needle):
        open_kernel_events(cg, **kwargs)
    assert registrations(cg) == []


def test_bad_thresholds_later_change_nothing(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    ke = events(cg, [100 * MiB])
    with pytest.raises(ValueError, match="threshold"):
        ke.set_thresholds([200 * MiB, 0])
    assert ke.thresholds == (100 * MiB,)
    assert len(registrations(cg)) == 2


# --- holding off the OOM killer -------------------------------------------------------------------


def test_v1_hold_disables_the_oom_killer_and_release_restores_it(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    ke = events(cg)
    assert ke.hold_oom() is True and ke.holding
    assert (cg.path / "memory.oom_control").read_text() == "1"
    assert ke.hold_oom() is True  # idempotent: the remembered value stays the original 0
    ke.release_oom()
    assert (cg.path / "memory.oom_control").read_text() == "0"
    assert not ke.holding
    (cg.path / "memory.oom_control").write_text("oom_kill_disable 0\n")
    ke.release_oom()  # nothing held: nothing written
    assert (cg.path / "memory.oom_control").read_text() == "oom_kill_disable 0\n"


def test_v1_hold_restores_an_oom_killer_that_was_already_disabled(tmp_path, events):
    cg = v1_cgroup(tmp_path, oom_control="oom_kill_disable 1\nunder_oom 0\noom_kill 0\n")
    ke = events(cg)
    assert ke.hold_oom()
    ke.close()
    assert (cg.path / "memory.oom_control").read_text() == "1"


def test_v1_hold_refused_when_this_process_is_inside_the_cgroup(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    (cg.path / "pool-1").mkdir()
    (cg.path / "pool-1" / "cgroup.procs").write_text(f"1\n{os.getpid()}\n")
    ke = events(cg)
    assert ke.hold_oom() is False
    assert f"pid {os.getpid()}" in (ke.hold_reason or "")
    assert (cg.path / "memory.oom_control").read_text().startswith("oom_kill_disable 0")


def test_v2_hold_sets_memory_high_and_release_restores_max(tmp_path, events):
    cg = v2_cgroup(tmp_path)
    ke = events(cg, high_bytes=900 * MiB)
    assert ke.hold_oom()
    assert (cg.path / "memory.high").read_text() == str(900 * MiB)
    ke.set_high(950 * MiB)  # applied at once while holding
    assert (cg.path / "memory.high").read_text() == str(950 * MiB)
    ke.release_oom()
    assert (cg.path / "memory.high").read_text() == "max"


def test_v2_hold_defaults_to_just_under_memory_max_and_close_restores(tmp_path, events):
    cg = v2_cgroup(tmp_path, high=str(800 * MiB))
    ke = events(cg)
    assert ke.hold_oom()
    high = int((cg.path / "memory.high").read_text())
    assert 0.9 * GiB < high < GiB and high % 4096 == 0
    ke.close()
    assert (cg.path / "memory.high").read_text() == str(800 * MiB)


def test_v2_hold_without_a_limit_or_high_bytes_is_refused(tmp_path, events):
    cg = v2_cgroup(tmp_path, limit=None)
    ke = events(cg)
    assert ke.hold_oom() is False
    assert "unlimited" in (ke.hold_reason or "")
    assert (cg.path / "memory.high").read_text() == "max\n"


def test_hold_refused_without_kernel_events(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    (cg.path / "cgroup.event_control").unlink()
    ke = events(cg)
    assert ke.hold_oom() is False
    assert "nothing would wake rmq" in (ke.hold_reason or "")
    assert (cg.path / "memory.oom_control").read_text().startswith("oom_kill_disable 0")


def test_hold_reports_a_refused_write(tmp_path, events):
    cg = v2_cgroup(tmp_path)
    (cg.path / "memory.high").unlink()
    (cg.path / "memory.high").mkdir()  # read and write fail
    ke = events(cg, high_bytes=900 * MiB)
    assert ke.hold_oom() is False
    assert "memory.high" in (ke.hold_reason or "")
    assert not ke.holding


# --- counters -------------------------------------------------------------------------------------


def test_counters_v1(tmp_path, events):
    ke = events(v1_cgroup(tmp_path, oom_control="oom_kill_disable 1\nunder_oom 1\noom_kill 7\n"))
    assert ke.under_oom() is True
    assert ke.oom_kills() == 7


def test_counters_v2(tmp_path, events):
    ke = events(v2_cgroup(tmp_path))
    assert ke.under_oom() is False
    assert ke.oom_kills() == 4


# --- waiting and closing --------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["v1", "v2", "none"])
def test_wait_times_out_with_nothing(tmp_path, events, tree):
    cg = {"v1": v1_cgroup, "v2": v2_cgroup}[tree](tmp_path) if tree != "none" else None
    ke = events(cg, [100 * MiB])
    start = time.monotonic()
    assert ke.wait(0.2) == []
    assert 0.19 <= time.monotonic() - start < 1.5


def wait_in_thread(ke: KernelEvents, timeout_s: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        out["woke"] = ke.wait(timeout_s)
        out["took"] = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.mark.parametrize("tree", ["v1", "v2", "none"])
def test_close_wakes_a_blocked_wait_from_another_thread(tmp_path, tree):
    cg = {"v1": v1_cgroup, "v2": v2_cgroup}[tree](tmp_path) if tree != "none" else None
    ke = open_kernel_events(cg, [100 * MiB])
    t, out = wait_in_thread(ke, 30.0)
    if tree == "none":
        time.sleep(0.1)
    else:
        until(lambda: ke._polling)
    ke.close()
    t.join(5.0)
    assert not t.is_alive()
    assert out["woke"] == [] and out["took"] < 5.0
    assert ke.wait(10.0) == []  # closed: returns at once


def test_close_unregisters_every_eventfd(tmp_path):
    cg = v1_cgroup(tmp_path)
    ke = open_kernel_events(cg, [100 * MiB, 200 * MiB])
    efds = [r[0] for r in registrations(cg)]
    t, _ = wait_in_thread(ke, 30.0)
    until(lambda: ke._polling)
    ke.close()
    t.join(5.0)
    assert all(fd_target(fd) != "anon_inode:[eventfd]" for fd in efds)
    ke.close()  # idempotent


def test_new_thresholds_while_waiting_do_not_end_the_wait(tmp_path, events):
    cg = v1_cgroup(tmp_path)
    ke = events(cg, [100 * MiB])
    t, out = wait_in_thread(ke, 0.5)
    until(lambda: ke._polling)
    ke.set_thresholds([200 * MiB])
    t.join(5.0)
    assert out["woke"] == [] and out["took"] >= 0.45
    assert [r[2] for r in registrations(cg)[1:]] == [100 * MiB, 200 * MiB]


def test_v2_wake_names_the_memory_events_counters_that_grew(tmp_path, events):
    # a POLLPRI wake on memory.events re-reads the file; regular files never raise POLLPRI, so the
    # step after the wake is driven here directly
    cg = v2_cgroup(tmp_path)
    ke = events(cg)
    events_file = cg.path / "memory.events"
    events_file.write_text("low 5\nhigh 2\nmax 0\noom 0\noom_kill 4\noom_group_kill 0\n")
    assert ke._events_increase() == []  # "low" does not wake the governor
    events_file.write_text("low 5\nhigh 9\nmax 1\noom 1\noom_kill 4\noom_group_kill 0\n")
    assert ke._events_increase() == ["high", "max", "oom"]
    assert ke._events_increase() == []  # compared with the last reading, not the first
    events_file.write_text("low 5\nhigh 9\nmax 1\noom 1\noom_kill 5\noom_group_kill 1\n")
    assert ke._events_increase() == ["oom_kill"]
