"""Bodies stream through the gateway both ways with flat memory; the body limit is enforced on
declared and on chunked bodies."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import (
    Gateway,
    RssSampler,
    Upstream,
    gateway_config,
    raw_exchange,
    route,
    run_gateway,
    standard_routes,
)

pytestmark = pytest.mark.integration

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
RSS_LIMIT = 150 * MIB
TRANSFER_BUDGET = 60.0  # seconds; in practice a few


@pytest.fixture(scope="module")
def big_gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose /big route accepts bodies up to 2 GiB."""

    def build(port: int) -> dict[str, Any]:
        big = route(
            "big",
            f"http://127.0.0.1:{port}/big",
            upstream.origin,
            public=True,
            max_body_bytes="2GiB",
        )
        return gateway_config(port, [big, *standard_routes(port, upstream.port)])

    with run_gateway(tmp_path_factory.mktemp("big"), build) as running:
        yield running


def _read_head(sock: socket.socket) -> tuple[int, bytes]:
    """Read a response head off `sock`; returns (status, bytes already read past the head)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed in the head: {buffer!r}"
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


@pytest.mark.slow
def test_one_gib_download_streams_with_flat_memory(big_gateway: Gateway) -> None:
    """A 1 GiB download passes whole while the gateway's RSS stays under 150 MiB."""
    request = (
        f"GET /big/_up/download?n={GIB} HTTP/1.1\r\nHost: {big_gateway.host}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    received = 0
    started = time.monotonic()
    with (
        RssSampler(big_gateway.process.pid) as rss,
        socket.create_connection(("127.0.0.1", big_gateway.port), timeout=30) as sock,
    ):
        sock.sendall(request)
        status, rest = _read_head(sock)
        assert status == 200
        received = len(rest)
        buffer = bytearray(MIB)
        while True:
            count = sock.recv_into(buffer)
            if count == 0:
                break
            received += count
            assert time.monotonic() - started < TRANSFER_BUDGET
    assert received == GIB
    print(f"peak gateway RSS {rss.peak / MIB:.0f} MiB, {time.monotonic() - started:.1f} s")
    assert rss.samples > 10
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak / MIB:.0f} MiB"


@pytest.mark.slow
def test_one_gib_upload_streams_with_flat_memory(big_gateway: Gateway) -> None:
    """A 1 GiB upload reaches the upstream whole while the gateway's RSS stays under 150 MiB."""
    chunk = b"\x5a" * MIB
    started = time.monotonic()
    with (
        RssSampler(big_gateway.process.pid) as rss,
        socket.create_connection(("127.0.0.1", big_gateway.port), timeout=30) as sock,
    ):
        sock.sendall(
            (
                f"POST /big/_up/upload HTTP/1.1\r\nHost: {big_gateway.host}\r\n"
                f"Content-Length: {GIB}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        for _ in range(GIB // MIB):
            sock.sendall(chunk)
            assert time.monotonic() - started < TRANSFER_BUDGET
        status, rest = _read_head(sock)
        while chunk_in := sock.recv(65536):
            rest += chunk_in
    assert status == 200
    assert rest.endswith(b'{"bytes": %d}' % GIB)
    print(f"peak gateway RSS {rss.peak / MIB:.0f} MiB, {time.monotonic() - started:.1f} s")
    assert rss.samples > 10
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak / MIB:.0f} MiB"


def test_chunked_upload_is_streamed_through(gateway: Gateway) -> None:
    """A chunked upload of unknown length reaches the upstream byte for byte."""

    def body() -> Iterator[bytes]:
        for _ in range(8):
            yield b"y" * 100_000

    response = httpx.post(gateway.url("/public/_up/upload"), content=body(), timeout=10)
    assert response.status_code == 200
    assert response.json() == {"bytes": 800_000}


def test_declared_body_over_limit_is_413_before_anything_is_sent(
    gateway: Gateway, upstream: Upstream
) -> None:
    """Content-Length over the route's max_body_bytes: 413 at once, without reading the body."""
    marker = uuid.uuid4().hex
    head = (
        f"POST /small/_up/upload?{marker} HTTP/1.1\r\nHost: {gateway.host}\r\n"
        f"Content-Length: {10 * MIB}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    ).encode()
    started = time.monotonic()
    response = raw_exchange(gateway.port, head, method="POST")  # the body is never sent
    assert response.status == 413
    assert response.json()["error"] == "body-too-large"
    assert time.monotonic() - started < 5
    assert upstream.received(marker) == []


def test_declared_body_at_limit_is_forwarded(gateway: Gateway) -> None:
    """A body of exactly max_body_bytes is accepted and forwarded."""
    response = httpx.post(gateway.url("/small/_up/upload"), content=b"a" * 1024, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"bytes": 1024}


def test_chunked_body_crossing_limit_is_413(gateway: Gateway, upstream: Upstream) -> None:
    """A chunked body that crosses max_body_bytes mid-stream is answered 413, never completed."""
    marker = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for _ in range(8):
            yield b"z" * 400
            time.sleep(0.01)

    response = httpx.post(
        gateway.url(f"/small/_up/upload?{marker}"),
        content=body(),
        headers={"Accept": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"] == "body-too-large"
