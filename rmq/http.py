"""Pooled HTTP clients behind the cluster-wide limits: the public import path (``rmq.http.client(...)``).

Defined in :mod:`rmq.network` (see ``docs/design.md#http``).
"""

from rmq.network.http_client import RmqHttpClient
from rmq.network.http_registry import client, close_all, stats
from rmq.network.retries import backoff_delay, parse_retry_after
from rmq.network.wire_bytes import request_wire_bytes, response_wire_bytes

__all__ = [
    "RmqHttpClient",
    "backoff_delay",
    "client",
    "close_all",
    "parse_retry_after",
    "request_wire_bytes",
    "response_wire_bytes",
    "stats",
]
