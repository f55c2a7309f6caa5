"""The hot path's HTTP/1.1 client: per-upstream keep-alive pools over asyncio, parsed by httptools.

Chosen by measurement (bench/stacks.py): on these machines aiohttp's client costs about twice the
CPU of the whole bare exchange with this one, and the client is most of a proxied request's cost.
It does only what a reverse proxy needs — one request at a time per connection, bodies streamed
both ways with back-pressure, connect and read timeouts, TLS verified with the route's context —
and leaves parsing to llhttp (via httptools, the parser uvicorn uses for the client side).
WebSockets still go through aiohttp in gateway.forward. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools

_HIGH_WATER = 256 * 1024  # response bytes buffered before the upstream socket is paused
_LOW_WATER = 64 * 1024
_MAX_HEAD_BYTES = 64 * 1024  # an upstream's response head larger than this is refused
_MAX_HEADERS = 200


class UpstreamError(Exception):
    """The exchange with the upstream failed."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, DNS)."""


class UpstreamTLSError(UpstreamConnectError):
    """The TLS handshake failed: wrong certificate, wrong CA, wrong name."""


class UpstreamTimeoutError(UpstreamError):
    """Connecting, or the silence between two reads, took longer than allowed."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1."""


class UpstreamClosedError(UpstreamError):
    """The upstream closed the connection before its response was complete."""


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeoutError("no data from the upstream in time"))


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.last_used = time.monotonic()
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()  # done once the socket is gone
        self.reused = False
        self.active = False  # an exchange is under way; bytes outside one spoil the connection
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self.keep_alive = False
        self._head_done = False
        self._complete = False
        self._extra = False  # bytes of a further message after this exchange's response
        self._until_close = False  # no Content-Length, not chunked: the body ends at EOF
        self._no_body = False  # a HEAD response: the parser must not wait for a body
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes on an idle connection (a late 408, garbage): it cannot carry a clean exchange.
            self.close()
            return
        if self._no_body and self._head_done:
            return  # after a HEAD response nothing more is expected; the connection is not reused
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the upstream switched protocols unasked"))
        except httptools.HttpParserError as error:
            cause = error.__context__
            if isinstance(cause, UpstreamError):  # raised by one of our callbacks
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError(f"invalid response from the upstream: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if self._head_done and self._until_close and not self._complete:
            self._complete = True  # RFC 9112 §6.3 item 8: the close ends the body
            self._wake()
        elif not self._complete:
            self._fail(UpstreamClosedError("the upstream closed the connection"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(UpstreamClosedError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # A second response in the same exchange (the upstream answered twice, or a late 408
            # arrived with the first): the exchange keeps its first answer; the connection is spent.
            self._extra = True
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._extra:
            return
        # A broken or hostile upstream must not make the gateway hold an unbounded head.
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > _MAX_HEAD_BYTES or len(self.headers) >= _MAX_HEADERS:
            raise UpstreamProtocolError("the upstream's response head is too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._extra:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not forwarded; the final
            # response follows on the same connection (RFC 9110 §15.2).
            self.headers = []
            self._head_bytes = 0
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in self.headers}
        self._until_close = b"content-length" not in names and b"transfer-encoding" not in names
        self._head_done = True
        if self._no_body:
            self._complete = True
            self.keep_alive = False  # the parser still expects a body: never reuse (HEAD)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._extra:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()  # back-pressure: a slow client slows the upstream
        self._wake()

    def on_message_complete(self) -> None:
        if self._head_done and not self._extra:
            self._complete = True
            self._wake()

    # -- the exchange -------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.keep_alive = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    async def _wait(self, silence: float) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(silence, _timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def start(self, head: bytes, *, expect_body: bool) -> None:
        """Send a request head (and begin a new exchange on this connection)."""
        self._reset()
        self.active = True
        self._no_body = not expect_body
        assert self.transport is not None
        self.transport.write(head)

    async def write(self, data: bytes) -> None:
        """Send request body bytes, waiting while the upstream cannot take more."""
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.write(data)
        if self._writable is not None and not self._writable.done():
            await self._writable

    async def read_head(self, silence: float) -> None:
        """Wait for the final response head (status and headers)."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait(silence)

    async def read_chunk(self, silence: float) -> bytes:
        """The next piece of the response body; b"" once it is complete."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered < _LOW_WATER and self.transport:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(silence)

    @property
    def at_end(self) -> bool:
        """Every byte of the response body has been handed out."""
        return self._complete and not self._chunks

    @property
    def finished(self) -> bool:
        """The response was read completely and the connection may carry another exchange."""
        return self._complete and not self._chunks and self.keep_alive and not self.closed

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections to one upstream (host, port, TLS context)."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        max_idle: int = 256,
        idle_timeout: float = 30.0,
        max_connections: int = 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_idle = max_idle
        self.max_connections = max_connections  # in use at once; more wait for a free one
        self._busy = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.idle_timeout = idle_timeout
        self._idle: deque[Connection] = deque()

    async def acquire(self, connect_timeout: float) -> Connection:
        """A live idle connection (most recently used first), or a new one; pair with release."""
        if self._busy >= self.max_connections:
            await self._wait_for_slot(connect_timeout)
        connection = await self._take(connect_timeout)
        self._busy += 1
        return connection

    async def _wait_for_slot(self, connect_timeout: float) -> None:
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            async with asyncio.timeout(connect_timeout):
                await slot
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"all {self.max_connections} connections to {self.host}:{self.port} are busy"
            ) from None
        finally:
            if not slot.done():
                slot.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(slot)

    async def _take(self, connect_timeout: float) -> Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.last_used < self.idle_timeout:
                connection.reused = True
                return connection
            connection.close()
        return await self.connect(connect_timeout)

    async def connect(self, connect_timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    # Verify the certificate against the route's host name (RFC 9110 §4.3.4).
                    server_hostname=self.host if self.ssl_context is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"no connection to {self.host}:{self.port} in time"
            ) from None
        except ssl.SSLError as error:
            raise UpstreamTLSError(f"TLS with {self.host}:{self.port} failed: {error}") from None
        except OSError as error:
            raise UpstreamConnectError(
                f"cannot connect to {self.host}:{self.port}: {error}"
            ) from None
        return connection

    def release(self, connection: Connection) -> None:
        """Give back an acquired connection: kept if its exchange finished cleanly, else closed."""
        self._busy -= 1
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                break
        connection.active = False
        if connection.finished and len(self._idle) < self.max_idle:
            connection.last_used = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    async def close(self, grace: float = 1.0) -> None:
        """Close the idle connections and wait (briefly) until their sockets are gone.

        A TLS connection closes in steps (close_notify); leaving before they end leaks sockets.
        """
        closing = []
        while self._idle:
            connection = self._idle.pop()
            connection.close()
            closing.append(connection.lost)
        if closing:
            await asyncio.wait(closing, timeout=grace)


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """Serialise a request head; refuses CR, LF, NUL and stray spaces (no request smuggling)."""
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in headers:
        parts.append(name.encode("latin-1") + b": " + value.encode() + b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One C-speed check of the whole head instead of one per header: exactly the line breaks
    # we wrote, no NUL, and the request line has exactly two spaces.
    lines = len(headers) + 2
    if (
        head.count(b"\n") != lines
        or head.count(b"\r") != lines
        or b"\x00" in head
        or parts[0].count(b" ") != 2
    ):
        raise UpstreamProtocolError("refusing to send a request head with CR/LF/NUL or spaces")
    return head


async def send_chunked(connection: Connection, body: AsyncIterator[bytes]) -> None:
    """Send a streamed body with chunked framing (RFC 9112 §7.1)."""
    async for chunk in body:
        if chunk:
            await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await connection.write(b"0\r\n\r\n")


async def send_sized(connection: Connection, body: AsyncIterator[bytes]) -> None:
    """Send a streamed body whose Content-Length is already in the head."""
    async for chunk in body:
        if chunk:
            await connection.write(chunk)
