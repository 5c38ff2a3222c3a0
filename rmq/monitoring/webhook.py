"""The alert webhook: POSTs each alert as JSON from a daemon thread of its own, with retries.

A sink must never hold up what raised the alert (the worker's alert loop, the monitor beat task),
so :class:`WebhookSender` only queues; its thread delivers, retries connection errors, timeouts
and 5xx with a doubling back-off, and counts what it sent, failed or dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from rmq.monitoring.alerts import Alert

__all__ = ["WebhookSender"]

#: the logger of every alert delivery, so one name covers all of them in a logging config
logger = logging.getLogger("rmq.monitoring.alerts")

_STOP = object()


class WebhookSender:
    """POSTs alert JSON to a URL from a background daemon thread; never blocks the caller.

    Args:
        url: where to POST.
        retries: extra attempts after the first, on connection errors, timeouts and 5xx.
        backoff_s: wait before the first retry, doubled for each further one.
        timeout_s: per-request timeout.
        max_queue: alerts waiting to be sent; beyond it new ones are dropped and counted.

    Attributes:
        sent, failed, dropped: delivery counters.
    """

    def __init__(
        self, url: str, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 2.0, max_queue: int = 100
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"alert webhook must be an http(s) URL, got {url!r}")
        self.url = url
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        self.sent = self.failed = self.dropped = 0
        self._lock = threading.Condition()
        self._pending = 0
        self._closed = False
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()

    def __call__(self, alert: Alert) -> None:
        """Sink interface: queue ``alert.as_dict()``."""
        self.send(alert.as_dict())

    def send(self, payload: Mapping[str, Any] | Alert) -> bool:
        """Queue one JSON body; return False (and count a drop) if the queue is full or stopped."""
        body = payload.as_dict() if isinstance(payload, Alert) else dict(payload)
        with self._lock:
            if self._closed:
                self.dropped += 1
                return False
            self._ensure_thread()
            try:
                self._queue.put_nowait(body)
            except queue.Full:
                self.dropped += 1
                return False
            self._pending += 1
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued alert is delivered or given up on; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Let queued alerts go out for up to ``timeout_s``, then abandon the rest (counted as dropped)."""
        with self._lock:
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
        if thread is None:
            return
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            self._stop.set()
        thread.join(timeout_s)
        self._stop.set()

    def info(self) -> dict[str, int]:
        """Delivery counters: sent, failed, dropped, pending."""
        with self._lock:
            return {
                "sent": self.sent,
                "failed": self.failed,
                "dropped": self.dropped,
                "pending": self._pending,
            }

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # made before a fork: the thread and queue did not come along
            self._pid = os.getpid()
            self._queue = queue.Queue(maxsize=self.max_queue)
            self._pending = 0
            self._thread = threading.Thread(target=self._run, name="rmq-alert-webhook", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                body = self._queue.get()
                if body is _STOP:
                    break
                try:
                    ok = self._deliver(client, body)
                except Exception:  # this thread must outlive any one bad alert
                    logger.exception("rmq alert webhook: delivering alert %s failed", body.get("name"))
                    ok = False
                with self._lock:
                    if ok:
                        self.sent += 1
                    else:
                        self.failed += 1
                    self._pending -= 1
                    self._lock.notify_all()
        with self._lock:
            while True:
                try:
                    body = self._queue.get_nowait()
                except queue.Empty:
                    break
                if body is not _STOP:
                    self.dropped += 1
                    self._pending -= 1
            self._lock.notify_all()

    def _deliver(self, client: httpx.Client, body: dict[str, Any]) -> bool:
        parts = urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}{parts.path}"  # no credentials or query in logs
        content = json.dumps(body, default=str).encode()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt and self._stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                break
            try:
                response = client.post(
                    self.url, content=content, headers={"content-type": "application/json"}
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            except httpx.HTTPError as exc:  # e.g. too many redirects: retrying cannot help
                problem = f"{type(exc).__name__}: {exc}"
                break
            if response.status_code < 400:
                return True
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500:
                break
        logger.warning(
            "rmq alert webhook %s failed (%s); alert %s not delivered", where, problem, body.get("name")
        )
        return False
