"""The hot-path HTTP/1.1 client against scripted upstreams on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstream import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    request_head,
    send_chunked,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A loopback server whose connections are handled by `handler`; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client closed first: normal for these scripts
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


async def fetch(pool: UpstreamPool, method: str = "GET", silence: float = 2.0) -> tuple[int, bytes]:
    connection = await pool.acquire(2.0)
    try:
        connection.start(request_head(method, "/x", [("host", "up")]), expect_body=method != "HEAD")
        await connection.read_head(silence)
        body = b""
        while chunk := await connection.read_chunk(silence):
            body += chunk
    except BaseException:
        connection.close()  # as the forwarder does: a failed exchange never leaks its socket
        raise
    finally:
        pool.release(connection)
    return connection.status, body


@pytest.mark.anyio
async def test_keep_alive_connection_is_reused() -> None:
    """Two exchanges in a row share one upstream connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(ok(b"hello"))
            await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        assert await fetch(pool) == (200, b"hello")
        assert await fetch(pool) == (200, b"hello")
        await pool.close()
        assert up.connections == 1


@pytest.mark.anyio
async def test_head_response_is_not_reused() -> None:
    """After HEAD the parser would wait for a body it never gets: the connection is closed."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        assert await fetch(pool, "HEAD") == (200, b"")
        assert await fetch(pool, "HEAD") == (200, b"")
        await pool.close()
        assert up.connections == 2


@pytest.mark.anyio
async def test_interim_responses_are_skipped() -> None:
    """A 103 Early Hints before the final answer is not mistaken for the response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" + ok(b"final"))
        await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        assert await fetch(pool) == (200, b"final")
        await pool.close()


@pytest.mark.anyio
async def test_body_until_close() -> None:
    """Without Content-Length or chunking the body ends when the upstream closes (RFC 9112 §6.3)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nstreamed to the end")
        await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        assert await fetch(pool) == (200, b"streamed to the end")
        await pool.close()


@pytest.mark.anyio
async def test_truncated_body_is_an_error() -> None:
    """A close before Content-Length bytes arrived is an error, never a short success."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        with pytest.raises(UpstreamClosedError):
            await fetch(pool)
        await pool.close()


@pytest.mark.anyio
async def test_invalid_response_is_a_protocol_error() -> None:
    """Garbage instead of HTTP is refused with a protocol error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        with pytest.raises(UpstreamProtocolError):
            await fetch(pool)
        await pool.close()


@pytest.mark.anyio
async def test_silence_is_a_timeout() -> None:
    """An upstream that stops sending times out after the allowed silence."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        with pytest.raises(UpstreamTimeoutError):
            await fetch(pool, silence=0.2)
        await pool.close()


@pytest.mark.anyio
async def test_refused_connection_is_a_connect_error() -> None:
    """Nothing listening is a connect error (the pipeline answers 502)."""
    async with Scripted(read_request) as up:
        port = up.port
    pool = UpstreamPool("127.0.0.1", port, None)
    with pytest.raises(UpstreamConnectError):
        await pool.acquire(1.0)


@pytest.mark.anyio
async def test_chunked_request_body_framing() -> None:
    """A streamed body of unknown length is sent with chunked framing and a last-chunk."""
    received = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        body = await reader.readuntil(b"0\r\n\r\n")
        received.set_result(head + body)
        writer.write(ok(b"ok"))
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b""
        yield b"world"

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        connection = await pool.acquire(1.0)
        headers = [("host", "up"), ("transfer-encoding", "chunked")]
        connection.start(request_head("POST", "/u", headers), expect_body=True)
        await send_chunked(connection, parts())
        await connection.read_head(2.0)
        assert (await received).endswith(b"\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        connection.close()
        await pool.close()


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/x", [("x-a", "v\r\nx-injected: 1")]),
        ("GET", "/x", [("x-a\n", "v")]),
        ("GET", "/x", [("x-a", "v\x00")]),
        ("GET", "/x HTTP/1.1\r\nhost: evil", []),
        ("GET", "/x y", []),
    ],
)
def test_request_head_refuses_injection(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    """CR, LF, NUL or a stray space can never reach the upstream's parser (no smuggling)."""
    with pytest.raises(UpstreamProtocolError):
        request_head(method, target, headers)


@pytest.mark.anyio
async def test_oversized_response_head_is_refused() -> None:
    """An upstream cannot make the gateway hold an unbounded response head."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        with pytest.raises(UpstreamProtocolError, match="too large"):
            await fetch(pool)
        await pool.close()


@pytest.mark.anyio
async def test_busy_pool_waits_then_times_out() -> None:
    """Past max_connections a request waits for a free connection, bounded by connect_timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"x"))
        await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None, max_connections=1)
        first = await pool.acquire(1.0)
        with pytest.raises(UpstreamTimeoutError, match="busy"):
            await pool.acquire(0.2)
        waiter = asyncio.ensure_future(pool.acquire(2.0))
        await asyncio.sleep(0.05)
        first.close()
        pool.release(first)
        second = await waiter
        second.close()
        pool.release(second)
        await pool.close()


@pytest.mark.anyio
async def test_bytes_on_an_idle_connection_spoil_it() -> None:
    """An idle pooled connection that receives anything is closed, never reused."""

    late = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(ok(b"fine"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(late)  # on the now idle connection
            await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        try:
            assert await fetch(pool) == (200, b"fine")
            await asyncio.sleep(0.2)
            assert await fetch(pool) == (200, b"fine")  # not the stale 408
        finally:
            await pool.close()
        assert up.connections == 2


@pytest.mark.anyio
async def test_a_second_response_in_one_packet_is_not_taken() -> None:
    """An answer followed at once by another keeps the first; the connection is not reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                ok(b"first") + b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
            )
            await writer.drain()

    async with Scripted(handler) as up:
        pool = UpstreamPool("127.0.0.1", up.port, None)
        try:
            assert await fetch(pool) == (200, b"first")
            assert await fetch(pool) == (200, b"first")
        finally:
            await pool.close()
        assert up.connections == 2
