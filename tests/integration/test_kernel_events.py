"""Kernel wake-ups against the real kernel: a child process in a real memory cgroup crosses a usage
threshold, runs out of memory with the OOM killer held off, and stalls on memory (PSI)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rmq.memory.kernel_events import open_kernel_events
from rmq.memory.probes import CgroupMemory
from rmq.testing.cgroups import MemoryCgroup, can_create

pytestmark = pytest.mark.integration

MiB = 1024**2

# Moves its cgroup's usage across `threshold`: up to `first`, then down to `low` and up to `high` in
# turn, 1 MiB mappings at a time. After each crossing it prints when the 1 MiB step that took the
# cgroup's usage across the threshold began and ended (CLOCK_MONOTONIC, shared with the parent), and
# waits for a line on stdin.
CROSSER = r"""
import mmap, sys, time
usage_path = sys.argv[1]
threshold, first, low, high, steps = map(int, sys.argv[2:7])
MiB = 1 << 20
ONES = b"\x01" * MiB
def usage():
    with open(usage_path) as f:
        return int(f.read())
maps = []
for step in range(steps):
    up = step % 2 == 0
    target = (first if step == 0 else high) if up else low
    crossed = None
    while (usage() < target) if up else (usage() > target and maps):
        began = time.monotonic()
        if up:
            m = mmap.mmap(-1, MiB)
            m[:] = ONES
            maps.append(m)
        else:
            maps.pop().close()
        if crossed is None and ((usage() > threshold) if up else (usage() < threshold)):
            crossed = (began, time.monotonic())
    print(*crossed, flush=True)
    sys.stdin.readline()
"""

# Touches `mib` MiB, then says so.
ALLOCATOR = r"""
import sys
chunks = [bytearray(1 << 20) for _ in range(int(sys.argv[1]))]
print("done", flush=True)
"""

# Keeps 36 MiB of its own and reads a file over and over, dropping its cache first, so that in a
# 48 MiB cgroup the kernel keeps reclaiming (and the child's own pages keep refaulting).
THRASHER = r"""
import os, sys, time
keep = bytearray(36 << 20)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    with open(sys.argv[1], "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while f.read(1 << 20):
            pass
"""


@pytest.fixture
def memory_cgroup():
    """``make(limit_bytes)`` -> a real child memory cgroup, removed (after its processes) at the end."""
    reason = can_create()
    if reason:
        pytest.skip(reason)
    made: list[MemoryCgroup] = []
    procs: list[subprocess.Popen] = []

    def make(limit_bytes: int) -> MemoryCgroup:
        cg = MemoryCgroup(limit_bytes)
        made.append(cg)
        return cg

    yield make, procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for cg in made:
        cg.remove()


def test_usage_threshold_wakes_wait_when_a_child_crosses_it(memory_cgroup):
    make, procs = memory_cgroup
    cg = make(512 * MiB)
    if cg.version != 1:
        pytest.skip("usage thresholds are a cgroup v1 feature; this host's memory cgroups are v2")
    steps = 21  # 0 -> 200 MiB, then 10 times down to 50 MiB and back up to 150 MiB
    ke = open_kernel_events(cg.cgroup_memory(), [100 * MiB])
    try:
        assert ke.mode == "eventfd", ke.reason
        child = subprocess.Popen(
            [*cg.wrap(), sys.executable, "-c", CROSSER, str(cg.path / "memory.usage_in_bytes"),
             str(100 * MiB), str(200 * MiB), str(50 * MiB), str(150 * MiB), str(steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(child)
        assert child.stdin is not None and child.stdout is not None
        latest, earliest = [], []  # wake minus the crossing step's start / end: the latency lies between
        deadline = time.monotonic() + 15
        for step in range(steps):
            woke = ke.wait(max(0.0, deadline - time.monotonic()))
            woke_at = time.monotonic()
            assert woke == ["threshold"], f"crossing {step}: {woke}"
            began, ended = map(float, child.stdout.readline().split())
            latest.append(woke_at - began)
            earliest.append(woke_at - ended)
            child.stdin.write("\n")
            child.stdin.flush()
        assert child.wait(10) == 0
        ms = sorted(x * 1000 for x in latest)
        p95 = ms[round(0.95 * (len(ms) - 1))]
        print(f"\nthreshold wake latency over {len(ms)} crossings, from the start of the 1 MiB step that "
              f"crossed: median {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms, max {ms[-1]:.2f} ms "
              f"(from its end: median {statistics.median(earliest) * 1000:.2f} ms)")
        assert statistics.median(ms) < 500

        # the kernel signals every eventfd when the cgroup goes; wait() says so once
        cg.remove()
        seen: list[str] = []
        while "removed" not in seen and time.monotonic() < deadline:
            seen = ke.wait(max(0.0, deadline - time.monotonic()))  # first maybe the child's exit crossing
        assert seen == ["removed"]
    finally:
        ke.close()


def test_the_worker_cgroups_own_lines_wake_wait_when_memory_outside_the_watched_pools_grows(memory_cgroup):
    make, procs = memory_cgroup
    cg = make(512 * MiB)
    if cg.version != 1:
        pytest.skip("usage thresholds are a cgroup v1 feature; this host's memory cgroups are v2")
    # Given events on the pools' cgroup, whose thresholds nothing in the pools will reach, and the
    # worker's own line at 200 MiB
    pools = cg.path / "pools"
    pools.mkdir()
    ke = open_kernel_events(CgroupMemory(1, pools, None), [400 * MiB])
    try:
        assert ke.mode == "eventfd", ke.reason
        ke.watch_worker(cg.cgroup_memory(), [200 * MiB])
        assert ke.worker_thresholds == (200 * MiB,) and ke.threshold_reason is None
        # When a process outside the pools (the worker's main process, say) grows past it
        child = subprocess.Popen([*cg.wrap(), sys.executable, "-c", ALLOCATOR, "250"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(child)
        # Then the kernel wakes the waiter, naming the worker's line
        assert ke.wait(15) == ["worker"]
    finally:
        ke.close()
        pools.rmdir()


def test_held_oom_killer_lets_rmq_choose_the_victim(memory_cgroup):
    make, procs = memory_cgroup
    cg = make(256 * MiB)
    if cg.version != 1:
        pytest.skip("written for cgroup v1 (oom_kill_disable); this host's memory cgroups are v2")
    ke = open_kernel_events(cg.cgroup_memory())
    oom_control = cg.path / "memory.oom_control"
    try:
        assert ke.mode == "eventfd", ke.reason
        assert ke.hold_oom(), ke.hold_reason
        assert "oom_kill_disable 1" in oom_control.read_text()
        child = subprocess.Popen([*cg.wrap(), sys.executable, "-c", ALLOCATOR, "400"],
                                 stdout=subprocess.PIPE, text=True)
        procs.append(child)

        deadline = time.monotonic() + 4
        woke: list[str] = []
        while "oom" not in woke and time.monotonic() < deadline:
            woke = ke.wait(max(0.0, deadline - time.monotonic()))
        assert woke == ["oom"]
        assert ke.under_oom()
        assert child.poll() is None  # waiting for memory, not killed

        os.kill(child.pid, signal.SIGKILL)  # rmq's choice of victim
        assert child.wait(5) == -signal.SIGKILL
        assert child.stdout is not None and "done" not in child.stdout.read()
        ke.release_oom()
        assert "oom_kill_disable 0" in oom_control.read_text()
        assert ke.oom_kills() == 0 and cg.oom_kills() == 0
    finally:
        ke.close()
    assert "oom_kill_disable 0" in oom_control.read_text()


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            return Path(left.split()[4])
    return None


def test_psi_trigger_wakes_wait_when_a_child_stalls_on_memory(memory_cgroup, tmp_path):
    make, procs = memory_cgroup
    mem = make(48 * MiB)
    data = tmp_path / "data.bin"
    with open(data, "wb") as f:
        for _ in range(128):
            f.write(bytes(MiB))
    unified: Path | None = None
    if mem.version == 2:
        cgroup = mem.cgroup_memory()
        prefix = mem.wrap()
    else:
        # v1 memory controller: the same limit, and PSI from a cgroup2 group holding only the child
        mount = _cgroup2_mount()
        if mount is None or not (mount / "memory.pressure").exists():
            pytest.skip("no cgroup2 hierarchy with pressure files next to the v1 memory controller")
        unified = mount / f"rmq-test-{uuid.uuid4().hex[:8]}"
        try:
            unified.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a cgroup2 group: {exc}")
        fake = tmp_path / "worker"
        fake.mkdir()
        (fake / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
        (fake / "memory.pressure").symlink_to(unified / "memory.pressure")
        cgroup = CgroupMemory(2, fake, mem.limit_bytes)
        prefix = ["sh", "-c", f'echo $$ > {unified / "cgroup.procs"} && exec "$@"', "sh", *mem.wrap()]
    try:
        with open_kernel_events(cgroup) as defaults:  # 100 ms in 1 s; 2 s windows without CAP_SYS_RESOURCE
            assert defaults.psi_trigger in ("some 100000 1000000", "some 200000 2000000"), defaults.reason
        ke = open_kernel_events(cgroup, psi_stall_us=50_000, psi_window_us=2_000_000)
        try:
            assert ke.psi_trigger == "some 50000 2000000", ke.reason
            child = subprocess.Popen([*prefix, sys.executable, "-c", THRASHER, str(data), "8"])
            procs.append(child)
            start = time.monotonic()
            deadline = start + 6
            woke: list[str] = []
            while "psi" not in woke and time.monotonic() < deadline:  # v2 may say "max" first
                woke = ke.wait(max(0.0, deadline - time.monotonic()))
            print(f"\nPSI wake after {time.monotonic() - start:.2f} s with trigger '{ke.psi_trigger}'")
            assert "psi" in woke
        finally:
            ke.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if unified is not None:
            deadline = time.monotonic() + 5
            while unified.exists():
                try:
                    unified.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
