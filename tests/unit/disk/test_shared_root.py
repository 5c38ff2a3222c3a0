"""A session root in a directory every user can write to (the shared temporary directory, where the
default root lives) is used only when it is a real directory of this user that nobody else can write."""

from __future__ import annotations

import os
import tempfile

import pytest

from rmq.core.config import load_config
from rmq.disk.cleanup import cleanup_from_config
from rmq.disk.session_root import SessionError
from rmq.disk.sessions import SessionStore

OTHER_UID = 65534  # nobody


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):
    """A sticky, world-writable directory standing in for /tmp, made the temporary directory."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def _default_root() -> str:
    root = load_config({}, environ={}).session_root_path
    assert os.path.dirname(root) == tempfile.gettempdir()
    return root


def test_a_default_root_another_user_created_is_refused(shared_tmp):
    # Given another local user created the default session root first, open to themselves
    root = _default_root()
    os.mkdir(root, 0o700)
    os.chown(root, OTHER_UID, OTHER_UID)
    # When a task opens a session
    with pytest.raises(SessionError) as info:
        SessionStore(root).open("s1", "task-1")
    # Then it is refused with a clear reason, and nothing was created in it
    assert f"owned by uid {OTHER_UID}" in str(info.value) and "rmq_session_root" in str(info.value)
    assert os.listdir(root) == []
    # and cleanup refuses it too rather than act on what that user planted
    with pytest.raises(SessionError):
        cleanup_from_config(load_config({}, environ={}))


def test_a_default_root_that_is_a_symlink_is_refused(shared_tmp, tmp_path):
    # Given the default root's name is a symlink to a directory (someone else's choice of target)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    root = _default_root()
    os.symlink(target, root)
    # When a task opens a session, Then it is refused and nothing lands in the target
    with pytest.raises(SessionError) as info:
        SessionStore(root).open("s1", "task-1")
    assert "symlink" in str(info.value)
    assert os.listdir(target) == []


def test_a_default_root_others_can_write_is_refused(shared_tmp):
    # Given the default root is ours but group- and world-writable
    root = _default_root()
    os.mkdir(root)
    os.chmod(root, 0o777)
    # When a task opens a session, Then it is refused
    with pytest.raises(SessionError) as info:
        SessionStore(root).open("s1", "task-1")
    assert "writable by others" in str(info.value)


def test_a_default_root_made_here_is_private_and_used(shared_tmp):
    # Given no default root yet, When a task opens a session
    root = _default_root()
    path = SessionStore(root).open("s1", "task-1")
    # Then the root was made, private to this user, and the session is in it
    st = os.lstat(root)
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o700
    assert path.is_dir() and path.parent == type(path)(root)
