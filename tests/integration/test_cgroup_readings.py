"""The readings the memory benches take from a test cgroup (``rmq.testing.cgroups``), against a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rmq.testing.cgroups import MemoryCgroup, can_create

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
