"""A Celery app without rmq, as a deployment has it before adopting rmq (broker from ``RMQ_BROKER_URL``,
default queue from ``RMQ_APP_QUEUE``; ``PLAIN_RMQ_LAYOUT=1`` gives it rmq's Redis layout by hand)."""

from __future__ import annotations

import os
import time

from celery import Celery


def make_app(broker: str | None = None, queue: str | None = None) -> Celery:
    """The plain app on ``broker`` (default: ``RMQ_BROKER_URL``)."""
    plain = Celery("plain", broker=broker or os.environ.get("RMQ_BROKER_URL", "redis://127.0.0.1:6379/0"),
                   set_as_current=False)
    plain.conf.update(task_default_queue=queue or os.environ.get("RMQ_APP_QUEUE", "celery"), task_acks_late=True,
                      worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    if os.environ.get("PLAIN_RMQ_LAYOUT") == "1":  # rmq's Redis layout, set by hand, without rmq
        plain.conf.broker_transport_options = {"priority_steps": list(range(10)), "sep": ":",
                                               "queue_order_strategy": "priority"}
    plain.task(name="plain.sleep")(_sleep)
    return plain


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


app = make_app()
