"""The readings the memory benches take from a test cgroup (``rmq.testing.cgroups``), against a real process."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from rmq.testing.cgroups import MemoryCgroup, can_create
from rmq.testing.worker import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20
# touches 64 MiB, says so, and holds it until its stdin closes
HOLDER = """
import sys
block = bytearray(64 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
print("held", flush=True)
sys.stdin.read()
"""


def test_a_cgroup_reports_its_process_its_usage_and_a_peak_that_restarts():
    reason = can_create()
    if reason:
        pytest.skip(reason)
    cg = MemoryCgroup(256 * MiB)
    proc = None
    try:
        # Given a process in the cgroup holding 64 MiB
        proc = subprocess.Popen([*cg.wrap(), sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"held\n"
        # Then the cgroup lists it and counts its memory
        assert cg.pids() == [proc.pid]
        assert (cg.usage_bytes() or 0) >= 64 * MiB
        assert (cg.working_set_bytes() or 0) >= 64 * MiB
        assert (cg.peak_bytes() or 0) >= 64 * MiB
        # When it exits
        proc.stdin.close()
        assert proc.wait(10) == 0
        # Then the cgroup is empty, and a restarted peak starts from the usage now
        assert cg.pids() == []
        assert (cg.usage_bytes() or 0) < 64 * MiB
        if cg.reset_peak():
            assert (cg.peak_bytes() or 0) < 64 * MiB
        assert cg.oom_kills() == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        cg.remove()
    assert not cg.path.exists()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_removing_a_cgroup_ends_what_its_stopped_worker_left_inside_and_says_what_stays():
    reason = can_create()
    if reason:
        pytest.skip(reason)
    cg = MemoryCgroup(256 * MiB)
    try:
        # Given a process left behind in a cgroup made inside the test's (as in a worker's pool
        # cgroup, a subprocess of its killed worker): its parent moved it there, then was killed
        inner = cg.path / "rmq-1-pools"
        inner.mkdir()
        leader = subprocess.Popen([*cg.wrap(), "sh", "-c",
                                   f"sh -c 'echo $$ > {inner}/cgroup.procs; exec sleep 600' & wait"])
        wait_until(lambda: (inner / "cgroup.procs").read_text().split(), 10, what="the subprocess moved")
        left = cg.all_pids()
        assert len(left) == 2 and leader.pid in left, left
        # Then the cgroup says what keeps it
        said = cg.describe()
        assert "sleep 600" in said and "rmq-1-pools" in said, said
        leader.kill()
        leader.wait(5)
        (orphan,) = [pid for pid in left if pid != leader.pid]
        assert not _gone(orphan)
        # When it is removed, with no grace for what is still inside
        removed = cg.remove(timeout=10, grace=0)
        # Then the process left behind was ended, and the cgroup is gone with the one inside it
        assert removed and not cg.path.exists()
        assert "sleep 600" in cg.ended_at_removal, cg.ended_at_removal
        wait_until(lambda: _gone(orphan), 10, what="the process left behind ended")
    finally:
        cg.remove(timeout=10, grace=0)
