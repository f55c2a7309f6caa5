"""The serving layer's limits over raw sockets: head size, header count and slow heads."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from .conftest import (
    Gateway,
    Upstream,
    gateway_config,
    raw_exchange,
    raw_get,
    run_gateway,
    standard_routes,
)

pytestmark = pytest.mark.integration

MAX_HEAD = 4096
MAX_HEADERS = 20
HEAD_TIMEOUT = 1.0
SLACK = 2.0


@pytest.fixture(scope="module")
def limited(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with small head limits and a 1 s head timeout."""
    server = {
        "max_head_bytes": MAX_HEAD,
        "max_headers": MAX_HEADERS,
        "head_timeout": f"{HEAD_TIMEOUT}s",
    }
    with run_gateway(
        tmp_path_factory.mktemp("limited"),
        lambda port: gateway_config(port, standard_routes(port, upstream.port), server=server),
    ) as running:
        yield running


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_head_under_the_limit_is_served(limited: Gateway) -> None:
    """A head just under max_head_bytes and max_headers is served normally."""
    headers = tuple((f"X-H{i}", "v") for i in range(MAX_HEADERS - 3))
    headers += (("X-Big", "b" * (MAX_HEAD - 800)),)
    assert raw_get(limited.port, "/public/ok", headers=headers).status == 200


def test_oversized_header_is_431(limited: Gateway, upstream: Upstream) -> None:
    """A head larger than max_head_bytes is answered 431 and never forwarded."""
    response = raw_get(limited.port, "/public/too-big-head", headers=(("X-Big", "b" * MAX_HEAD),))
    assert response.status == 431
    assert upstream.received("too-big-head") == []


def test_oversized_request_line_is_431(limited: Gateway, upstream: Upstream) -> None:
    """A request-target longer than max_head_bytes is answered 431 and never forwarded."""
    response = raw_get(limited.port, "/public/long-target/" + "a" * MAX_HEAD)
    assert response.status == 431
    assert upstream.received("long-target") == []


def test_oversized_head_in_small_pieces_is_431(limited: Gateway) -> None:
    """Many headers that are each small but together exceed max_head_bytes give 431."""
    headers = tuple((f"X-P{i}", "p" * 400) for i in range(15))
    assert raw_get(limited.port, "/public/x", headers=headers).status == 431


def test_too_many_headers_is_431(limited: Gateway, upstream: Upstream) -> None:
    """More header lines than max_headers are answered 431 and never forwarded."""
    headers = tuple((f"X-H{i}", "v") for i in range(MAX_HEADERS + 5))
    response = raw_get(limited.port, "/public/too-many-headers", headers=headers)
    assert response.status == 431
    assert upstream.received("too-many-headers") == []


def test_incomplete_head_is_cut_after_head_timeout(limited: Gateway) -> None:
    """A head that stops half-way is answered 408 and closed after head_timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(f"GET /public/x HTTP/1.1\r\nHost: {limited.host}\r\nX-Half".encode())
        data = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408")
    assert HEAD_TIMEOUT * 0.9 <= elapsed < HEAD_TIMEOUT + SLACK


def test_trickling_head_is_cut_after_head_timeout(limited: Gateway) -> None:
    """A client that keeps sending a byte at a time cannot stretch its head past head_timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(f"GET /public/x HTTP/1.1\r\nHost: {limited.host}\r\n".encode())
        cut = False
        for _ in range(40):
            try:
                sock.sendall(b"X")
            except OSError:
                cut = True
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                if sock.recv(65536) is not None:
                    cut = True
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    elapsed = time.monotonic() - started
    assert cut
    assert elapsed < HEAD_TIMEOUT + SLACK


def test_silent_connection_is_closed_after_head_timeout(limited: Gateway) -> None:
    """A connection that never sends a byte is closed after head_timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        _read_until_closed(sock)
    assert time.monotonic() - started < HEAD_TIMEOUT + SLACK


def test_pipelined_requests_are_both_served(limited: Gateway) -> None:
    """Two pipelined requests on one connection are both answered, in order."""
    one = f"GET /public/p1 HTTP/1.1\r\nHost: {limited.host}\r\n\r\n"
    two = f"GET /public/p2 HTTP/1.1\r\nHost: {limited.host}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall((one + two).encode())
        data = _read_until_closed(sock)
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.index(b'"/public/p1"') < data.index(b'"/public/p2"')


def test_malformed_request_line_is_400(limited: Gateway) -> None:
    """A request line that is not HTTP is answered 400."""
    response = raw_exchange(limited.port, b"GARBAGE\r\n\r\n")
    assert response.status == 400


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Content-Length: 5\r\nContent-Length: 6",
        "Transfer-Encoding: chunked, chunked",
    ],
)
def test_ambiguous_body_framing_is_400(limited: Gateway, upstream: Upstream, framing: str) -> None:
    """Conflicting or unknown body framing (request-smuggling shapes) is refused, never sent on."""
    marker = uuid.uuid4().hex
    head = (
        f"POST /public/{marker} HTTP/1.1\r\nHost: {limited.host}\r\n{framing}\r\n"
        "Connection: close\r\n\r\n0\r\n\r\nhello!"
    )
    response = raw_exchange(limited.port, head.encode(), method="POST")
    assert response.status == 400
    assert upstream.received(marker) == []


@pytest.mark.parametrize("coding", ["gzip, chunked", "xchunked", "identity"])
def test_unimplemented_transfer_coding_is_501(
    limited: Gateway, upstream: Upstream, coding: str
) -> None:
    """A transfer coding other than plain chunked is 501 (RFC 9112 §6.1), never sent on."""
    marker = uuid.uuid4().hex
    head = (
        f"POST /public/{marker} HTTP/1.1\r\nHost: {limited.host}\r\nTransfer-Encoding: {coding}"
        "\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    response = raw_exchange(limited.port, head.encode(), method="POST")
    assert response.status == 501
    assert upstream.received(marker) == []
