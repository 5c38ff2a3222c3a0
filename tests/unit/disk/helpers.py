"""Helpers shared by the disk tests: trees to remove, sentinels outside the root, lease holders."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).resolve().parents[3]
DAY = 86400.0
NOW = 2_000_000_000.0  # injected clock, far after any real mtime we set
BAD_IDS = ["../etc", "", "a" * 200, "a/b", "/etc", "a\0b", "a b", "é", "a\n", "a" * 129, ".", "..", "a.b"]
BAD_VALUES = [None, 42, b"abc", ["a"]]

HOLDER = """
import sys
from rmq.disk.sessions import SessionStore
SessionStore(sys.argv[1]).open(sys.argv[2], "holder-task")
print("ready", flush=True)
sys.stdin.read()
"""


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything under ``top`` as lstat sees it: type, mode, size, mtime, content or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = p.lstat()
            if p.is_symlink():
                extra: object = os.readlink(p)
            elif p.is_file():
                extra = p.read_bytes()
            else:
                extra = None
            out[str(p.relative_to(top))] = (s.st_mode, s.st_size, s.st_mtime_ns, extra)
    return out


def outside_tree(base: Path) -> Path:
    """A sentinel tree that no cleanup may change."""
    out = base / "outside"
    (out / "dir" / "sub").mkdir(parents=True)
    (out / "file.txt").write_text("precious")
    (out / "dir" / "inner.txt").write_text("inner")
    (out / "dir" / "sub" / "deep.txt").write_text("deep")
    return out


def age(path: Path, seconds_ago: float, now: float = NOW) -> None:
    """Set mtimes of ``path`` and everything below it (links themselves) to ``now - seconds_ago``."""
    t = now - seconds_ago
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def make_session(root: Path, sid: str, files: dict[str, int] | None = None, seconds_ago: float = 10) -> Path:
    path = root / f"session_{sid}"
    path.mkdir(parents=True)
    for name, size in (files or {"data.bin": 10}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x" * size)
    age(path, seconds_ago)
    return path


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
