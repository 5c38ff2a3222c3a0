"""Retry policy for calls over the network: what is retried and how long to wait between attempts.

Two users: the HTTP clients (:mod:`rmq.network.http_client`) retry connection errors, timeouts, 429
and 5xx with full-jitter exponential backoff, a ``Retry-After`` header setting the least wait; and
``network=True`` tasks get Celery retry options with exponential backoff and jitter, bounded, unless
the task sets its own. Full jitter (a uniform wait up to the exponential ceiling) keeps clients that
failed together from retrying together. See docs/design.md#http.
"""

from __future__ import annotations

import email.utils
import math
import random
import socket
import time
from typing import Any

import httpx

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "IDEMPOTENT_METHODS",
    "NETWORK_ERRORS",
    "RETRY_ERRORS",
    "apply_network_defaults",
    "backoff_delay",
    "is_retryable_status",
    "parse_retry_after",
    "RETRY_AFTER_MAX_S",
]

BACKOFF_BASE_S = 0.25
#: backoff ceiling; a ``Retry-After`` longer than this defers the task instead of sleeping
BACKOFF_CAP_S = 10.0
#: longest wait a ``Retry-After`` may ask for; a longer one is cut to it (a countdown of 1e12 s would
#: overflow Celery's ETA and fail the task)
RETRY_AFTER_MAX_S = 3600.0
#: methods whose repetition has the effect of one request (RFC 9110 9.2.2): retried even after the
#: request went out. Any other method is retried only when it never reached the server, or on a 429
#: (the server refused it unprocessed), unless the caller says it is idempotent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: errors of an HTTP attempt worth another attempt (the server may never have seen the request)
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

#: what a ``network=True`` task retries by default
NETWORK_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror,
                                                   httpx.TransportError)


def is_retryable_status(code: int) -> bool:
    """429 (too many requests) and 5xx (the server failed) are worth another attempt."""
    return code == 429 or 500 <= code <= 599


def parse_retry_after(value: str | None, now: float | None = None,
                      max_s: float = RETRY_AFTER_MAX_S) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date, at most ``max_s``.

    None (no usable value: the caller backs off as without one) for a missing, malformed or
    non-finite value; a time in the past is 0.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return min(max(0.0, seconds), max_s)


def backoff_delay(attempt: int, rng: random.Random | None = None,
                  base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> float:
    """Full jitter: uniform in ``[0, min(cap_s, base_s * 2**attempt)]`` (``attempt`` from 0)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 32)))
    return (rng or random).uniform(0.0, ceiling)


def apply_network_defaults(options: dict[str, Any]) -> None:
    """Fill in Celery retry options the user did not set (theirs always win)."""
    options.setdefault("autoretry_for", NETWORK_ERRORS)
    options.setdefault("retry_backoff", 2)
    options.setdefault("retry_backoff_max", 120)
    options.setdefault("retry_jitter", True)
    options.setdefault("max_retries", 5)
