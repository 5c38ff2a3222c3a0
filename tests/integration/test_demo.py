"""The demo completes, accounts for every task, and leaves nothing behind; with the real pipeline,
each session is heard back and encoded to valid audio."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from workers.phrasebook import word_error_rate

from .conftest import ROOT

pytestmark = pytest.mark.integration


def _leftovers(tmp: str) -> list[str]:
    """Processes of the demo that ran with ``TMPDIR=tmp`` (other demos may run on the machine)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "rmq-demo-" in cmd or "demo@" in cmd:
            try:
                mine = tmp in cmd or p.environ().get("TMPDIR") == tmp
            except psutil.Error:  # gone, or another user's
                mine = False
            if mine:
                found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


def _run_demo(*args: str, tmp: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": tmp}
    env.pop("RMQ_BROKER_URL", None)
    return subprocess.run([sys.executable, "-m", "rmq.cli", "demo", "--plain", "--sessions", "3", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("real_redis", [False, True], ids=["embedded-redis-real-pipeline", "machine-redis-synthetic"])
def test_demo_accounts_for_every_task_and_leaves_nothing_behind(real_redis, redis_url):
    tmp = tempfile.mkdtemp(prefix="rmq-demo-test-")
    try:
        # the real pipeline on the embedded Redis, the synthetic one (--synthetic) on the machine's
        args = ("--broker", redis_url, "--synthetic") if real_redis else ()
        out = _run_demo(*args, tmp=tmp)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        assert "every task accounted for" in text
        assert "unaccounted tasks    : 0" in text
        assert "runaway task         : FAILURE MemoryBudgetExceeded" in text
        summary = text[text.index("=== rmq demo summary"):]
        assert "'pressure'" in summary or "'admission'" in summary, summary  # a model was unloaded
        assert "within the budget" in summary
        assert "embedded Redis" in text if not real_redis else "using broker" in text
        if real_redis:
            assert "=== rmq demo summary (synthetic workloads) ===" in text
            assert "synthetic_asr" in text and "=== sessions" not in text
        else:
            _check_real_sessions(text)
        assert not _leftovers(tmp), _leftovers(tmp)
        assert not glob.glob(os.path.join(tmp, "rmq-demo-*")), os.listdir(tmp)
        assert not glob.glob(os.path.join(tmp, "rmq-worker-*.log"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_real_sessions(text: str) -> None:
    """Each session heard most of what it said and produced valid audio, as the demo printed it."""
    assert "=== rmq demo summary (real pipeline) ===" in text
    sessions = text[text.index("=== sessions (real pipeline) ==="):text.index("=== rmq demo summary")]
    said = re.findall(r"^  said +: (.*)$", sessions, re.M)
    heard = re.findall(r"^  heard +: (.*)  \(word error rate (\d+)%\)$", sessions, re.M)
    outputs = re.findall(r"^  output +: (\S+) \(.* opus, ([\d.]+) s of audio, decoded with ffmpeg\)$", sessions, re.M)
    assert len(said) == len(heard) == len(outputs) == 3, sessions
    for spoken, (transcript, shown) in zip(said, heard, strict=True):
        assert word_error_rate(spoken, transcript) <= 0.4 and int(shown) <= 40, (spoken, transcript)
    assert all(float(seconds) > 1.0 for _, seconds in outputs), outputs
    assert "3/3 valid audio" in text and "3/3 sessions at most 40%" in text


@pytest.mark.parametrize("impatient", [False, True], ids=["ctrl_c", "ctrl_c_until_it_exits"])
def test_demo_stops_everything_on_ctrl_c(impatient: bool):
    tmp = tempfile.mkdtemp(prefix="rmq-demo-test-")
    env = {**os.environ, "TMPDIR": tmp}
    proc = subprocess.Popen([sys.executable, "-m", "rmq.cli", "demo", "--plain"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait until the worker and beat are up
            lines.append(line)
            if "are up" in line:
                break
        proc.send_signal(subprocess.signal.SIGINT)
        if impatient:  # more presses while it stops what it started, and after, until the process is gone
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    proc.send_signal(subprocess.signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, "".join(lines) + rest
        assert "interrupted" in rest
        assert not _leftovers(tmp), _leftovers(tmp)
        assert not glob.glob(os.path.join(tmp, "rmq-demo-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
