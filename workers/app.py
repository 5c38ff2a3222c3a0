"""The reference Celery app (``celery -A workers.app worker``).

Broker and result backend come from ``RMQ_BROKER_URL`` / ``RMQ_RESULT_BACKEND`` (default: the
local Redis). ``RMQ_APP_QUEUE`` renames the default queue (tests use it for isolation).
"""

from __future__ import annotations

import os

from celery import Celery

import rmq

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def make_app(broker: str | None = None, backend: str | None = None, queue: str | None = None) -> Celery:
    """A Celery app configured like the reference app, with rmq installed."""
    broker = broker or os.environ.get("RMQ_BROKER_URL", DEFAULT_BROKER)
    if backend is None:
        fallback = broker if broker.startswith("redis") else DEFAULT_BROKER
        backend = os.environ.get("RMQ_RESULT_BACKEND") or fallback
    app = Celery("workers", broker=broker, backend=backend, include=["workers.tasks", "workers.pipeline"],
                 set_as_current=False)
    app.conf.update(
        task_default_queue=queue or os.environ.get("RMQ_APP_QUEUE", "celery"),
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    rmq.install(app)
    return app


app = make_app()
app.set_current()
