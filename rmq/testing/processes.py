"""Stopping a helper process a test or bench started (a browser, Prometheus, Flower), by its PID."""

from __future__ import annotations

import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace_s``, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
