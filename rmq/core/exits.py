"""Leaving with one line: what a bad setting or a bad command line gets, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from rmq.core.errors import ConfigError

__all__ = ["exit_config_error", "exit_with_line"]


def exit_with_line(message: str, status: int = 2, *, now: bool = False) -> NoReturn:
    """Write ``rmq: <message>`` as one line on stderr and exit with ``status``: no traceback.

    ``now=True`` leaves with ``os._exit``, for a worker that is booting: Celery would print a
    SystemExit raised inside a bootstep as a traceback, and its exit handlers would wait for a pool
    that never started.
    """
    sys.stderr.write(f"rmq: {message}\n")
    sys.stderr.flush()
    if now:
        os._exit(status)
    raise SystemExit(status)


def exit_config_error(exc: ConfigError) -> NoReturn:
    """A worker with a bad setting refuses to start: one line, exit status 2."""
    exit_with_line(f"configuration error: {exc}", now=True)
