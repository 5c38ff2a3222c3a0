"""A Celery app configured the way Django projects do it: a settings object read with
``config_from_object(settings, namespace="CELERY")``, every rmq key under the namespace.

Broker and backend come from ``RMQ_BROKER_URL``; the budget from ``HABITS_BUDGET`` (a test value,
not an rmq variable, so that the settings object is the only place rmq can find it).
"""

from __future__ import annotations

import os
import socket

from celery import Celery

import rmq
from rmq import governed_task


def make_settings(broker: str) -> type:
    class Settings:
        DEBUG = False
        CELERY_BROKER_URL = broker
        CELERY_RESULT_BACKEND = broker
        CELERY_TASK_DEFAULT_QUEUE = os.environ.get("RMQ_APP_QUEUE", "celery")
        CELERY_WORKER_PREFETCH_MULTIPLIER = 1
        CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
        CELERY_WORKER_HIJACK_ROOT_LOGGER = False
        CELERY_RMQ_MEMORY_BUDGET = os.environ.get("HABITS_BUDGET", "1GiB")
        CELERY_RMQ_SESSION_ARG = "job"
        CELERY_RMQ_SESSION_ROOT = os.environ.get("HABITS_SESSION_ROOT")

    return Settings


def make_app(broker: str | None = None) -> Celery:
    """The Django-style app, rmq installed."""
    app = Celery("habits", set_as_current=False)
    app.config_from_object(make_settings(broker or os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/0")),
                           namespace="CELERY")
    rmq.install(app)
    return app


@governed_task(memory="8MiB", name="habits.where")
def where() -> dict:
    """Which worker and process ran this."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@governed_task(heavy=True, name="habits.heavy")
def heavy() -> dict:
    """A heavy task: routed to the heavy queue."""
    return {"pid": os.getpid()}


@governed_task(session=True, bind=True, cleanup="keep", name="habits.session")
def in_session(self, job: str) -> str:
    """The session directory rmq opened for ``job`` (the argument rmq_session_arg names)."""
    return str(self.session_dir)


app = make_app()
app.set_current()
