"""The alert webhook against real local HTTP servers: JSON bodies, retries, never blocking the caller."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rmq.monitoring.alerts import Alert
from rmq.monitoring.webhook import WebhookSender


class Recorder:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses  # one per request; the last one repeats
        self.bodies: list[dict] = []


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder([200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            recorder.bodies.append(body)
            status = recorder.statuses[min(len(recorder.bodies), len(recorder.statuses)) - 1]
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", recorder
    finally:
        server.shutdown()
        server.server_close()


def an_alert(name: str = "memory") -> Alert:
    return Alert(name, 0.9, 0.85, "memory at 90% of budget", 1234.5, "w1@box")


def test_webhook_posts_alert_json_and_retries_after_a_500(webhook_server):
    url, recorder = webhook_server
    recorder.statuses = [500, 200]
    sender = WebhookSender(url, retries=3, backoff_s=0.05, timeout_s=2)
    try:
        assert sender.send(an_alert()) is True
        assert sender.wait_idle(10)
    finally:
        sender.stop()

    assert recorder.bodies == [an_alert().as_dict(), an_alert().as_dict()]
    assert sender.info() == {"sent": 1, "failed": 0, "dropped": 0, "pending": 0}


def test_webhook_does_not_retry_a_4xx(webhook_server):
    url, recorder = webhook_server
    recorder.statuses = [400]
    sender = WebhookSender(url, retries=3, backoff_s=0.01)
    try:
        sender(an_alert())  # the sink interface
        assert sender.wait_idle(10)
    finally:
        sender.stop()
    assert len(recorder.bodies) == 1
    assert (sender.sent, sender.failed) == (0, 1)


def test_webhook_retries_connection_errors_then_counts_a_failure(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sender = WebhookSender(f"http://127.0.0.1:{port}/hook", retries=2, backoff_s=0.01)
    caplog.set_level(logging.WARNING, logger="rmq.monitoring.alerts")
    try:
        sender.send({"name": "memory"})
        assert sender.wait_idle(10)
    finally:
        sender.stop()
    assert (sender.sent, sender.failed) == (0, 1)
    assert any("webhook" in r.getMessage() and "ConnectError" in r.getMessage() for r in caplog.records)


def test_webhook_never_blocks_the_caller_even_when_the_server_hangs():
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)  # accepts connections into the backlog and never answers
    sender = WebhookSender(f"http://127.0.0.1:{hang.getsockname()[1]}/", retries=0, timeout_s=2, max_queue=2)
    try:
        started = time.monotonic()
        results = [sender.send(an_alert()) for _ in range(10)]
        elapsed = time.monotonic() - started

        assert elapsed < 0.5
        assert results.count(True) <= 3  # at most one in flight plus a full queue of two
        assert sender.dropped == results.count(False) >= 7

        started = time.monotonic()
        sender.stop(timeout_s=0.1)
        assert time.monotonic() - started < 1.0
        assert sender.send(an_alert()) is False  # stopped: dropped, still without blocking
    finally:
        hang.close()
        if sender._thread is not None:
            sender._thread.join(5)


def test_webhook_refuses_a_non_http_url():
    with pytest.raises(ValueError, match="ftp://x"):
        WebhookSender("ftp://x/hook")

