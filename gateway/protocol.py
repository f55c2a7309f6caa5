"""uvicorn protocols with the limits httptools lacks: head size, header count, head timeout.

Also sets TCP_NODELAY on every accepted socket and hands the raw request-target to the app as
`scope["extensions"]["tabiji.raw_target"]`. Imports only uvicorn, httptools, websockets and
`gateway.observability`; never gateway.settings/app/cli/pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.http11 import Request

from gateway import observability

RAW_TARGET_KEY = "tabiji.raw_target"

logger = logging.getLogger("tabiji.protocol")

# What the exact head count cannot see: method, spaces, "HTTP/1.1", the request line's CRLF.
_REQUEST_LINE_OVERHEAD = 16


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """Connection-level limits enforced before any ASGI app runs."""

    max_head_bytes: int = 16 * 1024  # request line + header lines; over it -> 431
    max_header_count: int = 100  # over it -> 431
    head_timeout: float = 5.0  # seconds from connection start / first byte to end of head
    ws_max_message_bytes: int = 1024 * 1024  # a larger WebSocket message closes with 1009
    ws_ping_interval: float | None = 20.0  # None: never ping
    ws_ping_timeout: float | None = 20.0
    ws_per_message_deflate: bool = False  # off: less CPU, no compression-oracle surface

    def __post_init__(self) -> None:
        if self.max_head_bytes < 256:
            raise ValueError("max_head_bytes must be at least 256")
        if self.max_header_count < 1:
            raise ValueError("max_header_count must be at least 1")
        if self.head_timeout <= 0:
            raise ValueError("head_timeout must be positive")
        if self.ws_max_message_bytes < 1:
            raise ValueError("ws_max_message_bytes must be positive")


DEFAULT_LIMITS = ProtocolLimits()


class ProtocolConfig(Config):
    """A uvicorn Config that carries our `ProtocolLimits` to the protocol instances.

    uvicorn instantiates the protocol itself and hands it only the Config; with `--workers N` the
    Config is pickled into each spawned worker, so the limits must live *on* it (a module-level
    setter in the supervisor would not reach spawned workers). It also selects our HTTP and
    WebSocket protocols.
    """

    def __init__(self, app: Any, *, limits: ProtocolLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(
            app,
            http=TabijiHttpProtocol,
            ws=TabijiWebSocketProtocol,
            ws_max_size=limits.ws_max_message_bytes,
            ws_ping_interval=limits.ws_ping_interval,
            ws_ping_timeout=limits.ws_ping_timeout,
            ws_per_message_deflate=limits.ws_per_message_deflate,
            **kwargs,
        )


def limits_of(config: Config) -> ProtocolLimits:
    """The limits a Config carries (the defaults for a plain uvicorn Config)."""
    return config.limits if isinstance(config, ProtocolConfig) else DEFAULT_LIMITS


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle: small responses must not wait ~40 ms for a delayed ACK (uvicorn #3149)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # the peer may already be gone; nothing to tune then
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def end_tls_close_without_peer(transport: asyncio.WriteTransport) -> None:
    """After a TLS `close()` handed our close_notify to TCP, stop waiting for the peer's reply.

    uvloop keeps a closing TLS connection until the peer answers close_notify (or 30 s pass). An
    idle keep-alive client never answers, and uvicorn's graceful stop waits for every connection,
    so one idle HTTPS client held a SIGTERM for the whole grace (plain HTTP: 0.3 s). RFC 8446 §6.1
    lets the closer skip the reply (nginx and Go do): ending the exchange here makes uvloop close
    the TCP transport, which still sends everything buffered (our close_notify too) first. Data
    not yet through TLS (TCP paused: a client not reading) keeps uvloop's path, as over plain HTTP.
    """
    # uvloop's own key for its TLS protocol; None on plain TCP and on asyncio's loop.
    tls = transport.get_extra_info("uvloop.sslproto")
    if tls is not None and transport.get_write_buffer_size() == 0:
        tls.eof_received()  # in the closing state: "shutdown complete", close TCP gracefully


class CoalescingTransport:
    """Joins the writes of one event-loop turn into one socket write.

    uvicorn writes a response's head and its body separately; on these machines each write is a
    system call that costs as much as a page of Python. Everything written in the same turn (the
    head, then the body a moment later) leaves in one `write`. Order is kept; `close` flushes
    first (and, over TLS, does not wait for the peer's close_notify); anything else is the real
    transport's.
    """

    __slots__ = ("_loop", "_pending", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self.transport.close()
        end_tls_close_without_peer(self.transport)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _HeadRefusedError(Exception):
    """Raised inside a parser callback to stop httptools at once; `data_received` answers."""


class TabijiHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus head limits, head timeout, TCP_NODELAY, the raw target."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits_of(config)
        self.url = b""
        self._in_head = (
            True  # from connection start (or a request's first byte) to headers complete
        )
        self._head_bytes = 0  # exact size of the head parsed so far (from the parser callbacks)
        self._head_raw = 0  # bytes received while the head is incomplete: bounds httptools' buffer
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._message_ended_in_chunk = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._draining = False  # shutdown began while this connection's head was arriving

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        set_nodelay(transport)
        # uvicorn's FlowControl keeps the real transport; every write goes through the wrapper.
        self.transport = cast(asyncio.Transport, CoalescingTransport(transport, self.loop))
        # A connection that never sends a byte is a slow head too (stock uvicorn keeps it forever).
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused or cut: the parser must not see another byte
        self._unset_keepalive_if_required()
        self._message_ended_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                status, reason = self._refusal
                self._refuse(status, reason)
            else:
                msg = "Invalid HTTP request received."
                self._record_refusal(400, "bad-request")
                self.send_400_response(msg)
            return
        if self._in_head:
            # The whole chunk is head bytes unless a previous request ended inside it (pipelining):
            # then the new head's start is unknown, and one chunk is the bound until the next one.
            if not self._message_ended_in_chunk:
                self._head_raw += len(data)
            if self._head_raw > self.limits.max_head_bytes:
                self._refuse(431, "head-too-large")

    # Parser callbacks

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes over the real transport (and anything still pending).
        wrapper: object = self.transport
        if isinstance(wrapper, CoalescingTransport):
            wrapper.flush()
            self.transport = wrapper.transport
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = _REQUEST_LINE_OVERHEAD
        self._head_raw = 0
        self._header_count = 0
        if self._head_timer is None:
            self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_head_bytes:
            self._refusal = (431, "head-too-large")
            raise _HeadRefusedError

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_header_count:
            self._refusal = (431, "too-many-headers")
            raise _HeadRefusedError
        if self._head_bytes > self.limits.max_head_bytes:
            self._refusal = (431, "head-too-large")
            raise _HeadRefusedError
        # RFC 9112 §6.1: a transfer coding we do not implement is 501. Only `chunked` is decoded;
        # anything else (e.g. "gzip, chunked") would reach the upstream mislabelled once the
        # hop-by-hop header is dropped.
        name = name.lower()
        if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            self._refusal = (501, "transfer-coding-unsupported")
            raise _HeadRefusedError
        # uvicorn's own on_header, inlined: this runs for every header of every request.
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # uvicorn keeps only the parsed path; routing needs an absolute-form target's authority.
        self.scope["extensions"] = {RAW_TARGET_KEY: self.url}  # type: ignore[dict-item]
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answer this one request, then close

    def shutdown(self) -> None:
        # uvicorn closes every connection without a running request, including one just accepted
        # whose request is still in flight: the client would get an empty reply (seen during SIGHUP
        # rolling restarts). A head under way is finished (bounded by the head timeout) and served.
        if self._in_head and not self.transport.is_closing():
            self._draining = True
            return
        super().shutdown()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_ended_in_chunk = True

    def send_400_response(self, msg: str) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().send_400_response(msg)

    # Head timeout

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "head-timeout")

    # Refusals

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a tiny plain-text error with `Connection: close` and drop the connection."""
        self._in_head = False
        self._cancel_head_timer()
        self._record_refusal(status, reason)
        body = STATUS_LINE[status][len(b"HTTP/1.1 ") : -2] + b"\n"
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()

    def _record_refusal(self, status: int, reason: str) -> None:
        observability.metrics.refused(reason)
        # Never the header values: they may carry cookies and tokens.
        logger.warning(
            "request refused by the protocol",
            extra={
                "reason": reason,
                "status": status,
                "client_ip": self.client[0] if self.client else None,
                "head_bytes": max(self._head_bytes, self._head_raw),
                "header_count": self._header_count,
            },
        )


class TabijiWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol plus the raw request-target in the scope.

    uvicorn hands an upgrade over by re-serialising the request line with httptools' raw target and
    feeding it to this class, so the target websockets parses here is byte-for-byte the client's.
    """

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # The ASGI task was only created, not run yet: it sees this before reading the scope.
            self.scope["extensions"][RAW_TARGET_KEY] = event.path.encode("ascii")  # type: ignore[assignment]
