"""A test app for warm shutdowns and re-sent messages: tasks that count their bodies and record what
their request carried, in the result backend's Redis (``RMQ_RESULT_BACKEND``).

With ``RMQ_TEST_OTEL=1`` each pool process instruments Celery with OpenTelemetry at
``worker_process_init`` and writes the trace id of every task span it ends to ``otel:<task id>``;
with ``RMQ_TEST_OTEL=main`` the main process is instrumented too (at ``worker_init``, before the fork).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery.signals import worker_init, worker_process_init

import workers.tasks  # noqa: F401  (the reference tasks)
from rmq import governed_task
from rmq.celery.recycle import request_recycle
from workers.app import make_app

app = make_app()
app.conf.worker_soft_shutdown_timeout = float(os.environ.get("DRAIN_SOFT_SHUTDOWN_TIMEOUT", "0"))
app.set_current()

MiB = 1024 * 1024


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["RMQ_RESULT_BACKEND"])


def _seen(request: Any) -> dict[str, Any]:
    return {
        "x_trace": request.get("x_trace"),
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "correlation_id": request.correlation_id,
        "reply_to": request.reply_to,
        "expires": request.expires,
        "timelimit": list(request.timelimit or ()),
        "callbacks": len(request.callbacks or ()),
        "priority": (request.delivery_info or {}).get("priority"),
        "traceparent": json.dumps(request.get("traceparent")),
        "pid": os.getpid(),
        "hostname": request.hostname,
    }


@governed_task(memory="64MiB", name="d.long", bind=True)
def long(self: Any, seconds: float, rerun_seconds: float | None = None) -> dict:
    """Counts its body in ``bodies:<task id>``, then sleeps (``rerun_seconds`` on a second body, if given)."""
    r = _redis()
    body = r.incr(f"bodies:{self.request.id}")
    r.rpush(f"ran_on:{self.request.id}", self.request.hostname or "")
    started = time.time()
    time.sleep(seconds if body == 1 or rerun_seconds is None else rerun_seconds)
    return {"pid": os.getpid(), "started": started, "ended": time.time()}


@governed_task(memory="64MiB", name="d.recycled", bind=True)
def recycled(self: Any, seconds: float, ask: bool) -> dict:
    """Counts its body in ``bodies:<task id>``; with ``ask``, has rmq recycle its process after it (as
    the hygiene guard does for a leak); then sleeps."""
    r = _redis()
    r.incr(f"bodies:{self.request.id}")
    requested = request_recycle("test", suspect_task=self.name) if ask else False
    time.sleep(seconds)
    return {"pid": os.getpid(), "requested": requested}


@governed_task(memory="64MiB", concurrency={"d_permit": 1}, name="d.permit", bind=True)
def permit(self: Any, hold_s: float) -> dict:
    """Holds the cluster permit ``d_permit`` (one at a time); records what each run saw."""
    _redis().rpush(f"seen:{self.request.id}", json.dumps(_seen(self.request)))
    time.sleep(hold_s)
    return {"pid": os.getpid()}


@governed_task(memory="100MiB", name="d.grow", bind=True)
def grow(self: Any, mib: int, hold_s: float) -> dict:
    """Touches ``mib`` MiB on its first run only (a kill re-runs it), then holds ``hold_s``."""
    r = _redis()
    r.rpush(f"seen:{self.request.id}", json.dumps(_seen(self.request)))
    block = bytearray(0)
    if r.incr(f"grow_runs:{self.request.id}") == 1:
        block = bytearray(mib * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
    time.sleep(hold_s)
    del block
    return {"pid": os.getpid()}


@governed_task(memory="100MiB", name="d.balloon", bind=True)
def balloon(self: Any, cap_mib: int, hold_s: float) -> dict:
    """Marks ``balloon:<task id>``, waits a second, then grows 50 MiB at a time up to ``cap_mib`` and
    holds it: over its declaration, but bounded."""
    _redis().incr(f"balloon:{self.request.id}")
    time.sleep(1.0)
    blocks = []
    for _ in range(cap_mib // 50):
        block = bytearray(50 * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(0.05)
    time.sleep(hold_s)
    return {"pid": os.getpid(), "held_mib": len(blocks) * 50}


@app.task(name="d.mark")
def mark(result: Any, key: str) -> None:
    """A link callback: counts its calls in ``key``."""
    _redis().incr(key)


@worker_init.connect
def _instrument_main(**_: Any) -> None:
    if os.environ.get("RMQ_TEST_OTEL") == "main":  # the main process too; pool processes inherit it
        _instrument()


@worker_process_init.connect
def _instrument_child(**_: Any) -> None:
    if os.environ.get("RMQ_TEST_OTEL") == "1":
        _instrument()


def _instrument() -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class _ToRedis(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            r = _redis()
            for span in spans:
                task_id = (span.attributes or {}).get("messaging.message.id")
                if task_id and span.name.startswith("run/"):
                    r.rpush(f"otel:{task_id}", format(span.context.trace_id, "032x"))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_ToRedis()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument(tracer_provider=provider)


@app.task(name="d.vars", bind=True)
def request_vars(self: Any) -> dict:
    """What the request of a plain task holds (its attribute names and values, as text)."""
    return {k: repr(v)[:200] for k, v in vars(self.request).items()}
