"""HTTP/1.1 wire bytes of a request and a response, as a server sees them."""

from __future__ import annotations

import httpx

from rmq.network.wire_bytes import request_wire_bytes, response_wire_bytes


def _client() -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        body = b'{"n": 1}'  # streamed, as from a socket, so its bytes count as downloaded
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))

    return httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handler))


def test_wire_bytes_of_a_request_and_a_response():
    with _client() as http:
        req = http.build_request("POST", "/translate", json={"text": "é"}, headers={"X-A": "b"})
        head = b"POST /translate HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in req.headers.raw)
        assert request_wire_bytes(req) == len(head) + 2 + len(req.content)
        resp = http.post("/translate", json={"text": "é"})
    wire = (b"HTTP/1.1 200 OK\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in resp.headers.raw)
            + b"\r\n" + resp.content)
    assert response_wire_bytes(resp) == len(wire)
