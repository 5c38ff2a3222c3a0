"""The HTTP client against a real local server that misbehaves: what is sent twice, what a secret
in a URL becomes in an error, what an absurd ``Retry-After`` does."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

import rmq.network.http_registry as rhttp
from rmq.core.errors import Defer
from rmq.network.retries import RETRY_AFTER_MAX_S

pytestmark = pytest.mark.integration


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: str, retry_after: str = "") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour, self.retry_after = behaviour, retry_after
        self.arrivals: list[tuple[str, str]] = []  # (method, path with query) of every request read
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.arrivals.append((self.command, self.path))
        behaviour = self.server.behaviour
        if behaviour == "drop":  # processed, then the connection dies before any answer
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        status = {"500": 500, "429": 429}[behaviour]
        self.send_response(status)
        if self.server.retry_after:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[_Server] = []

    def start(behaviour: str, retry_after: str = "") -> _Server:
        server = _Server(behaviour, retry_after)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    rhttp.close_all()


def _url(server: _Server, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_a_post_that_reached_the_server_is_not_sent_again(serve, unique):
    # Given a server that reads every request, then drops the connection without answering
    server = serve("drop")
    c = rhttp.client(f"pay-{unique}", base_url=_url(server), retries=3)
    # When a task POSTs to it
    with pytest.raises(httpx.TransportError):
        c.post("/charge", json={"amount": 5})
    # Then the POST reached the server once: it may have been processed, so it is not repeated
    assert server.arrivals == [("POST", "/charge")]
    # and a 5xx after a POST is not retried either
    failing = serve("500")
    c5 = rhttp.client(f"pay5-{unique}", base_url=_url(failing), retries=3)
    with pytest.raises(httpx.HTTPStatusError):
        c5.post("/charge", json={"amount": 5})
    assert failing.arrivals == [("POST", "/charge")]


def test_idempotent_methods_and_opted_in_posts_are_retried(serve, unique):
    # Given the same dropping server
    server = serve("drop")
    c = rhttp.client(f"idem-{unique}", base_url=_url(server), retries=2)
    # When a GET, a PUT and a POST the caller declares idempotent go out
    for method in ("GET", "PUT"):
        with pytest.raises(httpx.TransportError):
            c.request(method, "/thing")
    with pytest.raises(httpx.TransportError):
        c.post("/charge", json={"amount": 5}, idempotent=True)
    # Then each was tried 1 + retries times
    assert [m for m, _ in server.arrivals] == ["GET"] * 3 + ["PUT"] * 3 + ["POST"] * 3


def test_errors_and_logs_carry_no_query_string_or_userinfo(serve, unique, caplog):
    # Given a server that always fails, and a URL with a key in the query string and a password
    server = serve("500")
    port = server.server_address[1]
    c = rhttp.client(f"secret-{unique}", retries=1)
    caplog.set_level(logging.DEBUG, logger="rmq")
    # When a GET through it fails for good
    with pytest.raises(httpx.HTTPStatusError) as info:
        c.get(f"http://alice:hunter2@127.0.0.1:{port}/v1/speak?api_key=SECRET123&voice=x")
    # Then the error (what the result backend and Flower show) and the log name the endpoint only
    text = str(info.value) + "\n" + caplog.text
    assert f"127.0.0.1:{port}/v1/speak" in str(info.value)
    for secret in ("SECRET123", "hunter2", "alice"):
        assert secret not in text
    # while the server did receive the full request, twice (GET is retried)
    assert server.arrivals == [("GET", "/v1/speak?api_key=SECRET123&voice=x")] * 2


@pytest.mark.parametrize("value", ["1e12", "99999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_huge_retry_after_defers_for_a_bounded_time(serve, unique, value):
    # Given a server answering 429 with an absurd Retry-After
    server = serve("429", retry_after=value)
    c = rhttp.client(f"ra-{unique}", base_url=_url(server), retries=3)
    # When a GET meets it
    with pytest.raises(Defer) as info:
        c.get("/x")
    # Then the task is deferred for at most the bound, a countdown Celery can schedule
    assert 0 < info.value.countdown_s <= RETRY_AFTER_MAX_S
    assert server.arrivals == [("GET", "/x")]


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "1e999"])
def test_an_unusable_retry_after_is_ignored(serve, unique, value):
    # Given a server answering 429 with a Retry-After that is not a usable delay
    server = serve("429", retry_after=value)
    c = rhttp.client(f"bad-{unique}", base_url=_url(server), retries=1)
    # When a GET meets it, Then the usual backoff applies: retried once, then the 429 is raised
    with pytest.raises(httpx.HTTPStatusError):
        c.get("/x")
    assert len(server.arrivals) == 2
