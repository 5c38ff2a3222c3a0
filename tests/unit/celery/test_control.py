"""The ``rmq_cleanup`` remote-control command and the ``rmq.cleanup_sessions`` beat task."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.worker.control import Panel

import rmq.disk.cleanup as cleanup_mod
from rmq.celery import beat, control
from rmq.core.config import load_config
from rmq.core.procstats import ProcessStats


class FakeRuntime:
    def __init__(self, root: Path, **conf: object) -> None:
        settings = {"rmq_session_root": str(root), "rmq_session_max_age": "1h",
                    "rmq_disk_high_ratio": 0.99, "rmq_disk_low_ratio": 0.98, **conf}
        self.config = load_config(settings, environ={})
        self.stats = ProcessStats(None)
        self._local: dict[str, object] = {}

    def local(self, key, factory):
        if key not in self._local:
            self._local[key] = factory()
        return self._local[key]


def worker_state(rt: FakeRuntime | None) -> SimpleNamespace:
    steps = [SimpleNamespace(label="rmq governor", runtime=rt)] if rt is not None else []
    return SimpleNamespace(consumer=SimpleNamespace(controller=SimpleNamespace(steps=steps)))


def old_session(root: Path, sid: str, size: int = 100, hours: float = 2) -> Path:
    path = root / f"session_{sid}"
    path.mkdir(parents=True)
    (path / "data").write_bytes(b"x" * size)
    t = time.time() - hours * 3600
    for p in (path / "data", path):
        os.utime(p, (t, t))
    return path


def test_cleanup_command_cleans_the_workers_root_and_counts_in_the_main_process(tmp_path):
    rt = FakeRuntime(tmp_path)
    old_session(tmp_path, "a", 300)
    old_session(tmp_path, "b", 200)
    fresh = old_session(tmp_path, "c", 10, hours=0)
    reply = control.rmq_cleanup(worker_state(rt))
    assert reply["status"] == "done" and reply["root"] == str(tmp_path)
    assert (reply["removed"], reply["bytes_freed"]) == (2, 500)
    assert sorted(reply["removed_names"]) == ["session_a", "session_b"]
    assert fresh.exists() and rt.stats.counters == {"sessions_cleaned": 2}


def test_dry_run_removes_and_counts_nothing(tmp_path):
    rt = FakeRuntime(tmp_path)
    old = old_session(tmp_path, "a")
    reply = control.rmq_cleanup(worker_state(rt), dry_run=True)
    assert reply["dry_run"] is True and reply["removed"] == 1
    assert old.exists() and rt.stats.counters == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"root": "/etc"}, {"older_than": 0}, {"dry_run": "no"}, {"dry_run": 1}, {"path": "../x", "dry_run": False}],
)
def test_cleanup_command_refuses_any_other_input_and_touches_nothing(tmp_path, kwargs):
    rt = FakeRuntime(tmp_path)
    old = old_session(tmp_path, "a")
    reply = control.rmq_cleanup(worker_state(rt), **kwargs)
    assert "error" in reply and "status" not in reply
    assert old.exists() and sorted(os.listdir(tmp_path)) == ["session_a"]


def test_cleanup_command_without_rmq_says_so():
    assert control.rmq_cleanup(worker_state(None)) == {"error": "rmq is not running in this worker"}


def test_cleanup_command_is_registered_with_a_boolean_argument():
    meta = Panel.meta["rmq_cleanup"]
    assert meta.type == "control" and meta.signature == "[dry_run=False]"
    [(name, convert)] = meta.args
    assert name == "dry_run" and convert("true") is True and convert("false") is False


def test_a_slow_cleanup_replies_running_and_finishes_in_the_background(tmp_path, monkeypatch):
    rt = FakeRuntime(tmp_path)
    old_session(tmp_path, "a")
    gate = threading.Event()
    real = cleanup_mod.cleanup_from_config

    def slow(config, dry_run=False, **kw):
        gate.wait(10)
        return real(config, dry_run=dry_run, **kw)

    monkeypatch.setattr(cleanup_mod, "cleanup_from_config", slow)
    runner = control.CleanupRunner(rt)
    first = runner.request(dry_run=False, wait_s=0.05)
    assert first["status"] == "running" and first["root"] == str(tmp_path)
    assert runner.request(dry_run=True, wait_s=0.05)["status"] == "busy"  # one run at a time
    gate.set()
    joined = runner.request(dry_run=False, wait_s=10)  # joins the run in progress
    assert joined["status"] == "done" and joined["removed"] == 1
    assert rt.stats.counters == {"sessions_cleaned": 1}


def test_a_failing_cleanup_replies_an_error(tmp_path, monkeypatch):
    def broken(config, **kw):
        raise PermissionError("no access")

    monkeypatch.setattr(cleanup_mod, "cleanup_from_config", broken)
    reply = control.CleanupRunner(FakeRuntime(tmp_path)).request(dry_run=False, wait_s=5)
    assert reply["status"] == "error" and "PermissionError: no access" in reply["error"]


class FakeControl:
    def __init__(self, pings, replies):
        self.pings, self.replies, self.calls = pings, replies, []

    def ping(self, timeout):
        return [{host: {"ok": "pong"}} for host in self.pings]

    def broadcast(self, command, **kw):
        self.calls.append((command, kw))
        return self.replies


def run_beat(fake: FakeControl, **kw):
    task_self = SimpleNamespace(app=SimpleNamespace(control=fake))
    return beat.cleanup_sessions.__wrapped__.__func__(task_self, **kw)


def test_beat_task_broadcasts_and_sums_every_workers_report():
    fake = FakeControl(
        ["a@h", "b@h", "c@h"],
        [{"a@h": {"status": "done", "removed": 2, "bytes_freed": 10}},
         {"b@h": {"status": "done", "removed": 1, "bytes_freed": 5}}],
    )
    result = run_beat(fake)
    [(command, kw)] = fake.calls
    assert command == "rmq_cleanup" and kw["arguments"] == {"dry_run": False} and kw["reply"] is True
    assert "limit" not in kw and kw["timeout"] == 8.0  # every reply counts, however many workers
    assert result == {
        "workers": {"a@h": {"status": "done", "removed": 2, "bytes_freed": 10},
                    "b@h": {"status": "done", "removed": 1, "bytes_freed": 5}},
        "removed": 3, "bytes_freed": 15, "missing": ["c@h"],
    }


def test_beat_task_copes_with_errors_and_no_workers():
    fake = FakeControl([], [{"x@h": {"error": "No such method: rmq_cleanup"}}])
    result = run_beat(fake, dry_run=True)
    assert fake.calls[0][1]["arguments"] == {"dry_run": True}
    assert result["removed"] == 0 and result["workers"]["x@h"]["error"].startswith("No such method")
