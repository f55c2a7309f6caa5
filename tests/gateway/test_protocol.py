"""TabijiHttpProtocol over real sockets: head limits, head timeout, TCP_NODELAY, the raw target."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgi_probe import RunningServer, free_port, http_get, recv_all, running_server

from gateway.protocol import ProtocolLimits

pytestmark = pytest.mark.integration

LIMITS = {"max_head_bytes": 4096, "max_header_count": 20, "head_timeout": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One single-worker server with small limits for the whole module."""
    tmp = tmp_path_factory.mktemp("protocol")
    with running_server(
        tmp, limits=LIMITS, metrics_port=free_port(), metrics_flush_seconds=0.1
    ) as running:
        yield running


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return recv_all(sock)


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length response from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
        ).split(b":")[1]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_limits_reject_nonsense() -> None:
    """ProtocolLimits refuses values that would disable a limit."""
    with pytest.raises(ValueError, match="head_timeout"):
        ProtocolLimits(head_timeout=0)
    with pytest.raises(ValueError, match="max_header_count"):
        ProtocolLimits(max_header_count=0)


def test_head_within_limits_is_served(server: RunningServer) -> None:
    """A head just under both limits reaches the app."""
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(18))
    reply = exchange(
        server.port, b"GET /ok HTTP/1.1\r\nHost: p\r\nConnection: close\r\n" + headers + b"\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200 ")


def test_oversized_head_gets_431(server: RunningServer) -> None:
    """A head larger than max_head_bytes is answered 431 with Connection: close, then closed."""
    reply = exchange(
        server.port, b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    )
    head = reply.split(b"\r\n\r\n")[0].lower()
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head


def test_oversized_unfinished_header_gets_431(server: RunningServer) -> None:
    """A header value growing past the limit is refused before it ends (httptools buffers it)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 3000)
        time.sleep(0.1)
        sock.sendall(b"a" * 3000)  # no CRLF: only the raw byte count can see this
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_long_target_gets_431(server: RunningServer) -> None:
    """A request-target alone longer than the head limit is refused with 431."""
    reply = exchange(server.port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_too_many_headers_gets_431(server: RunningServer) -> None:
    """More headers than max_header_count is answered 431."""
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
    reply = exchange(server.port, b"GET / HTTP/1.1\r\nHost: p\r\n" + headers + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_slow_head_is_cut(server: RunningServer) -> None:
    """Half a request line, then silence: the connection is cut at the head timeout (408)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /some")
        reply = recv_all(sock)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 0.8 < elapsed < 2.5


def test_dribbled_head_is_cut(server: RunningServer) -> None:
    """Sending a byte now and then does not extend the head deadline (slowloris)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        try:
            for _ in range(20):
                time.sleep(0.2)
                sock.sendall(b"X")
        except OSError:
            pass  # reset by the server: that is the cut
        reply = recv_all(sock) if sock.fileno() != -1 else b""
    assert time.monotonic() - started < 2.5
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408 ")


def test_silent_connection_is_cut(server: RunningServer) -> None:
    """A connection that sends nothing is closed at the head timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        recv_all(sock)
    assert 0.8 < time.monotonic() - started < 2.5


def test_keep_alive_second_request_gets_fresh_head_deadline(server: RunningServer) -> None:
    """Idle keep-alive time does not count against the next request's head timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n")
        first = read_response(sock)
        time.sleep(1.5)  # longer than head_timeout, shorter than keep-alive (5 s)
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        second = recv_all(sock)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 200 ")


def test_tcp_nodelay_is_set_on_accepted_socket(server: RunningServer) -> None:
    """The server-side socket of an accepted connection has TCP_NODELAY, and the loop is uvloop."""
    status, body = http_get(server.port, "/info")
    assert status == 200
    assert body["nodelay"] == 1
    assert body["loop"] == "uvloop"


def test_raw_target_for_absolute_form(server: RunningServer) -> None:
    """An absolute-form target reaches the app verbatim in scope extensions (authority included)."""
    reply = exchange(
        server.port,
        b"GET http://a.example/x?y=%2F HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["raw_target"] == "http://a.example/x?y=%2F"


def test_raw_target_for_websocket_upgrade(server: RunningServer) -> None:
    """The WebSocket scope carries the raw target too (absolute form, percent-escapes untouched)."""
    key = base64.b64encode(os.urandom(16))
    handshake = (
        b"GET http://a.example/ws/a%2Fb?q=1 HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(handshake)
        reply = b""
        # The server then waits for our close reply, so read only up to the first frame.
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < 2:
            reply += sock.recv(65536)
        head, _, frames = reply.partition(b"\r\n\r\n")
        while len(frames) < 2 + frames[1]:
            frames += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames[0] == 0x81  # FIN + text
    length = frames[1]
    assert length < 126
    assert json.loads(frames[2 : 2 + length]) == {"raw_target": "http://a.example/ws/a%2Fb?q=1"}


def test_refusals_are_counted_and_logged_without_header_values(
    server: RunningServer, tmp_path: Path
) -> None:
    """A refusal is counted and logged as JSON with the client IP, never a header value."""
    secret = b"s3cr3t-cookie-value"
    exchange(
        server.port, b"GET / HTTP/1.1\r\nHost: p\r\nCookie: " + secret + b"a" * 5000 + b"\r\n\r\n"
    )
    time.sleep(0.4)  # the exporter flushes every 0.1 s
    assert server.metrics_port is not None
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5
    ) as resp:
        text = resp.read().decode()
    assert 'tabiji_refused_total{reason="head-too-large"}' in text
    refusals = [
        json.loads(line)
        for line in server.log_lines()
        if "request refused" in line and "head-too-large" in line
    ]
    assert refusals
    assert refusals[-1]["client_ip"] == "127.0.0.1"
    assert refusals[-1]["status"] == 431
    assert secret.decode() not in server.log_path.read_text()
