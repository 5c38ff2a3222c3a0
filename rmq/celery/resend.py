"""Re-sending a task as the same message: a deferral (from the pool process) and a re-run after a
memory kill (from the main process). Celery glue.

Celery's ``signature_from_request`` keeps the request's ids, links, group and chord, expiry, time
limits, ``reply_to``, retries and priority, and the message's custom headers; but an explicit
``headers=`` replaces the custom ones. So rmq's headers are laid over the message's own. Custom
headers include tracing context (``traceparent``): when OpenTelemetry is loaded in the sending
process, the publish runs inside the context those headers carry, so an instrumented publish keeps
the first run's trace instead of starting a new one. See docs/design.md#deferrals.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.app.task import Context

__all__ = ["custom_headers", "resend"]

#: what Celery itself puts in a task message's headers (protocol 2) besides the custom ones
_CELERY_KEYS = frozenset({*Context.__dict__, "lang", "task", "argsrepr", "kwargsrepr", "compression"})
_X_DEATH = frozenset({"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                      "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason"})


def custom_headers(request: Any) -> dict[str, Any]:
    """The custom headers of a task's message, from its request (``task.request`` or a worker's
    request context): what ``apply_async(headers=...)`` and instrumentations put there."""
    headers = getattr(request, "headers", None)
    if not isinstance(headers, dict):
        values = vars(request) if hasattr(request, "__dict__") else {}
        headers = {k: v for k, v in values.items() if not k.startswith("_") and k not in _CELERY_KEYS}
    # RabbitMQ's dead-lettering records: sent again, they would make the broker see a cycle (as Celery drops them)
    return {k: v for k, v in headers.items() if k not in _X_DEATH}


def resend(task: Any, request: Any, countdown_s: float, rmq_headers: dict[str, Any]) -> Any:
    """Publish ``request``'s task again after ``countdown_s``, with every header and option of its
    message and ``rmq_headers`` laid over them; returns the signature sent."""
    headers = {**custom_headers(request), **rmq_headers}
    sig = task.signature_from_request(request, countdown=countdown_s, headers=headers)
    with _trace_context(headers):
        sig.apply_async()
    return sig


@contextmanager
def _trace_context(headers: dict[str, Any]) -> Iterator[None]:
    """The OpenTelemetry context ``headers`` carry, attached while publishing, when the
    application has loaded OpenTelemetry (rmq never imports it first)."""
    if "opentelemetry.propagate" not in sys.modules:
        yield
        return
    from opentelemetry import context, propagate, trace

    if trace.get_current_span().get_span_context().is_valid:  # a running span already carries it
        yield
        return
    token = context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        context.detach(token)
