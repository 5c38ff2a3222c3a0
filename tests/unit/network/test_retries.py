"""The retry policy: Retry-After parsing, full-jitter backoff, the defaults of network=True tasks."""

from __future__ import annotations

import random
import socket
from email.utils import formatdate

import httpx
import pytest

from rmq.network.retries import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    apply_network_defaults,
    backoff_delay,
    parse_retry_after,
)


@pytest.mark.parametrize("value, expected", [
    ("1", 1.0), (" 2.5 ", 2.5), ("0", 0.0), ("-3", 0.0), ("soon", None), ("", None), (None, None),
    ("nan", None), ("inf", None),
])
def test_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_retry_after_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("Wed, 99 Foo 2015 07:28:00 GMT", now=now) is None


def test_backoff_full_jitter_bounds():
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
        samples = [backoff_delay(attempt, rng) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # full jitter spreads over the whole range, not a fixed delay plus a little noise
        assert min(samples) < 0.1 * ceiling and max(samples) > 0.9 * ceiling
    assert backoff_delay(10_000, rng) <= BACKOFF_CAP_S


def test_network_defaults_fill_in_only_what_the_task_left_out():
    # Given a task that sets its own max_retries and nothing else
    options = {"max_retries": 1}
    # When the network defaults are applied
    apply_network_defaults(options)
    # Then its own value stays, and connection errors, timeouts and DNS failures are retried
    assert options["max_retries"] == 1
    assert options["retry_backoff"] == 2 and options["retry_backoff_max"] == 120 and options["retry_jitter"]
    for error in (ConnectionRefusedError(), TimeoutError(), socket.gaierror(), httpx.ConnectError("no")):
        assert isinstance(error, options["autoretry_for"])
