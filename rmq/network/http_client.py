"""An HTTP client that obeys cluster-wide rate and concurrency limits, with retries.

:class:`RmqHttpClient` is a pooled ``httpx.Client`` (keep-alive) made by
:func:`rmq.network.http_registry.client`. Every attempt takes a permit of the cluster-wide semaphore
``http:<name>``, then, as its headers start going out (after any connect), a token of the
cluster-wide limit ``http:<name>`` (both in Redis: :mod:`rmq.network.semaphore`,
:mod:`rmq.network.rate_limiter`): a token is used the moment it is granted, so the rate holds on the
wire. No token or permit within ``max_wait`` raises :class:`rmq.core.errors.Defer`.

Retries (``retries`` of them, see :mod:`rmq.network.retries`) cover connection errors, timeouts, 429
and 5xx. A request that reached the server is repeated only when its method is idempotent (GET, HEAD,
OPTIONS, PUT, DELETE), it was refused with a 429, or the caller says ``idempotent=True``: a POST the
server may have processed is never sent twice behind the caller's back. A final 429/5xx raises
``httpx.HTTPStatusError``; a final transport error is re-raised; any other status is returned. Error
messages and logs name a URL without its query string's values or its userinfo (:func:`safe_url`),
since both carry secrets. Counters include the wire bytes (:mod:`rmq.network.wire_bytes`). See
docs/design.md#http.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from rmq.core import runtime as _runtime
from rmq.core.errors import Defer, RateLimiterUnavailable
from rmq.core.units import Rate
from rmq.network.lease_keeper import LeaseKeeper
from rmq.network.rate_limiter import ClusterLimiter
from rmq.network.retries import (
    BACKOFF_CAP_S,
    IDEMPOTENT_METHODS,
    RETRY_ERRORS,
    backoff_delay,
    is_retryable_status,
    parse_retry_after,
)
from rmq.network.semaphore import ClusterSemaphore
from rmq.network.wire_bytes import request_wire_bytes, response_wire_bytes

__all__ = ["COUNTERS", "RmqHttpClient", "safe_url"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
#: longest wait for a token/permit outside a worker (inside: ``rmq_throttle_max_wait``)
DEFAULT_MAX_WAIT_S = 2.0
DEFAULT_LEASE_S = 30.0
#: tokens are spaced as if each period were this much longer: a request reaches the server a
#: little after its token, unevenly (a new connection's first request lags by ~5 ms), and without
#: slack an exact-rate grant sequence can land ``count + 1`` requests in one server-side window
RATE_MARGIN_S = 0.02
#: countdown of a deferral for a full semaphore (nobody knows when a permit frees)
PERMIT_RETRY_S = 1.0
LIMIT_PREFIX = "http:"
#: what each client counts (``stats()``), also under ``http`` in the worker's process stats
COUNTERS = ("requests", "retries", "errors", "deferred", "throttled", "throttled_s", "backoff_s",
            "sent_bytes", "recv_bytes", "responses_429", "responses_5xx")

# an attempt that failed this way never reached the server: it sent no bytes
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def safe_url(url: httpx.URL | str) -> str:
    """``url`` fit for an error message or a log: no userinfo, no fragment, query values hidden.

    API keys and signatures travel in query strings and in ``user:password@``; an error message
    ends up in the result backend and in Flower, so only the endpoint and the parameter names show.
    """
    url = httpx.URL(url)
    shown = str(url.copy_with(userinfo=b"", query=None, fragment=None))
    if url.query:
        shown += "?" + "&".join(f"{name}=..." for name in url.params.keys())
    return shown


class RmqHttpClient:
    """One pooled HTTP client governed by cluster-wide limits; make it with :func:`client`.

    Args:
        name: the client's name: limit keys (``http:<name>``) and counters use it.
        base_url: prefix of relative URLs.
        rate: cluster-wide rate of attempts, or None for no rate limit.
        concurrency: cluster-wide attempts in flight, or None for no limit; also the pool size.
        timeout_s: httpx timeout (connect, read, write, pool) per attempt.
        retries: extra attempts after the first.
        max_wait_s: longest wait for a token or permit before ``Defer``; None: the runtime's
            ``rmq_throttle_max_wait``, else 2 s.
        headers: default headers.
        redis: Redis client for the limits; None: the runtime's, resolved on first use.
        transport / limiter / semaphore / sleep / clock / rng: injected for tests.
    """

    def __init__(self, name: str, *, base_url: str | None = None, rate: Rate | None = None,
                 concurrency: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, max_wait_s: float | None = None,
                 headers: Mapping[str, str] | None = None, redis: Any = None,
                 transport: httpx.BaseTransport | None = None, limiter: Any = None, semaphore: Any = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.name, self.base_url, self.rate, self.concurrency = name, base_url, rate, concurrency
        self.timeout_s, self.retries, self.max_wait_s = timeout_s, retries, max_wait_s
        self.headers = dict(headers or {})
        self.redis = redis
        self.pid = os.getpid()
        #: the settings ``client()`` was given (a forked child's client starts from them)
        self.given: dict[str, Any] = {}
        self.limit_name = LIMIT_PREFIX + name
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._trace_gate = transport is None  # only httpcore's own transport calls the trace hook
        self._token_rate = Rate(rate.count, rate.period_s + RATE_MARGIN_S) if rate is not None else None
        self._limiter, self._semaphore = limiter, semaphore
        self._keeper: LeaseKeeper | None = None
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()
        self._lock = threading.Lock()
        pool = concurrency or 10
        self.http = httpx.Client(
            base_url=base_url or "", headers=self.headers, timeout=timeout_s, transport=transport,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=30.0),
        )
        self.closed = False

    # -- public API -------------------------------------------------------------------------
    def request(self, method: str, url: str, *, idempotent: bool | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request (``params=, headers=, content=, data=, files=, json=, cookies=, timeout=``).

        ``idempotent``: whether repeating the request after it reached the server is harmless
        (None: by its method; say True for a POST the API de-duplicates, e.g. by an idempotency
        key). Only then are 5xx answers and errors after sending retried; a 429 (refused
        unprocessed) and an attempt that never connected are retried for any method.

        Raises:
            Defer: no token or permit within ``max_wait_s``, a ``Retry-After`` beyond the backoff
                cap, or (inside a worker) the limiter's Redis being down.
            RateLimiterUnavailable: the limiter's Redis is down, outside a worker.
            httpx.HTTPStatusError: the last attempt still answered 429 or 5xx.
            httpx.TransportError: the last attempt still failed to connect or timed out.
        """
        request = self.http.build_request(method, url, **kwargs)
        if idempotent is None:
            idempotent = request.method in IDEMPOTENT_METHODS
        return self._send(request, idempotent)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        """``request("GET", url, ...)``."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        """``request("POST", url, ...)``."""
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        """``request("PUT", url, ...)``."""
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        """``request("DELETE", url, ...)``."""
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        """Close pooled connections (idempotent); later requests raise ``RuntimeError``."""
        self.closed = True
        if self._keeper is not None:
            self._keeper.stop(timeout_s=1.0)
        self.http.close()

    def stats(self) -> dict[str, float]:
        """A copy of this client's counters (this process only)."""
        with self._lock:
            return dict(self.counters)

    # -- internals --------------------------------------------------------------------------
    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self.counters[key] += n
        rt = _runtime.current()
        if rt is not None:
            rt.stats.incr("http", self.name, key, n=n)

    def _redis(self) -> Any:
        if self.redis is not None:
            return self.redis
        rt = _runtime.current()
        if rt is None:
            raise RateLimiterUnavailable(
                f"http client {self.name!r} has limits but no Redis outside a worker: pass redis=")
        return rt.redis()

    def _wait_limit(self) -> float:
        if self.max_wait_s is not None:
            return self.max_wait_s
        rt = _runtime.current()
        return rt.config.throttle_max_wait if rt is not None else DEFAULT_MAX_WAIT_S

    def _limiter_down(self, exc: RateLimiterUnavailable, kind: str) -> None:
        rt = _runtime.current()
        if rt is None:
            raise exc
        self._count("deferred")
        log.warning("rmq: http client %r deferred %.1fs, limits not checked (failing closed): %s",
                    self.name, rt.config.defer_countdown, exc)
        raise Defer(f"http client {self.name!r}: limiter unavailable: {exc}",
                    countdown_s=rt.config.defer_countdown, kind=f"{kind}_unavailable") from exc

    def _take_permit(self) -> str | None:
        if self.concurrency is None:
            return None
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        start, delay, limit, waited = self._clock(), 0.02, self._wait_limit(), False
        try:
            if self._semaphore is None:
                rt = _runtime.current()
                lease = rt.config.concurrency_lease if rt is not None else DEFAULT_LEASE_S
                self._semaphore = ClusterSemaphore(self._redis(), max(lease, 3 * self.timeout_s))
            while not self._semaphore.acquire(self.limit_name, self.concurrency, holder):
                if self._clock() - start + delay > limit:
                    self._throttled(start, waited)
                    self._count("deferred")
                    raise Defer(f"http client {self.name!r}: concurrency {self.concurrency} full for "
                                f"{limit:g}s", countdown_s=PERMIT_RETRY_S, kind="concurrency")
                self._sleep(delay)
                delay, waited = min(delay * 2, 0.25), True
        except RateLimiterUnavailable as exc:
            self._limiter_down(exc, "concurrency")
        self._throttled(start, waited)
        if isinstance(self._semaphore, ClusterSemaphore):
            if self._keeper is None:
                self._keeper = LeaseKeeper(self._semaphore)
            self._keeper.add(self.limit_name, holder, self.concurrency)
            self._keeper.start()
        return holder

    def _give_permit(self, holder: str | None) -> None:
        if holder is None:
            return
        if self._keeper is not None:
            self._keeper.discard(self.limit_name, holder)
        try:
            self._semaphore.release(self.limit_name, holder)
        except RateLimiterUnavailable as exc:  # the lease lapses by itself
            log.warning("rmq: http client %r: permit not released: %s", self.name, exc)

    def _take_token(self) -> None:
        if self.rate is None:
            return
        start, limit, waited = self._clock(), self._wait_limit(), False
        try:
            if self._limiter is None:
                self._limiter = ClusterLimiter(self._redis())
            while (wait := self._limiter.acquire(self.limit_name, self._token_rate)) > 0:
                if self._clock() - start + wait > limit:
                    self._throttled(start, waited)
                    self._count("deferred")
                    raise Defer(f"http client {self.name!r}: no token of {self.rate} within {limit:g}s",
                                countdown_s=wait, kind="rate_limit")
                self._sleep(wait)
                waited = True
        except RateLimiterUnavailable as exc:
            self._limiter_down(exc, "rate_limit")
        self._throttled(start, waited)

    def _throttled(self, start: float, waited: bool) -> None:
        if waited:
            self._count("throttled")
            self._count("throttled_s", self._clock() - start)

    def _send(self, request: httpx.Request, idempotent: bool = True) -> httpx.Response:
        attempt = 0
        while True:
            retry_after: float | None = None
            holder = self._take_permit()
            try:
                gate = _Gate(self)
                if self._trace_gate:
                    request.extensions["trace"] = gate
                else:
                    gate.open()
                try:
                    response = self.http.send(request)
                except (Defer, RateLimiterUnavailable) as exc:
                    gate.reraise(exc)
                except RETRY_ERRORS as exc:
                    sent = not isinstance(exc, _NOT_SENT)
                    if sent:
                        self._count("sent_bytes", request_wire_bytes(request))
                    if attempt >= self.retries or (sent and not idempotent):
                        self._count("errors")
                        if sent and not idempotent and attempt < self.retries:
                            log.warning("rmq: http client %r: %s %s failed after it was sent (%s: %s); not "
                                        "retried, the server may have processed it (idempotent=True to retry)",
                                        self.name, request.method, safe_url(request.url), type(exc).__name__, exc)
                        raise
                    log.info("rmq: http client %r: %s %s: %s: %s, retrying", self.name, request.method,
                             safe_url(request.url), type(exc).__name__, exc)
                else:
                    self._count("sent_bytes", request_wire_bytes(request))
                    self._count("recv_bytes", response_wire_bytes(response))
                    if not is_retryable_status(response.status_code):
                        return response
                    self._count("responses_429" if response.status_code == 429 else "responses_5xx")
                    unprocessed = response.status_code == 429
                    if attempt >= self.retries or not (idempotent or unprocessed):
                        self._count("errors")
                        raise httpx.HTTPStatusError(
                            f"{response.status_code} {response.reason_phrase} for {request.method} "
                            f"{safe_url(request.url)} after {attempt + 1} attempts"
                            + ("" if idempotent or unprocessed else " (not retried: not idempotent)"),
                            request=request, response=response)
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            finally:
                self._give_permit(holder)
            if retry_after is not None and retry_after > BACKOFF_CAP_S:
                self._count("deferred")
                raise Defer(f"http client {self.name!r}: server asks to retry after {retry_after:.0f}s",
                            countdown_s=retry_after, kind="rate_limit")
            delay = max(retry_after or 0.0, backoff_delay(attempt, self._rng))
            self._count("retries")
            self._count("backoff_s", delay)
            self._sleep(delay)
            attempt += 1


class _Gate:
    """Takes the token and counts the request once, as late as possible.

    httpcore calls it (the ``trace`` extension) as the request headers start going out, after any
    connect: the token is used at once, so the rate holds on the wire, and an attempt that never
    connected takes no token. httpcore drops an exception's cause on its way out; reraise restores it.
    """

    def __init__(self, owner: RmqHttpClient) -> None:
        self.owner, self.taken = owner, False
        self.cause: BaseException | None = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_headers.started") and not self.taken:
            self.open()

    def open(self) -> None:
        self.taken = True
        try:
            self.owner._take_token()
        except (Defer, RateLimiterUnavailable) as exc:
            self.cause = exc.__cause__
            raise
        self.owner._count("requests")

    def reraise(self, exc: BaseException) -> None:
        raise exc from self.cause
