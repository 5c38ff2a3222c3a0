"""The reference Celery app (``celery -A workers.app worker``).

Broker and result backend come from ``RMQ_BROKER_URL`` / ``RMQ_RESULT_BACKEND`` (default: the
local Redis). ``RMQ_APP_QUEUE`` renames the default queue (tests use it for isolation).
"""

from __future__ import annotations

import os

from celery import Celery

import rmq

broker = os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/0")
backend = os.environ.get("RMQ_RESULT_BACKEND", broker if broker.startswith("redis") else "redis://127.0.0.1:6379/0")

app = Celery("workers", broker=broker, backend=backend, include=["workers.tasks"])
app.conf.update(
    task_default_queue=os.environ.get("RMQ_APP_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    task_track_started=True,
    result_extended=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
rmq.install(app)
