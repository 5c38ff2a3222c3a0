"""A local fake translation API, rate limited on its side, for tests and the demo.

``POST /translate {"text": ..., "target": ...}`` answers ``{"translation": ..., "synthetic": true}``:
for ``de``, ``fr`` and ``es`` the stored translation of the closest sentence of the phrasebook
(``workers.phrasebook``) with its ``"match"`` (1.0: the same words), as a translation memory does;
the text reversed when ``target`` is ``"reverse"``; else, or with no close sentence, upper-cased.
Beyond ``--rate`` (a fixed window per period, the way many real APIs count) it answers 429 with
``Retry-After`` (seconds to the next window, at least 1, or ``--retry-after``); with ``--fail-rate p``
an accepted request answers 503 with probability ``p``; ``--latency s`` delays every answer. HTTP/1.1
with keep-alive.

``GET /stats`` (JSON) and ``POST /reset`` are control endpoints, never counted. Everything else
counts: requests per one-second wall-clock window and in any sliding second, connections opened
and still open (connections that made at least one counted request), requests in flight (the
most at once), bytes received and sent (request line + headers + body; status line + headers +
body), 429s and 503s.

Run ``python -m workers.fake_api --port 0 --rate 5/s``: the first line printed is the bound port.
Tests use :func:`start_in_thread`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from rmq.core.units import Rate, parse_rate
from workers import phrasebook

__all__ = ["FakeApi", "main", "start_in_thread"]

_CONTROL = {("GET", "/stats"), ("POST", "/reset"), ("GET", "/health")}


class _Counting:
    """Wraps a handler's rfile or wfile and counts the bytes that pass."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.count = raw, 0

    def readline(self, *args: Any) -> bytes:
        data = self.raw.readline(*args)
        self.count += len(data)
        return data

    def read(self, *args: Any) -> bytes:
        data = self.raw.read(*args)
        self.count += len(data)
        return data

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class ApiState:
    """Counters and the server-side limiter, shared by every handler thread."""

    def __init__(self, rate: Rate | None, fail_rate: float, retry_after_s: int | None, seed: int | None,
                 latency_s: float = 0.0):
        self.rate, self.fail_rate, self.retry_after_s = rate, fail_rate, retry_after_s
        self.latency_s = latency_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        self.open_connections = self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (live connections stay open and counted as open)."""
        self.requests = self.connections_opened = self.bytes_received = self.bytes_sent = 0
        self.max_in_flight = self.in_flight
        self.status: dict[int, int] = {}
        self.windows: dict[int, int] = {}
        self.arrivals: deque[float] = deque(maxlen=100_000)
        self.events: deque[tuple[float, int, int]] = deque(maxlen=100_000)  # (time, connection, status)
        self.accepted: dict[int, int] = {}  # limiter window -> accepted requests

    def decide(self, now: float) -> tuple[int, dict[str, str]]:
        """Count an arrival and pick its status: 429 beyond the rate, 503 at random, else 200."""
        self.requests += 1
        self.arrivals.append(now)
        self.windows[int(now)] = self.windows.get(int(now), 0) + 1
        if self.rate is not None:
            window = int(now // self.rate.period_s)
            if self.accepted.get(window, 0) >= self.rate.count:
                wait = (window + 1) * self.rate.period_s - now
                after = self.retry_after_s if self.retry_after_s is not None else max(1, math.ceil(wait))
                return 429, {"Retry-After": str(after)}
            self.accepted = {window: self.accepted.get(window, 0) + 1}
        if self.fail_rate and self.rng.random() < self.fail_rate:
            return 503, {}
        return 200, {}

    def snapshot(self, events: bool = False) -> dict[str, Any]:
        """Counters as JSON-ready data; ``events`` adds ``[time, connection, status]`` per request."""
        times, best, lo = list(self.arrivals), 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= 1.0:
                lo += 1
            best = max(best, hi - lo + 1)
        out = {
            "requests": self.requests,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "status_429": self.status.get(429, 0),
            "status_503": self.status.get(503, 0),
            "connections_opened": self.connections_opened,
            "open_connections": self.open_connections,
            "max_in_flight": self.max_in_flight,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "windows": {str(k): v for k, v in sorted(self.windows.items())},
            "max_per_window": max(self.windows.values(), default=0),
            "max_in_any_1s": best,
            "rate": str(self.rate) if self.rate else None,
            "fail_rate": self.fail_rate,
        }
        if events:
            out["events"] = [list(e) for e in self.events]
        return out


def _translate(body: bytes) -> tuple[int, dict[str, Any]]:
    try:
        doc = json.loads(body or b"null")
        text, target = doc["text"], doc.get("target", "en")
        if not isinstance(text, str):
            raise TypeError("text must be a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return 400, {"error": f"expected JSON {{'text': str, 'target': str}}: {exc}"}
    if target == "reverse":
        return 200, {"translation": text[::-1], "target": target, "synthetic": True}
    found = phrasebook.translate(text, target)
    if found is not None:
        return 200, {"translation": found[0], "target": target, "match": round(found[1], 3), "synthetic": True}
    return 200, {"translation": text.upper(), "target": target, "synthetic": True}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeTranslateAPI/1.0"
    timeout = 60  # idle keep-alive connections end after a minute
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.rfile, self.wfile = _Counting(self.rfile), _Counting(self.wfile)  # type: ignore[assignment]
        self.conn_id = 0  # set on the first counted request
        with self.server.state.lock:
            self.server.state.live.add(self.connection)

    def finish(self) -> None:
        state = self.server.state
        with state.lock:
            state.live.discard(self.connection)
            if self.conn_id:
                state.open_connections -= 1
        super().finish()

    def handle_one_request(self) -> None:
        self.rx_mark = self.rfile.count  # type: ignore[attr-defined]
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        state = self.server.state
        if (self.command, path) in _CONTROL:
            with state.lock:
                if path == "/reset":
                    state.reset()
                payload = state.snapshot(events="events=1" in self.path) if path == "/stats" else {"ok": True}
            self._reply(200, {}, payload, counted=False)
            return
        with state.lock:
            if not self.conn_id:
                state.connections_opened += 1
                state.open_connections += 1
                self.conn_id = state.connections_opened
            status, headers = state.decide(time.time())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        if state.latency_s:
            time.sleep(state.latency_s)
        if status == 200:
            if path == "/translate" and self.command == "POST":
                status, payload = _translate(body)
            else:
                status, payload = 404, {"error": f"no route {self.command} {path}"}
        else:
            payload = {"error": HTTPStatus(status).phrase}
        self._reply(status, headers, payload, counted=True)

    def _reply(self, status: int, headers: dict[str, str], payload: Any, counted: bool) -> None:
        body = json.dumps(payload).encode()
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Server: {self.server_version}",
                 f"Date: {formatdate(usegmt=True)}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        if counted:
            state = self.server.state
            with state.lock:  # before the write, so a client that got its answer sees it counted
                state.status[status] = state.status.get(status, 0) + 1
                state.bytes_received += self.rfile.count - self.rx_mark  # type: ignore[attr-defined]
                state.bytes_sent += len(data)
                state.events.append((time.time(), self.conn_id, status))
                state.in_flight -= 1
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: ApiState


class FakeApi:
    """A running fake API. Use as a context manager, or call :meth:`stop`.

    Attributes:
        url: ``http://host:port``.
        port: the bound port.
        state: live counters (:meth:`stats` for a snapshot).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, rate: str | Rate | None = None,
                 fail_rate: float = 0.0, retry_after_s: int | None = None, seed: int | None = None,
                 latency_s: float = 0.0) -> None:
        self.state = ApiState(parse_rate(rate) if rate is not None else None, float(fail_rate),
                              retry_after_s, seed, latency_s)
        self.server = _Server((host, port), _Handler)
        self.server.state = self.state
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> FakeApi:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"fake-api-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stats(self, events: bool = False) -> dict[str, Any]:
        """A snapshot of the counters (same as ``GET /stats``)."""
        with self.state.lock:
            return self.state.snapshot(events)

    def reset(self) -> None:
        """Zero the counters (same as ``POST /reset``)."""
        with self.state.lock:
            self.state.reset()

    def stop(self) -> None:
        """Stop serving and drop every open connection."""
        self.server.shutdown()
        self.server.server_close()
        with self.state.lock:
            live = list(self.state.live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(**kwargs: Any) -> FakeApi:
    """Start a :class:`FakeApi` (same keyword arguments) in a daemon thread and return it."""
    return FakeApi(**kwargs).start()


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until SIGTERM or SIGINT; prints the bound port first."""
    parser = argparse.ArgumentParser(prog="python -m workers.fake_api", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--rate", default=None, help="accepted requests per window, like 5/s")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="probability of a 503, 0-1")
    parser.add_argument("--retry-after", type=int, default=None, help="fixed Retry-After seconds for 429")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fail_rate <= 1.0:
        parser.error(f"--fail-rate must be within 0-1, got {args.fail_rate}")
    try:
        api = FakeApi(args.host, args.port, args.rate, args.fail_rate, args.retry_after, args.seed, args.latency)
    except ValueError as exc:
        parser.error(str(exc))
    print(api.port, flush=True)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        api.server.serve_forever(poll_interval=0.1)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        api.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
