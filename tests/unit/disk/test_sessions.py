"""Session ids, session directories, leases and the session guard (SPEC C6, section 7 row 4)."""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmq.concern import TaskContext
from rmq.core import runtime
from rmq.core.config import load_config
from rmq.core.declarations import parse_declaration
from rmq.core.errors import ConfigError
from rmq.core.procstats import ProcessStats
from rmq.disk.session_ids import validate_session_id
from rmq.disk.session_root import SessionError, SessionRoot, is_live
from rmq.disk.sessions import SessionGuard, SessionStore

ROOT_DIR = Path(__file__).resolve().parents[3]
BAD_IDS = ["../etc", "", "a" * 200, "a/b", "/etc", "a\0b", "a b", "é", "a\n", "a" * 129, ".", "..", "a.b"]
BAD_VALUES = [None, 42, b"abc", ["a"]]

HOLDER = """
import sys
from rmq.disk.sessions import SessionStore
SessionStore(sys.argv[1]).open(sys.argv[2], "holder-task")
print("ready", flush=True)
sys.stdin.read()
"""


def start_holder(root: Path, session_id: str) -> subprocess.Popen[str]:
    """A real process holding a lease on ``session_id``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), session_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT_DIR,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        pytest.fail("lease holder did not start")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# --- validation (SPEC 7 row 4) ---------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "Z", "0", "job-42_b", "a" * 128, "A-_-z"])
def test_valid_ids_pass_unchanged(value):
    assert validate_session_id(value) == value


@pytest.mark.parametrize("value", BAD_IDS + BAD_VALUES)
def test_invalid_ids_are_config_errors_naming_the_value(value):
    with pytest.raises(ConfigError) as info:
        validate_session_id(value)
    message = str(info.value)
    assert "invalid session id" in message
    assert len(message) < 200  # long values are truncated
    assert repr(value)[:20] in message


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


def test_odd_task_ids_make_safe_lease_names(tmp_path):
    store = SessionStore(tmp_path)
    store.open("s", "../../x/\0y")
    [lease] = os.listdir(tmp_path / ".rmq" / "leases")
    assert "/" not in lease and ".." not in lease.split(".", 1)[1].replace(".", " ")
    assert store.close("s", "../../x/\0y", failed=False) == "removed"


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


def test_state_dir_that_is_a_symlink_is_refused(tmp_path):
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / ".rmq").symlink_to(outside)
    with pytest.raises(SessionError):
        SessionStore(root).open("x", "t")
    assert os.listdir(outside) == []


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


def test_is_live_on_missing_root_is_false(tmp_path):
    assert not is_live(tmp_path / "nope", "x")
    assert not (tmp_path / "nope").exists()


# --- leases across processes -------------------------------------------------------------


def test_lease_of_another_process_lives_until_it_is_sigkilled(tmp_path):
    proc = start_holder(tmp_path, "held")
    try:
        assert is_live(tmp_path, "held")
        store = SessionStore(tmp_path)
        store.open("held", "mine")
        assert store.close("held", "mine", failed=False) == "kept_live"
        assert (tmp_path / "session_held").is_dir()
        proc.kill()  # SIGKILL: no handler runs, the kernel drops the flock
        proc.wait(timeout=10)
        assert not is_live(tmp_path, "held")
        with SessionRoot(tmp_path) as sr:
            live, stale = sr.scan_leases()
        assert live == set() and len(stale) == 1
    finally:
        stop(proc)


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


# --- fork safety of the root lock ------------------------------------------------------------


def test_a_child_forked_while_another_thread_holds_the_root_lock_does_not_keep_it(tmp_path):
    # The worker's cleanup thread holds the lock while the main thread forks a pool process:
    # the child must neither keep the lock nor deadlock when it takes the lock itself.
    import threading

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with SessionRoot(tmp_path, create=True) as sr, sr.lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: take the lock once the parent lets go, then exit 0
        try:
            with SessionRoot(tmp_path) as sr, sr.lock():
                pass
            os._exit(0)
        except BaseException:
            os._exit(1)
    try:
        release.set()
        thread.join(10)
        deadline = time.monotonic() + 15
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "the forked child deadlocked on the root lock"
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
        # and this process can take the lock again
        with SessionRoot(tmp_path) as sr, sr.lock():
            pass
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_child_forked_while_holding_the_lock_releases_nothing_of_the_parent(tmp_path):
    import fcntl

    with SessionRoot(tmp_path, create=True) as sr, sr.lock():
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # closing the child's copy must not unlock the parent
        os.waitpid(pid, 0)
        fd = os.open(tmp_path / ".rmq" / "lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
