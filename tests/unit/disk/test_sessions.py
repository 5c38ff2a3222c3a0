"""A session around a task: the store opens and closes it under a lease, the guard does it per task."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.errors import ConfigError
from rmq.core.procstats import ProcessStats
from rmq.disk.session_root import SessionError, SessionRoot, is_live
from rmq.disk.sessions import SessionGuard, SessionStore

from .helpers import BAD_IDS, BAD_VALUES


@pytest.mark.parametrize("value", BAD_IDS + BAD_VALUES)
def test_invalid_id_touches_nothing(tmp_path, value):
    # Given a session root that does not exist yet
    root = tmp_path / "sessions"
    store = SessionStore(root)
    # When a task opens a session with a bad id, Then it is refused and nothing is created
    with pytest.raises(ConfigError):
        store.open(value, "task-1")
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


# --- open / close ------------------------------------------------------------------------


def test_open_creates_private_dirs_and_holds_a_lease(tmp_path):
    root = tmp_path / "sessions"
    store = SessionStore(root)
    path = store.open("job-1", "task-1")
    assert path == root / "session_job-1"
    assert path.is_dir() and not path.is_symlink()
    assert stat.S_IMODE(root.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert is_live(root, "job-1")
    assert not is_live(root, "job-2")
    leases = os.listdir(root / ".rmq" / "leases")
    assert len(leases) == 1 and leases[0].startswith(f"job-1.{os.getpid()}.task-1.")
    assert store.close("job-1", "task-1", failed=False) == "removed"
    assert not path.exists()
    assert not is_live(root, "job-1")
    assert os.listdir(root / ".rmq" / "leases") == []


def test_session_name_that_is_a_symlink_is_refused(tmp_path):
    # Given session_x is a symlink to a directory outside the root
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (root / "session_x").symlink_to(outside)
    # When a task opens session x, Then it is refused, the target untouched, no lease left
    with pytest.raises(SessionError, match="symlink"):
        SessionStore(root).open("x", "t")
    assert (outside / "precious").read_text() == "keep"
    assert os.listdir(outside) == ["precious"]
    assert not is_live(root, "x")
    assert os.listdir(root / ".rmq" / "leases") == []


def test_session_name_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "session_x").write_text("not a dir")
    with pytest.raises(SessionError, match="not a directory"):
        SessionStore(tmp_path).open("x", "t")
    assert (tmp_path / "session_x").read_text() == "not a dir"


def test_after_task_keeps_a_dir_another_task_holds(tmp_path):
    store = SessionStore(tmp_path)
    path = store.open("shared", "t1")
    assert store.open("shared", "t2") == path
    (path / "data").write_text("x")
    assert store.close("shared", "t1", failed=False) == "kept_live"
    assert (path / "data").exists() and is_live(tmp_path, "shared")
    assert store.close("shared", "t2", failed=False) == "removed"
    assert not path.exists()


def test_keep_policy_keeps_the_dir_and_refreshes_its_age(tmp_path):
    store = SessionStore(tmp_path)
    path = store.open("pipe", "t1")
    os.utime(path, (1000, 1000))
    assert store.close("pipe", "t1", failed=False, policy="keep") == "kept"
    assert path.is_dir()
    assert path.stat().st_mtime > time.time() - 60
    assert not is_live(tmp_path, "pipe")
    # the next task of the pipeline finds it
    assert store.open("pipe", "t2") == path
    assert store.close("pipe", "t2", failed=False) == "removed"


@pytest.mark.parametrize("policy", ["after_task", "keep"])
def test_failed_task_keeps_dir_and_marks_the_time(tmp_path, policy):
    store = SessionStore(tmp_path)
    path = store.open("f", "t1")
    (path / "debug.log").write_text("traceback")
    assert store.close("f", "t1", failed=True, policy=policy, now=5000.0) == "kept_failed"
    assert (path / "debug.log").read_text() == "traceback"
    with SessionRoot(tmp_path) as sr:
        assert sr.failed_markers() == {"f": 5000.0}
    # a retry opens the session again: the mark goes, the session is in use
    store.open("f", "t2")
    with SessionRoot(tmp_path) as sr:
        assert sr.failed_markers() == {}
    assert store.close("f", "t2", failed=False, policy=policy) == (
        "removed" if policy == "after_task" else "kept"
    )


def test_close_rejects_unknown_policy(tmp_path):
    store = SessionStore(tmp_path)
    store.open("a", "t")
    with pytest.raises(ConfigError, match="cleanup"):
        store.close("a", "t", failed=False, policy="sometimes")


def test_close_without_open_is_harmless(tmp_path):
    store = SessionStore(tmp_path)
    assert store.close("never", "t", failed=False) == "removed"  # nothing there to remove
    assert not (tmp_path / "session_never").exists()


# --- the guard -----------------------------------------------------------------------------


class _FakeRuntime:
    def __init__(self) -> None:
        self.stats = ProcessStats(None)


@pytest.fixture
def fake_runtime():
    rt = _FakeRuntime()
    runtime.set_current(rt)  # type: ignore[arg-type]
    yield rt
    runtime.set_current(None)


def make_ctx(root: Path, *, args=(), kwargs=None, cleanup="after_task", argnames=None, session=True):
    ctx = TaskContext(
        task_name="tasks.transcribe",
        task_id="tid-1",
        declaration=parse_declaration(session=session, cleanup=cleanup),
        config=load_config({"rmq_session_root": str(root)}, environ={}),
        args=tuple(args),
        kwargs=dict(kwargs or {}),
    )
    if argnames is not None:
        ctx.state["argnames"] = argnames
    return ctx


def test_guard_applies_only_to_session_tasks(tmp_path):
    guard = SessionGuard()
    assert guard.applies(parse_declaration(session=True))
    assert guard.applies(parse_declaration(session="job"))
    assert not guard.applies(parse_declaration())


def test_guard_opens_from_kwargs_and_removes_after_task(tmp_path, fake_runtime):
    root = tmp_path / "sessions"
    guard, ctx = SessionGuard(), make_ctx(root, kwargs={"session_id": "s1", "path": "x"})
    guard.enter(ctx)
    assert ctx.session_dir == root / "session_s1" and ctx.session_dir.is_dir()
    assert is_live(root, "s1")
    guard.exit(ctx, failed=False)
    assert not ctx.session_dir.exists()
    assert fake_runtime.stats.counters == {"sessions": {"opened": 1, "removed": 1}}


def test_guard_reads_positional_id_by_argnames(tmp_path, fake_runtime):
    root = tmp_path / "sessions"
    ctx = make_ctx(root, args=("s2", "/in.wav"), argnames=["session_id", "path"], cleanup="keep")
    guard = SessionGuard()
    guard.enter(ctx)
    guard.exit(ctx, failed=True)
    assert (root / "session_s2").is_dir()
    assert fake_runtime.stats.counters == {"sessions": {"opened": 1, "kept_failed": 1}}


def test_guard_custom_argument_name(tmp_path):
    root = tmp_path / "sessions"
    ctx = make_ctx(root, kwargs={"job": "j-9"}, session="job")
    SessionGuard().enter(ctx)
    assert ctx.session_dir == root / "session_j-9"


def test_guard_without_the_argument_fails_clearly(tmp_path):
    root = tmp_path / "sessions"
    ctx = make_ctx(root, args=("s3",))  # no argnames: cannot know which positional it is
    with pytest.raises(ConfigError, match="tasks.transcribe declares session='session_id'"):
        SessionGuard().enter(ctx)
    assert not root.exists()


@pytest.mark.parametrize("value", BAD_IDS + BAD_VALUES)
def test_guard_rejects_bad_ids_before_touching_files(tmp_path, value):
    root = tmp_path / "sessions"
    ctx = make_ctx(root, kwargs={"session_id": value})
    with pytest.raises(ConfigError, match="invalid session id"):
        SessionGuard().enter(ctx)
    assert not root.exists()
    assert ctx.session_dir is None


def test_guard_exit_after_failed_enter_does_nothing(tmp_path):
    ctx = make_ctx(tmp_path / "sessions", kwargs={"session_id": "../etc"})
    with pytest.raises(ConfigError):
        SessionGuard().enter(ctx)
    SessionGuard().exit(ctx, failed=True)
    assert not (tmp_path / "sessions").exists()


def test_session_true_reads_the_argument_named_by_rmq_session_arg(tmp_path, fake_runtime):
    # Given rmq_session_arg = "job" and a task declared with session=True
    root = tmp_path / "sessions"
    ctx = make_ctx(root, kwargs={"job": "j1", "session_id": "not-this"})
    ctx.config = load_config({"rmq_session_root": str(root), "rmq_session_arg": "job"}, environ={})
    # When the guard opens the session, Then it is the one the "job" argument names
    SessionGuard().enter(ctx)
    assert ctx.session_dir == root / "session_j1"


def test_an_explicit_session_name_beats_rmq_session_arg(tmp_path, fake_runtime):
    root = tmp_path / "sessions"
    ctx = make_ctx(root, kwargs={"session_id": "s9", "job": "j1"}, session="session_id")
    ctx.config = load_config({"rmq_session_root": str(root), "rmq_session_arg": "job"}, environ={})
    SessionGuard().enter(ctx)
    assert ctx.session_dir == root / "session_s9"
