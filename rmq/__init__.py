"""rmq: resource governance for Celery workers.

``rmq.install(app)`` wires the governor into a Celery app; ``@governed_task(memory=...,
cpu=..., disk=...)`` declares what a task needs. Nothing happens on import.
"""

from __future__ import annotations

from typing import Any

from rmq import errors as _errors
from rmq.errors import *  # noqa: F403

__all__ = [
    "install",
    "governed_task",
    "GovernedTask",
    "throttle",
    "models",
    "errors",
    "http",
    "signals",
    *_errors.__all__,
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: importing rmq must not import Celery's worker machinery.
    if name == "install":
        from rmq.celery.wiring import install

        return install
    if name in ("governed_task", "GovernedTask"):
        from rmq.celery import task

        return getattr(task, name)
    if name == "throttle":
        from rmq.network.throttle import throttle

        return throttle
    if name in ("models", "http", "signals", "errors"):
        import importlib

        return importlib.import_module(f"rmq.{name}")
    raise AttributeError(f"module 'rmq' has no attribute {name!r}")
