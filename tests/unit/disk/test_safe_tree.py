"""Removing and measuring a tree: links unlinked, never followed; nothing outside the tree changes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import rmq.disk.safe_tree as safe_tree_mod
from rmq.disk.safe_tree import measure_tree, remove_tree

from .helpers import DAY, NOW, ROOT_DIR, make_session, outside_tree, snapshot


def test_remove_tree_counts_files_and_bytes(tmp_path):
    make_session(tmp_path, "a", {"one": 100, "d/two": 50, "d/e/three": 7})
    removed = remove_tree(tmp_path, "session_a")
    assert removed.bytes_freed == 157
    assert removed.entries == 6  # 3 files, d, d/e, the session dir
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_remove_tree_refuses_paths(tmp_path, name):
    with pytest.raises(ValueError):
        remove_tree(tmp_path, name)


def test_remove_tree_of_missing_name_is_empty(tmp_path):
    assert remove_tree(tmp_path, "nothing") == (0, 0)


def test_directory_swapped_for_a_symlink_during_the_walk_is_not_followed(tmp_path, monkeypatch):
    # Given a session with a subdirectory, and an attacker who swaps that subdirectory for a
    # symlink to the outside tree between the walk's lstat and its open
    outside = outside_tree(tmp_path)
    root = tmp_path / "sessions"
    sess = make_session(root, "race", {"sub/a.txt": 1})
    moved = tmp_path / "moved"
    real_open_dir = safe_tree_mod._open_dir
    swapped = []

    def racing_open_dir(parent_fd, name, fix_perms):
        if name == "sub" and not swapped:
            (sess / "sub").rename(moved)
            (sess / "sub").symlink_to(outside / "dir")
            swapped.append(name)
        return real_open_dir(parent_fd, name, fix_perms)

    monkeypatch.setattr(safe_tree_mod, "_open_dir", racing_open_dir)
    before = snapshot(outside)
    # When the session is removed
    remove_tree(root, "session_race")
    # Then the link was unlinked, the outside is intact
    assert swapped == ["sub"]
    assert not sess.exists()
    assert snapshot(outside) == before
    assert (moved / "a.txt").exists()


def test_unwritable_and_unreadable_dirs_are_emptied():
    # Real permissions only bind a non-root user: as root, remove as nobody in a child process.
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sess = make_session(base / "r", "p", {"ro/f": 5, "noread/g": 6, "noexec/h": 7})
        script = (
            "import os, sys\n"
            "from rmq.disk.safe_tree import remove_tree\n"
            "if os.geteuid() == 0:\n"
            "    os.setgid(65534); os.setuid(65534)\n"
            "print(tuple(remove_tree(sys.argv[1], 'session_p')))\n"
        )
        if os.geteuid() == 0:
            for dirpath, dirnames, filenames in os.walk(base):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.chown(name, 65534, 65534)
        (sess / "ro").chmod(0o500)
        (sess / "noread").chmod(0o300)
        (sess / "noexec").chmod(0o600)
        sess.chmod(0o500)
        out = subprocess.run(
            [sys.executable, "-c", script, str(base / "r")],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT_DIR,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "(18, 7)"
        assert os.listdir(base / "r") == []


def test_measure_tree_does_not_follow_links(tmp_path):
    outside = outside_tree(tmp_path)
    sess = make_session(tmp_path, "m", {"f": 10}, seconds_ago=3 * DAY)
    (sess / "l").symlink_to(outside)
    os.utime(sess / "l", (NOW - 3 * DAY, NOW - 3 * DAY), follow_symlinks=False)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        info = measure_tree(fd, "session_m")
    finally:
        os.close(fd)
    assert info.bytes == 10 and info.entries == 3
    assert info.newest_mtime == pytest.approx(NOW - 3 * DAY)
