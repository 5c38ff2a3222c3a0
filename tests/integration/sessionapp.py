"""Test app for sessions and disk admission (docs/design.md#sessions): the reference app plus session tasks."""

from __future__ import annotations

import os
import time

from rmq import governed_task
from workers.app import make_app

app = make_app()
app.set_current()


def _write(task, name: str, data: str) -> dict:
    path = task.session_dir
    with open(path / name, "w") as fh:
        fh.write(data)
    return {"dir": str(path), "files": sorted(os.listdir(path)), "pid": os.getpid()}


@governed_task(session=True, bind=True, name="s.write")
def write(self, session_id: str, name: str = "data.txt", data: str = "hello") -> dict:
    """Writes ``name`` into its session directory (removed after the task)."""
    return _write(self, name, data)


@governed_task(session=True, cleanup="keep", bind=True, name="s.write_keep")
def write_keep(self, session_id: str, name: str = "data.txt", data: str = "hello") -> dict:
    """Writes ``name`` into its session directory, which stays for the next task."""
    return _write(self, name, data)


@governed_task(session=True, bind=True, name="s.read")
def read(self, session_id: str, name: str = "data.txt") -> dict:
    """Reads a file an earlier task of the pipeline left in the session directory."""
    path = self.session_dir
    with open(path / name) as fh:
        return {"dir": str(path), "data": fh.read(), "files": sorted(os.listdir(path))}


@governed_task(session=True, bind=True, name="s.fail")
def fail(self, session_id: str) -> None:
    """Writes a file, then fails: the directory stays for ``rmq_failed_session_ttl``."""
    _write(self, "partial.txt", "half done")
    raise RuntimeError("session task failed on purpose")


@governed_task(session=True, bind=True, name="s.hold")
def hold(self, session_id: str, max_s: float = 60.0) -> dict:
    """Writes ``started``, then runs (holding its lease) until a ``release`` file appears."""
    path = self.session_dir
    (path / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + max_s
    while not (path / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody released the session")
        time.sleep(0.05)
    return {"dir": str(path), "files": sorted(os.listdir(path))}


@governed_task(disk="1000TiB", name="s.huge_disk")
def huge_disk() -> str:
    """Declares more disk than any test machine's disk holds."""
    return "ran"


@governed_task(disk=int(os.environ.get("SESSIONAPP_MORE_THAN_FREE", 1024**2)), name="s.more_disk_than_free")
def more_disk_than_free() -> str:
    """Declares more disk than is free but less than the disk holds (the test sets the figure)."""
    return "ran"


@governed_task(disk="1MiB", name="s.small_disk")
def small_disk() -> str:
    """Declares a little disk."""
    return "ran"
