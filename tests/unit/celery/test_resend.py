"""Re-sending a task keeps the message's own headers under rmq's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from celery.app.task import Context

from rmq.celery.resend import custom_headers, resend


class FakeTask:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def signature_from_request(self, request: Any, **options: Any) -> Any:
        self.sent.append(options)
        return SimpleNamespace(apply_async=lambda: None)


def test_custom_headers_come_from_the_request_whatever_celery_keeps() -> None:
    ctx = Context({"id": "t1", "task": "x", "lang": "py", "root_id": "r", "x_trace": "abc", "traceparent": "00-a"})
    assert custom_headers(ctx) == {"x_trace": "abc", "traceparent": "00-a"}
    bare = SimpleNamespace(id="t1", root_id="r", x_trace="abc", _private=1, headers=None)
    assert custom_headers(bare) == {"x_trace": "abc"}


def test_rmq_headers_are_laid_over_the_message_headers() -> None:
    task = FakeTask()
    ctx = Context({"id": "t1", "task": "x", "x_trace": "abc", "rmq_deferrals": 1})
    resend(task, ctx, 2.0, {"rmq_deferrals": 2})
    assert task.sent == [{"countdown": 2.0, "headers": {"x_trace": "abc", "rmq_deferrals": 2}}]


def test_rabbitmq_dead_letter_headers_are_not_sent_again() -> None:
    ctx = Context({"id": "t1", "task": "x", "x_trace": "abc", "x-death": [{"count": 1}], "x-first-death-queue": "q"})
    assert custom_headers(ctx) == {"x_trace": "abc"}
