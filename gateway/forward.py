"""Forwarding: streams HTTP requests and responses (gateway.upstream's keep-alive pools) and
relays WebSockets (one aiohttp session per worker); maps upstream failures to 502 / 504.

The only user of the upstream clients (DESIGN.md §3): gateway.upstream for HTTP — chosen by
measurement, see bench/stacks.py — and aiohttp, imported nowhere else, for WebSockets.
Must not import gateway.settings, gateway.app or gateway.cli.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from gateway.context import RequestContext
from gateway.errors import GatewayError, RequestTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import downstream_response_headers
from gateway.routing import Route, Upstream
from gateway.upstream import (
    Connection,
    UpstreamClosedError,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeoutError,
    UpstreamTLSError,
    request_head,
    send_chunked,
    send_sized,
)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Headers the client's own handshake carries; aiohttp makes a fresh handshake upstream
# (RFC 6455 §4.1), and Sec-WebSocket-Protocol is passed as `protocols`.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
# Close codes an endpoint may put on the wire (RFC 6455 §7.4.1-7.4.2): 1004-1006 and 1015 are
# reserved, others below 3000 unassigned.
_SENDABLE_CLOSE = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
CLOSE_BAD_GATEWAY = 1014  # RFC 6455 §11.7 registry: "Bad Gateway"


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """What one forwarded exchange did; `upstream_seconds` is the time to the upstream's head."""

    status: int
    bytes_in: int
    bytes_out: int
    upstream_seconds: float


class ResponseAborted(GatewayError):
    """The upstream failed after the response had started: the client connection must be cut.

    The pipeline must not send a response (one is under way); it logs `code` and re-raises or
    returns so the server closes the connection. `result` holds the partial counters.
    """

    code = "upstream-aborted"
    status = 502

    def __init__(self, detail: str, *, result: ForwardResult, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.result = result


class ClientDisconnected(GatewayError):
    """The client went away mid-exchange; nothing is sent back (nginx's 499)."""

    code = "client-disconnected"
    status = 499

    def __init__(self, detail: str = "", *, result: ForwardResult | None = None) -> None:
        super().__init__(detail)
        self.result = result


class UpstreamRefusedWebSocket(UpstreamUnavailable):
    """The upstream answered the WebSocket handshake with a non-101 status (`upstream_status`).

    Raised before the client is accepted; the pipeline may relay `upstream_status` through the
    ASGI WebSocket denial response, or answer 502 like any UpstreamUnavailable.
    """

    code = "upstream-websocket-refused"

    def __init__(self, detail: str, *, upstream_status: int) -> None:
        super().__init__(detail)
        self.upstream_status = upstream_status


class _BodyState:
    __slots__ = ("bytes_in", "client_gone", "done", "finishing", "too_large")

    def __init__(self, bytes_in: int) -> None:
        self.bytes_in = bytes_in
        self.too_large = False  # the request body crossed max_body_bytes
        self.client_gone = False  # the client disconnected
        self.done = False  # the request body was read completely
        self.finishing = False  # the last response chunk is being sent


class _BodyAbort(Exception):
    """Raised inside the request-body generator to abort the upstream request."""


def _upstream_error(exc: BaseException, route: Route) -> GatewayError:
    """Map an upstream failure before the response started to 502 / 504."""
    if isinstance(exc, UpstreamTLSError):
        return UpstreamUnavailable(
            f"TLS with the upstream of route {route.name!r} failed: {exc!r}",
            code="upstream-tls-error",
        )
    if isinstance(exc, TimeoutError | UpstreamTimeoutError):  # aiohttp's timeouts subclass it
        return UpstreamTimeout(f"upstream of route {route.name!r} timed out: {exc!r}")
    if isinstance(exc, aiohttp.ClientSSLError):
        return UpstreamUnavailable(
            f"TLS with the upstream of route {route.name!r} failed: {exc!r}",
            code="upstream-tls-error",
        )
    return UpstreamUnavailable(f"upstream of route {route.name!r} unavailable: {exc!r}")


@dataclass(eq=False)
class LiveWebSocket:
    """One relayed WebSocket, as the registry shows it to `close_where` predicates."""

    ctx: RequestContext
    key: Hashable
    closing: asyncio.Future[tuple[int, str]] = field(repr=False)
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class WebSocketRegistry:
    """The worker's live WebSocket relays, so a revoked session's sockets can be closed later."""

    def __init__(self) -> None:
        self._live: set[LiveWebSocket] = set()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, live: LiveWebSocket) -> None:
        self._live.add(live)

    def discard(self, live: LiveWebSocket) -> None:
        self._live.discard(live)

    def close_where(
        self, predicate: Callable[[LiveWebSocket], bool], *, code: int = 4401, reason: str = ""
    ) -> int:
        """Ask each relay matching `predicate` to close both sides with `code`; returns how many."""
        count = 0
        for live in list(self._live):
            if not live.closing.done() and predicate(live):
                live.closing.set_result((code, reason))
                count += 1
        return count

    async def wait_closed(self) -> None:
        """Wait until every live relay has finished (bound it with `asyncio.timeout`)."""
        pending = [live.finished.wait() for live in self._live]
        if pending:
            await asyncio.gather(*pending)


class Forwarder:
    """Per worker: an HTTP keep-alive pool per upstream, and one aiohttp session for WebSockets.

    Neither stores cookies or follows redirects; TLS is always verified.
    """

    def __init__(
        self,
        *,
        limit: int = 1024,
        limit_per_host: int = 0,
        keepalive_timeout: float = 30.0,
        ws_max_message: int = 16 * 1024 * 1024,
        max_response_field_size: int = 32 * 1024,
    ) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive_timeout = keepalive_timeout
        self._ws_max_message = ws_max_message
        self._max_field = max_response_field_size
        self._session: aiohttp.ClientSession | None = None
        # Upstream -> "origin + base_path"; keyed by identity (routes live as long as the config).
        self._prefixes: dict[int, tuple[Upstream, str]] = {}
        self._pools: dict[int, tuple[Upstream, UpstreamPool]] = {}
        self.websockets = WebSocketRegistry()

    async def start(self) -> None:
        """Create the session; call once per worker, inside its event loop."""
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            keepalive_timeout=self._keepalive_timeout,
            ttl_dns_cache=60,
            # A route's Upstream.ssl_context is passed per request; this default verifies too.
            ssl=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Bytes pass through unchanged: Content-Encoding is the client's and upstream's affair.
            auto_decompress=False,
            # The client's own headers are forwarded exactly; aiohttp adds none of its defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            # Cookies belong to the browser: the shared session must never store or replay them.
            cookie_jar=aiohttp.DummyCookieJar(),
            # No proxy from the environment: the upstream is exactly where the route says.
            trust_env=False,
            # Per-request timeouts come from the route (connect) and per chunk (read).
            timeout=aiohttp.ClientTimeout(total=None),
            max_line_size=self._max_field,
            max_field_size=self._max_field,
        )

    async def close(self, grace: float = 5.0) -> None:
        """Close live WebSockets (1001 going away), then the session and its connections."""
        if self.websockets:
            self.websockets.close_where(lambda _: True, code=1001, reason="gateway shutting down")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.websockets.wait_closed()
        for _, pool in self._pools.values():
            await pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._session

    def upstream_url(self, ctx: RequestContext) -> URL:
        """Upstream origin + base_path + the normalised path (+ query), never re-encoded."""
        upstream = ctx.route.upstream
        cached = self._prefixes.get(id(upstream))
        if cached is None or cached[0] is not upstream:
            cached = (upstream, upstream.origin + upstream.base_path)
            self._prefixes[id(upstream)] = cached
        target = ctx.target
        url = cached[1] + target.path
        if target.query:
            url += "?" + target.query
        return URL(url, encoded=True)

    def _pool(self, upstream: Upstream) -> UpstreamPool:
        # Keyed by identity: routes (and their Upstream values) live as long as the config.
        entry = self._pools.get(id(upstream))
        if entry is None or entry[0] is not upstream:
            context = upstream.ssl_context
            if upstream.scheme == "https" and context is None:
                # Never plain TCP to an https upstream: verify against the system store.
                context = ssl.create_default_context()
            pool = UpstreamPool(upstream.host, upstream.port, context)
            entry = (upstream, pool)
            self._pools[id(upstream)] = entry
        return entry[1]

    def upstream_target(self, ctx: RequestContext) -> str:
        """base_path + the normalised path (+ query): the request-target sent upstream."""
        target = ctx.target
        path = ctx.route.upstream.base_path + target.path
        return path + "?" + target.query if target.query else path

    async def forward_http(
        self, ctx: RequestContext, headers: list[tuple[str, str]], receive: Receive, send: Send
    ) -> ForwardResult:
        """Stream the request to the upstream and its response back; never buffer whole bodies.

        Before the response starts, failures raise RequestTooLarge / UpstreamUnavailable /
        UpstreamTimeout / ClientDisconnected; after it started, ResponseAborted or
        ClientDisconnected (the pipeline then sends nothing more).
        """
        route = ctx.route
        limit = route.max_body_bytes
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            # Refused before reading the body or connecting upstream (no 100-continue is sent).
            raise RequestTooLarge(f"Content-Length {declared} exceeds {limit}")

        first = await receive()
        if first["type"] == "http.disconnect":
            raise ClientDisconnected("client left before the request body")
        body: bytes = first.get("body", b"")
        more: bool = first.get("more_body", False)
        state = _BodyState(len(body))
        if state.bytes_in > limit:
            raise RequestTooLarge(f"request body exceeds {limit} bytes")
        if more and declared is None:
            # A streamed body of unknown length goes upstream chunked (RFC 9112 §7.1).
            headers = [*headers, ("transfer-encoding", "chunked")]
        elif not more:
            state.done = True
            if body and declared is None:
                # A chunked request that arrived whole: its length is known now (RFC 9112 §6.2).
                headers = [*headers, ("content-length", str(len(body)))]
        try:
            head = request_head(ctx.method, self.upstream_target(ctx), headers)
        except UpstreamError as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        pool = self._pool(route.upstream)
        started = time.perf_counter()
        stream = _stream_body(body, receive, limit, state) if more else None
        connection, sender = await self._open_exchange(
            ctx, pool, head, body, stream, sized=declared is not None, state=state
        )
        upstream_seconds = time.perf_counter() - started
        try:
            return await self._stream_response(
                ctx, connection, receive, send, state=state, upstream_seconds=upstream_seconds
            )
        finally:
            if sender is not None and not sender.done():
                # The upstream answered before taking the whole body: this connection is spent.
                connection.close()
                await _settle(sender)
            pool.release(connection)

    async def _open_exchange(
        self,
        ctx: RequestContext,
        pool: UpstreamPool,
        head: bytes,
        body: bytes,
        stream: AsyncIterator[bytes] | None,
        *,
        sized: bool,
        state: _BodyState,
    ) -> tuple[Connection, asyncio.Task[None] | None]:
        """Send the request and wait for the response head; the body may still be streaming."""
        route = ctx.route
        # A pooled connection the upstream closed meanwhile fails before any response byte:
        # the request is sent once more on a fresh connection, but only if it had no body stream.
        for attempt in (1, 2):
            try:
                connection = await pool.acquire(route.connect_timeout)
            except UpstreamError as exc:
                raise _upstream_error(exc, route) from exc
            connection.start(head, expect_body=ctx.method != "HEAD")
            sender: asyncio.Task[None] | None = None
            try:
                if stream is not None:
                    framing = send_sized if sized else send_chunked
                    sender = asyncio.create_task(framing(connection, stream))
                    sender.add_done_callback(_close_on_failure(connection))
                elif body:
                    await connection.write(body)
                await connection.read_head(route.read_timeout)
            except UpstreamError as exc:
                connection.close()
                pool.release(connection)
                await _settle(sender)
                stale = connection.reused and isinstance(exc, UpstreamClosedError)
                if attempt == 1 and stale and stream is None:
                    continue
                _raise_body_abort(state, None)
                raise _upstream_error(exc, route) from exc
            except BaseException:  # cancelled (shutdown) or our bug: give the slot back
                connection.close()
                pool.release(connection)
                if sender is not None:
                    sender.cancel()
                raise
            return connection, sender
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _stream_response(
        self,
        ctx: RequestContext,
        connection: Connection,
        receive: Receive,
        send: Send,
        *,
        state: _BodyState,
        upstream_seconds: float,
    ) -> ForwardResult:
        bytes_out = 0
        watcher: asyncio.Task[None] | None = None
        read_timeout = ctx.route.read_timeout
        status = connection.status
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": downstream_response_headers(connection.headers, ctx.request_id),
                }
            )
            while True:
                chunk = await connection.read_chunk(read_timeout)
                if not chunk:
                    state.finishing = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                bytes_out += len(chunk)
                if connection.at_end:
                    state.finishing = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None and state.done:
                    # A streamed response: watch for the client leaving, so a gone client does
                    # not keep an upstream transfer running (ASGI send() is silent after it).
                    watcher = asyncio.create_task(_watch_disconnect(receive, connection, state))
        except UpstreamError as exc:
            connection.close()
            result = ForwardResult(status, state.bytes_in, bytes_out, upstream_seconds)
            _raise_body_abort(state, result)
            if state.too_large:
                code = "body-too-large"
            elif isinstance(exc, UpstreamTimeoutError):
                code = "upstream-timeout"
            else:
                code = "upstream-aborted"
            raise ResponseAborted(
                f"upstream of route {ctx.route.name!r} failed mid-response: {exc!r}",
                result=result,
                code=code,
            ) from exc
        except BaseException:
            connection.close()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        result = ForwardResult(status, state.bytes_in, bytes_out, upstream_seconds)
        if state.client_gone:
            connection.close()
            raise ClientDisconnected("client left during the response", result=result)
        return result

    async def forward_websocket(
        self,
        ctx: RequestContext,
        headers: list[tuple[str, str]],
        receive: Receive,
        send: Send,
        *,
        key: Hashable = None,
    ) -> ForwardResult:
        """Relay one WebSocket (RFC 6455) between the client and the upstream until either closes.

        The upstream handshake happens before the client is accepted: its failure raises
        UpstreamUnavailable / UpstreamTimeout / UpstreamRefusedWebSocket with nothing sent and
        nothing received, so the pipeline can still read `websocket.connect` and answer with the
        ASGI denial response (502/504) or `websocket.close`. The `websocket.connect` message may
        or may not have been consumed by the caller; the relay skips it.
        `key` (e.g. a session id) is what `self.websockets.close_where` predicates can match.
        """
        route = ctx.route
        protocols: list[str] = []
        upstream_headers: list[tuple[str, str]] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == "sec-websocket-protocol":
                protocols.extend(p.strip() for p in value.split(",") if p.strip())
            elif lowered not in _WS_HANDSHAKE:
                upstream_headers.append((name, value))

        ssl_context = route.upstream.ssl_context
        started = time.perf_counter()
        try:
            async with asyncio.timeout(route.connect_timeout + route.read_timeout):
                upstream = await self.session.ws_connect(
                    self.upstream_url(ctx),
                    protocols=protocols,
                    headers=upstream_headers,
                    ssl=ssl_context if ssl_context is not None else True,
                    # Messages are relayed, not frames: extensions are negotiated per side.
                    compress=0,
                    autoclose=True,
                    autoping=True,
                    max_msg_size=self._ws_max_message,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamRefusedWebSocket(
                f"upstream of route {route.name!r} refused the WebSocket: {exc.status}",
                upstream_status=exc.status,
            ) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _upstream_error(exc, route) from exc
        upstream_seconds = time.perf_counter() - started

        live = LiveWebSocket(ctx, key, asyncio.get_running_loop().create_future())
        self.websockets.add(live)
        try:
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": upstream.protocol,
                    "headers": [(b"x-request-id", ctx.request_id.encode("ascii"))],
                }
            )
            counts = [0, 0]
            await _relay(upstream, receive, send, live, counts)
            return ForwardResult(101, counts[0], counts[1], upstream_seconds)
        finally:
            self.websockets.discard(live)
            if not upstream.closed:
                await upstream.close(code=1001, message=b"gateway relay ended")
            live.finished.set()


async def _relay(
    upstream: aiohttp.ClientWebSocketResponse,
    receive: Receive,
    send: Send,
    live: LiveWebSocket,
    counts: list[int],
) -> None:
    """Pump messages both ways; the first side to end (or a registry close) ends both."""
    to_upstream = asyncio.create_task(_client_to_upstream(upstream, receive, counts))
    to_client = asyncio.create_task(_upstream_to_client(upstream, send, counts))
    tasks: set[asyncio.Future[Any]] = {to_upstream, to_client, live.closing}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
    if _finished(to_upstream, done):
        code, reason = to_upstream.result()
        # The client closed: pass its code and reason on to the upstream (RFC 6455 §7.1.5).
        await upstream.close(code=_sendable(code, 1000), message=reason.encode()[:123])
    elif _finished(to_client, done):
        code, reason = to_client.result()
        # The upstream closed (or broke: 1014): tell the client, with its reason.
        await _send_close(send, code, reason)
    elif live.closing.done():
        code, reason = live.closing.result()
        await upstream.close(code=_sendable(code, 1000), message=reason.encode()[:123])
        await _send_close(send, code, reason)
    else:
        # A relay direction failed (a socket error while sending): end both sides.
        await upstream.close(code=1011, message=b"gateway relay failed")
        await _send_close(send, CLOSE_BAD_GATEWAY, "relay failed")


def _finished(task: asyncio.Task[tuple[int, str]], done: set[asyncio.Future[Any]]) -> bool:
    return task in done and not task.cancelled() and task.exception() is None


def _sendable(code: int, fallback: int) -> int:
    return code if code in _SENDABLE_CLOSE or 3000 <= code <= 4999 else fallback


async def _send_close(send: Send, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):  # the client may already be gone; nothing to tell
        await send({"type": "websocket.close", "code": code, "reason": reason[:123]})


async def _client_to_upstream(
    upstream: aiohttp.ClientWebSocketResponse, receive: Receive, counts: list[int]
) -> tuple[int, str]:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.connect":
            continue  # the handshake message, when the caller did not consume it
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                counts[0] += len(text)
                await upstream.send_str(text)
            else:
                data = message.get("bytes") or b""
                counts[0] += len(data)
                await upstream.send_bytes(data)
        elif kind == "websocket.disconnect":
            code = message.get("code", 1005)
            # 1005/1006 mean "no code"/"abnormal": the client went away (RFC 6455 §7.4.1).
            return (1001 if code in (1005, 1006) else code, message.get("reason") or "")


async def _upstream_to_client(
    upstream: aiohttp.ClientWebSocketResponse, send: Send, counts: list[int]
) -> tuple[int, str]:
    while True:
        message = await upstream.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            counts[1] += len(message.data)
            await send({"type": "websocket.send", "text": message.data})
        elif message.type is aiohttp.WSMsgType.BINARY:
            counts[1] += len(message.data)
            await send({"type": "websocket.send", "bytes": message.data})
        elif message.type is aiohttp.WSMsgType.CLOSE:
            code = message.data if isinstance(message.data, int) else 1005
            return (_sendable(code, 1000), message.extra or "")
        else:  # CLOSED / ERROR without a close frame: the upstream broke the connection
            return (CLOSE_BAD_GATEWAY, "upstream connection lost")


async def _stream_body(
    first: bytes, receive: Receive, limit: int, state: _BodyState
) -> AsyncIterator[bytes]:
    if first:
        yield first
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            state.client_gone = True
            raise _BodyAbort("client disconnected")
        chunk: bytes = message.get("body", b"")
        state.bytes_in += len(chunk)
        if state.bytes_in > limit:
            # Crossing max_body_bytes mid-stream aborts the upstream request (its connection is
            # closed, never reused); the pipeline answers 413 if no response has started.
            state.too_large = True
            raise _BodyAbort("request body too large")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            state.done = True
            return


def _raise_body_abort(state: _BodyState, result: ForwardResult | None) -> None:
    if state.too_large and result is None:
        raise RequestTooLarge(f"request body exceeds the limit after {state.bytes_in} bytes")
    if state.client_gone:
        raise ClientDisconnected("client left during the request body", result=result)


async def _watch_disconnect(receive: Receive, connection: Connection, state: _BodyState) -> None:
    message = await receive()
    # uvicorn also answers http.disconnect once the response is complete: not a client leaving.
    if message["type"] == "http.disconnect" and not state.finishing:
        state.client_gone = True
        connection.close()


def _close_on_failure(connection: Connection) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback: a request body that could not be sent spoils the exchange."""

    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            connection.close()

    return done


async def _settle(task: asyncio.Task[None] | None) -> None:
    """Wait for a body sender to end (cancelling it), keeping its error to itself."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "content-length" or name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
