"""Sessions on real workers: session directories, beat cleanup on every host, live
sessions, disk admission, and ``rmq cleanup`` from the command line (docs/design.md#sessions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmq.core.errors import BudgetExceeded, ResourceUnavailable
from rmq.testing.worker import wait_until

from .conftest import ROOT, TESTS_DIR, taskapp_env, worker_env

pytestmark = pytest.mark.integration

HOUR = 3600.0
# The disk-pressure policy is unit-tested with injected readings; here it stays out of the way
# unless a test turns it on, so the results do not depend on how full this machine's disk is.
NO_PRESSURE = {"disk_high_ratio": 0.99, "disk_low_ratio": 0.98}


@pytest.fixture
def session_app(redis_url):
    """A client of ``sessionapp`` on the test's Redis."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import sessionapp  # noqa: F401  (registers the session tasks)

    from workers.app import make_app

    app = make_app(broker=redis_url, backend=redis_url)
    yield app
    app.close()


def _start(start_worker, app, redis_url, root: Path, hostname: str | None = None, concurrency: int = 2,
           wait: bool = True, **rmq):
    env = taskapp_env(redis_url, session_root=root, **{**NO_PRESSURE, **rmq})
    kwargs = {"hostname": hostname} if hostname else {}
    return start_worker(app, app="sessionapp", env=env, concurrency=concurrency, wait=wait, **kwargs)


def _cleanup(app, w, dry_run: bool = False) -> dict:
    """One ``rmq_cleanup`` broadcast to worker ``w``; its report."""
    replies = app.control.broadcast(
        "rmq_cleanup", arguments={"dry_run": dry_run}, reply=True, timeout=15, destination=[w.node_name], limit=1
    )
    assert replies, f"{w.node_name} did not answer rmq_cleanup"
    report = replies[0][w.node_name]
    assert report.get("status") == "done", report
    return report


def _old_session(root: Path, sid: str, sizes: dict[str, int], seconds_ago: float) -> int:
    """A session directory whose tree was last modified ``seconds_ago``; returns its bytes."""
    path = root / f"session_{sid}"
    path.mkdir(parents=True)
    for name, size in sizes.items():
        (path / name).write_bytes(b"x" * size)
    _age(path, seconds_ago)
    return sum(sizes.values())


def _age(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def test_session_dir_after_task_keep_and_failed_ttl(redis_url, session_app, start_worker, tmp_path):
    root = tmp_path / "sessions"
    ttl = 3.0
    w = _start(start_worker, session_app, redis_url, root, failed_session_ttl=f"{ttl}s")
    tasks = session_app.tasks

    # after_task (the default): the task sees its directory and writes into it; afterwards it is gone
    out = tasks["s.write"].delay("job-1", data="scratch").get(timeout=30)
    assert out["dir"] == str(root / "session_job-1")
    assert out["files"] == ["data.txt"]
    assert not (root / "session_job-1").exists()

    # keep: the next task of the pipeline (same session id) finds the first one's file
    pipeline = tasks["s.write_keep"].si("pipe-7", data="stage 1") | tasks["s.read"].si("pipe-7")
    second = pipeline.delay().get(timeout=30)
    assert second == {"dir": str(root / "session_pipe-7"), "data": "stage 1", "files": ["data.txt"]}
    assert not (root / "session_pipe-7").exists(), "s.read (after_task) should have removed the pipeline's dir"

    # a failed task's directory stays for debugging ...
    sent = time.time()
    failing = tasks["s.fail"].delay("bad-1")
    with pytest.raises(RuntimeError, match="on purpose"):
        failing.get(timeout=30)
    failed_dir = root / "session_bad-1"
    assert (failed_dir / "partial.txt").read_text() == "half done"
    first = _cleanup(session_app, w)
    if time.time() < sent + ttl:  # the run surely happened inside the TTL (skip on a crawling machine)
        assert first["removed"] == 0 and failed_dir.exists()

    # ... and goes at the first cleanup run after the TTL
    def removed() -> dict | None:
        report = _cleanup(session_app, w)
        return report if report["removed"] else None

    report = wait_until(removed, timeout=30, interval=0.5, what="the failed session to be cleaned")
    assert time.time() >= sent + ttl
    assert report["removed_names"] == ["session_bad-1"] and report["reasons"] == {"failed": 1}
    assert report["bytes_freed"] == len("half done")
    assert not failed_dir.exists()


def test_one_beat_run_cleans_every_workers_own_root(redis_url, session_app, start_worker, tmp_path, unique):
    # Given two workers ("hosts") with their own session roots, each holding old and fresh sessions
    roots = {"a": tmp_path / "host-a", "b": tmp_path / "host-b"}
    expected_bytes = {}
    for key, root in roots.items():
        root.mkdir()
        expected_bytes[key] = _old_session(root, f"{key}-old1", {"x.bin": 3000, "y.bin": 1000}, 2 * HOUR)
        expected_bytes[key] += _old_session(root, f"{key}-old2", {"z.bin": 5000}, 3 * HOUR)
        _old_session(root, f"{key}-fresh", {"f.bin": 100}, 60)
        (root / "not-a-session.txt").write_text("keep me")
    workers = {
        key: _start(start_worker, session_app, redis_url, root, hostname=f"{key}-{unique}@%h",
                    concurrency=1, session_max_age="1h", wait=False)
        for key, root in roots.items()
    }
    for w in workers.values():
        w.wait_ready(session_app)

    # A dry run from the command line lists both hosts' candidates and removes nothing
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "control", "rmq_cleanup", "true", "--json", "-t", "3"],
        env={**os.environ, **worker_env(redis_url)}, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    dry = {host: r for reply in json.loads(out.stdout.strip().splitlines()[-1]) for host, r in reply.items()}
    for w in workers.values():
        assert dry[w.node_name]["dry_run"] is True and dry[w.node_name]["removed"] == 2
    assert all((root / f"session_{key}-old1").exists() for key, root in roots.items())

    # When beat's rmq.cleanup_sessions runs once (on one of the workers; it collects replies until none
    # came for its timeout, 8 s by default, and both workers reply at once)
    result = session_app.tasks["rmq.cleanup_sessions"].delay(timeout=3.0).get(timeout=60)

    # Then each worker cleaned its own root and the result lists both with counts and bytes
    assert {w.node_name for w in workers.values()} <= set(result["workers"])
    for key, w in workers.items():
        report = result["workers"][w.node_name]
        assert report["root"] == str(roots[key])
        assert report["removed"] == 2 and report["bytes_freed"] == expected_bytes[key] == 9000
        assert sorted(report["removed_names"]) == [f"session_{key}-old1", f"session_{key}-old2"]
        assert sorted(os.listdir(roots[key])) == [".rmq", "not-a-session.txt", f"session_{key}-fresh"]
    assert result["removed"] >= 4 and result["bytes_freed"] >= 18000 and result["missing"] == []

    # and each worker's snapshot (`inspect stats`) counts the sessions it cleaned
    for w in workers.values():
        stats = session_app.control.inspect(destination=[w.node_name], timeout=5, limit=1).stats()
        assert stats[w.node_name]["rmq"]["counters"]["sessions_cleaned"] == 2


def test_a_live_session_is_never_removed_however_old(redis_url, session_app, start_worker, tmp_path):
    root = tmp_path / "sessions"
    # Disk pressure on (this disk is surely more than 2 % used): cleanup removes every idle session
    w = _start(start_worker, session_app, redis_url, root, session_max_age="1h",
               disk_high_ratio=0.02, disk_low_ratio=0.01)
    running = session_app.tasks["s.hold"].delay("live-1")
    live = root / "session_live-1"
    wait_until(lambda: (live / "started").exists(), timeout=30, what="the session task to start")
    _old_session(root, "idle-1", {"old.bin": 10}, 10 * 24 * HOUR)
    # Its files are made ten days old while the task runs
    _age(live, 10 * 24 * HOUR)

    report = _cleanup(session_app, w)

    assert report["removed_names"] == ["session_idle-1"]
    assert report["skipped_live"] == 1
    assert (live / "started").exists()
    # the task finishes normally and its own policy removes the directory
    (live / "release").write_text("go")
    assert running.get(timeout=30)["files"] == ["release", "started"]
    assert not live.exists()


def test_disk_larger_than_free_space_defers_then_fails(redis_url, session_app, start_worker, tmp_path):
    root = tmp_path / "sessions"
    usage = shutil.disk_usage(tmp_path)
    more_than_free = usage.free + usage.used // 2  # not free now, but the filesystem could hold it
    env = {**taskapp_env(redis_url, session_root=root, **NO_PRESSURE, max_deferrals=1, defer_countdown="0.2s",
                         admission_wait="0.2s"),
           "SESSIONAPP_MORE_THAN_FREE": str(more_than_free)}
    w = start_worker(session_app, app="sessionapp", env=env, concurrency=2)
    started = time.monotonic()
    with pytest.raises(ResourceUnavailable) as err:
        session_app.tasks["s.more_disk_than_free"].delay().get(timeout=60)
    assert err.value.deferrals == 1 and "disk" in err.value.reason
    assert time.monotonic() - started < 30
    assert session_app.tasks["s.small_disk"].delay().get(timeout=30) == "ran"
    stats = session_app.control.inspect(destination=[w.node_name], timeout=5).stats()[w.node_name]["rmq"]
    assert stats["counters"]["deferred"]["disk"] >= 1


def test_disk_larger_than_the_disk_fails_at_once(redis_url, session_app, start_worker, tmp_path):
    """A disk= that the session root's filesystem could never hold ends FAILURE with
    BudgetExceeded on its first run, not after rmq_max_deferrals deferrals."""
    w = _start(start_worker, session_app, redis_url, tmp_path / "sessions",
               max_deferrals=3, defer_countdown="0.5s", admission_wait="0.2s")
    result = session_app.tasks["s.huge_disk"].delay()
    with pytest.raises(BudgetExceeded) as err:
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert (err.value.resource, err.value.declared) == ("disk", 1000 * 1024**4)
    assert err.value.available == err.value.budget <= shutil.disk_usage(tmp_path).total
    stats = session_app.control.inspect(destination=[w.node_name], timeout=5).stats()[w.node_name]["rmq"]
    assert stats["counters"].get("deferred", {}).get("disk", 0) == 0, stats["counters"]


def test_rmq_cleanup_command_line(redis_url, tmp_path):
    root = tmp_path / "sessions"
    root.mkdir()
    _old_session(root, "old", {"big.bin": 4096}, 2 * HOUR)
    _old_session(root, "fresh", {"new.bin": 10}, 60)
    env = {**os.environ, **worker_env(redis_url, session_root=root, **NO_PRESSURE)}

    def rmq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(ROOT, ".venv", "bin", "rmq"), "cleanup", "-A", "workers.app", *args],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    dry = rmq("--dry-run", "--older-than", "1h")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 session(s), 4.0KiB to free" in dry.stdout and "session_old" in dry.stdout
    assert "session_fresh" not in dry.stdout
    assert sorted(os.listdir(root)) == ["session_fresh", "session_old"]

    real = rmq("--older-than", "1h", "--json")
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert (report["removed"], report["bytes_freed"], report["removed_names"]) == (1, 4096, ["session_old"])
    assert sorted(os.listdir(root)) == [".rmq", "session_fresh"]

    bad = rmq("--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr and "Traceback" not in bad.stderr


def test_rmq_cleanup_is_a_listed_control_command():
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "control", "--list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "rmq_cleanup [dry_run=False]" in out.stdout
