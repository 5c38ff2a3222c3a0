"""Byte accounting of the HTTP clients: HTTP/1.1 wire bytes as a server sees them.

A request counts its request line + header lines + blank line + body (``Content-Length``); a response
its status line + header lines + blank line + body bytes read (before decoding). Chunked framing and
TLS are not counted; an attempt that never connected sent nothing, and the client counts nothing for
it. See docs/design.md#http.
"""

from __future__ import annotations

import httpx

__all__ = ["request_wire_bytes", "response_wire_bytes"]


def _headers_bytes(raw: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in raw) + 2  # "k: v\r\n" each, then "\r\n"


def request_wire_bytes(request: httpx.Request) -> int:
    """HTTP/1.1 bytes of a request: request line, headers, blank line, body (Content-Length)."""
    line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
    body = request.headers.get("content-length")
    return line + _headers_bytes(request.headers.raw) + (int(body) if body and body.isdigit() else 0)


def response_wire_bytes(response: httpx.Response) -> int:
    """HTTP/1.1 bytes of a response: status line, headers, blank line, body bytes read."""
    reason = response.extensions.get("reason_phrase", response.reason_phrase.encode())
    line = len(response.http_version) + len(str(response.status_code)) + len(reason) + 4
    return line + _headers_bytes(response.headers.raw) + response.num_bytes_downloaded
