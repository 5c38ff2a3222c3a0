"""The concerns a governed worker runs, in order: the one place that names them all.

Around a task, cluster-wide permits and tokens come first, so that a task without one is deferred
at once instead of waiting for memory while it holds a pool process; hygiene comes last, so that it
measures what the task left behind after everything else was released. The lifecycle-only concerns
(models, monitoring, the autoscaler) follow; their worker hooks run in this order too.
"""

from __future__ import annotations

from functools import lru_cache

from rmq import models
from rmq.celery.autoscale import AutoscaleConcern
from rmq.celery.recycle import request_recycle
from rmq.celery.signals import signal_sink
from rmq.concern import Concern
from rmq.cpu.limits import ThreadCapGuard
from rmq.disk.sessions import SessionGuard
from rmq.memory.hygiene import HygieneGuard
from rmq.memory.reservation import AdmissionGuard
from rmq.models.concern import ModelsConcern
from rmq.monitoring.worker_monitor import MonitoringConcern
from rmq.network.concurrency_guard import ConcurrencyGuard
from rmq.network.rate_limit_guard import RateLimitGuard

__all__ = ["default_concerns"]


@lru_cache(maxsize=1)
def default_concerns() -> tuple[Concern, ...]:
    """Concurrency -> rate limits -> admission (memory, CPU, disk) -> session -> thread caps ->
    hygiene, then models, monitoring and the autoscaler (worker hooks only)."""
    return (
        ConcurrencyGuard(),
        RateLimitGuard(),
        AdmissionGuard(model_bytes=models.loaded_bytes),
        SessionGuard(),
        ThreadCapGuard(),
        HygieneGuard(model_bytes=models.held_bytes, recycle=request_recycle),
        ModelsConcern(),
        MonitoringConcern(extra_sinks=(signal_sink,)),
        AutoscaleConcern(),
    )
