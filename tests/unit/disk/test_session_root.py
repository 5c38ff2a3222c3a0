"""The session root: the state directory, lease files and their liveness."""

from __future__ import annotations

import os

import pytest

from rmq.disk.session_root import SessionError, SessionRoot, is_live
from rmq.disk.sessions import SessionStore

from .helpers import start_holder, stop


def test_state_dir_that_is_a_symlink_is_refused(tmp_path):
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / ".rmq").symlink_to(outside)
    with pytest.raises(SessionError):
        SessionStore(root).open("x", "t")
    assert os.listdir(outside) == []


def test_odd_task_ids_make_safe_lease_names(tmp_path):
    store = SessionStore(tmp_path)
    store.open("s", "../../x/\0y")
    [lease] = os.listdir(tmp_path / ".rmq" / "leases")
    assert "/" not in lease and ".." not in lease.split(".", 1)[1].replace(".", " ")
    assert store.close("s", "../../x/\0y", failed=False) == "removed"


def test_is_live_on_missing_root_is_false(tmp_path):
    assert not is_live(tmp_path / "nope", "x")
    assert not (tmp_path / "nope").exists()


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
