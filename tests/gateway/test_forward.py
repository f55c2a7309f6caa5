"""Forwarder against a real upstream on 127.0.0.1: streaming, redirects, failures, TLS, sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from factories import make_ctx, make_route, make_upstream
from tls_ca import make_ca
from yarl import URL

from gateway.context import RequestContext
from gateway.errors import GatewayError, RequestTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.forward import (
    ClientDisconnected,
    Forwarder,
    ResponseAborted,
    UpstreamRefusedWebSocket,
)
from gateway.headers import new_request_id, upstream_request_headers
from gateway.peer import TrustedProxies, resolve_peer
from gateway.routing import Route
from gateway.target import normalise_target

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent
MiB = 1024 * 1024


# -- the real upstream (a subprocess) and its TLS material, made at test time ------------------


@dataclass(frozen=True)
class Tls:
    ca: Path
    wrong_ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A CA, a leaf for 127.0.0.1 signed by it, and an unrelated CA — generated now."""
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory / "ca", "Tabiji test CA")
    wrong = make_ca(directory / "wrong", "Some other CA")
    cert, key = ca.issue(["127.0.0.1"], directory)
    return Tls(ca.ca_path, wrong.ca_path, cert, key)


@dataclass(frozen=True)
class Upstreams:
    http: int
    https: int


@pytest.fixture(scope="session")
def upstream(tls: Tls) -> Iterator[Upstreams]:
    """The real upstream server in a subprocess, plain and TLS listeners."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "upstream_server.py"), str(tls.cert), str(tls.key)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ports = json.loads(process.stdout.readline())
        yield Upstreams(ports["http"], ports["https"])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    """A started Forwarder, closed after the test."""
    instance = Forwarder()
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


def route_to(port: int, **changes: Any) -> Route:
    return make_route(make_upstream("127.0.0.1", port), **changes)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- in-memory ASGI ends for direct calls ---------------------------------------------------------


class Client:
    """The ASGI side of one request: feeds a body, records (or just counts) what is sent back."""

    def __init__(self, chunks: list[bytes] | None = None, *, keep: bool = True) -> None:
        self.chunks = list(chunks or [])
        self.keep = keep
        self.receives = 0
        self.start: MutableMapping[str, Any] | None = None
        self.body = bytearray()
        self.body_bytes = 0
        self.complete = False
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        if self.receives == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        else:
            self.body_bytes += len(message.get("body", b""))
            if self.keep:
                self.body += message.get("body", b"")
            self.complete = not message.get("more_body", False)

    def header(self, name: bytes) -> list[bytes]:
        assert self.start is not None
        return [value for key, value in self.start["headers"] if key == name]


def plain_headers(
    ctx: RequestContext, extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[str, str]]:
    client = [(b"host", b"app.example.test"), *extra]
    return upstream_request_headers(
        client, peer=ctx.peer, route=ctx.route, request_id=ctx.request_id
    )


# -- a minimal gateway on uvicorn, for end-to-end checks over real sockets ----------------------


@contextlib.asynccontextmanager
async def gateway(forwarder: Forwarder, route: Route, key: str = "session-1") -> AsyncIterator[str]:
    """uvicorn on 127.0.0.1 running the stages this module owns: target, peer, headers, forward."""
    trusted = TrustedProxies([])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"")
        target = normalise_target(scope["raw_path"] + (b"?" + query if query else b""))
        peer = resolve_peer(scope["client"][0], scope["scheme"], scope["headers"], trusted)
        rid = new_request_id(scope["headers"], peer.via_trusted_proxy)
        ctx = RequestContext(rid, scope.get("method", "GET"), peer, target, route)
        headers = upstream_request_headers(scope["headers"], peer=peer, route=route, request_id=rid)
        if scope["type"] == "websocket":
            try:
                await forwarder.forward_websocket(ctx, headers, receive, send, key=key)
            except GatewayError as error:
                await receive()
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": error.status,
                        "headers": [(b"x-code", error.code.encode())],
                    }
                )
                await send({"type": "websocket.http.response.body", "body": b""})
            return
        try:
            await forwarder.forward_http(ctx, headers, receive, send)
        except (ResponseAborted, ClientDisconnected):
            return
        except GatewayError as error:
            await send(
                {
                    "type": "http.response.start",
                    "status": error.status,
                    "headers": [(b"x-code", error.code.encode())],
                }
            )
            await send({"type": "http.response.body", "body": error.code.encode()})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="critical",
        ws="websockets-sansio",
        http="httptools",
        proxy_headers=False,  # the gateway decides whom to trust, never uvicorn
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 — uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain test client (the browser's role)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# -- HTTP ----------------------------------------------------------------------------------------


async def test_request_passes_through_exactly(
    upstream: Upstreams, forwarder: Forwarder, client: aiohttp.ClientSession
) -> None:
    """The normalised path, the client's own headers and the gateway's X-Forwarded-* arrive."""
    async with (
        gateway(forwarder, route_to(upstream.http)) as address,
        client.get(
            URL(f"http://{address}/echo/a/../b%3a?q=%2F", encoded=True),
            headers={
                "User-Agent": "probe/1",
                "X-Tabiji-User": "admin",
                "X-Forwarded-For": "6.6.6.6",
                "Connection": "X-Forwarded-For",
            },
            skip_auto_headers=("Accept", "Accept-Encoding"),
        ) as response,
    ):
        seen = await response.json()
        request_id = response.headers["X-Request-Id"]
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    assert seen["raw_path"] == "/echo/b%3A?q=%2F"
    assert headers["user-agent"] == ["probe/1"]
    assert "accept" not in headers
    assert "accept-encoding" not in headers
    assert "x-tabiji-user" not in headers
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-request-id"] == [request_id]
    assert headers["host"] == [f"127.0.0.1:{upstream.http}"]


async def test_streams_upload_and_download(
    upstream: Upstreams, forwarder: Forwarder, client: aiohttp.ClientSession
) -> None:
    """A chunked 8 MiB upload and an 8 MiB download pass through intact."""
    payload = hashlib.sha256(b"seed").digest() * (8 * MiB // 32)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(payload), 256 * 1024):
            yield payload[offset : offset + 256 * 1024]

    async with gateway(forwarder, route_to(upstream.http)) as address:
        async with client.post(f"http://{address}/echo/up", data=chunks()) as response:
            seen = await response.json()
        async with client.get(f"http://{address}/download?n={8 * MiB}") as response:
            digest = hashlib.sha256()
            async for piece in response.content.iter_any():
                digest.update(piece)
    assert seen["body_bytes"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert seen["chunked"]
    expected = (bytes(range(256)) * 256) * (8 * MiB // 65536)
    assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()


async def test_redirect_is_returned_not_followed(upstream: Upstreams, forwarder: Forwarder) -> None:
    """A 302 from the upstream goes back to the client with its Location and Set-Cookie."""
    ctx = make_ctx(route_to(upstream.http), path="/redirect")
    sink = Client()
    result = await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert result.status == 302
    assert sink.header(b"location") == [b"/elsewhere"]
    assert sink.header(b"set-cookie") == [b"upstream=1; Path=/"]


async def test_upload_content_length_sent_unchunked(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """A body with Content-Length is forwarded with it (not re-chunked), byte for byte."""
    ctx = make_ctx(route_to(upstream.http), method="PUT", path="/echo/x")
    body = [b"a" * 1000, b"b" * 1000]
    headers = plain_headers(ctx, [(b"content-length", b"2000")])
    sink = Client(body)
    result = await forwarder.forward_http(ctx, headers, sink.receive, sink.send)
    seen = json.loads(sink.body)
    assert seen["body_bytes"] == 2000
    assert not seen["chunked"]
    assert result.bytes_in == 2000
    assert result.bytes_out == len(sink.body)

    single = Client([b"c" * 500])
    headers = plain_headers(ctx, [(b"content-length", b"500")])
    await forwarder.forward_http(ctx, headers, single.receive, single.send)
    seen = json.loads(single.body)
    lengths = [value for name, value in seen["headers"] if name.lower() == "content-length"]
    assert lengths == ["500"]
    assert seen["body_bytes"] == 500


async def test_response_hop_by_hop_dropped(upstream: Upstreams, forwarder: Forwarder) -> None:
    """Headers the upstream names in Connection are dropped; X-Request-Id is the gateway's."""
    ctx = make_ctx(route_to(upstream.http), path="/hop")
    sink = Client()
    await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert sink.header(b"x-internal") == []
    assert sink.header(b"connection") == []
    assert sink.header(b"x-request-id") == [ctx.request_id.encode()]


async def test_encoded_body_passes_unchanged(upstream: Upstreams, forwarder: Forwarder) -> None:
    """Content-Encoding bodies are not decompressed: bytes pass through as the upstream sent."""
    ctx = make_ctx(route_to(upstream.http), path="/compressed")
    sink = Client()
    await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert sink.header(b"content-encoding") == [b"gzip"]
    assert bytes(sink.body) == b"\x1f\x8b not really gzip"


async def test_connection_refused_is_unavailable(forwarder: Forwarder) -> None:
    """A refused connection raises UpstreamUnavailable (502) before any response."""
    ctx = make_ctx(route_to(closed_port()), path="/")
    sink = Client()
    with pytest.raises(UpstreamUnavailable) as caught:
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert caught.value.status == 502
    assert sink.start is None


async def test_reset_before_response_is_unavailable(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """An upstream that drops the connection before answering raises UpstreamUnavailable."""
    ctx = make_ctx(route_to(upstream.http), path="/reset")
    sink = Client()
    with pytest.raises(UpstreamUnavailable):
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert sink.start is None


async def test_hanging_upstream_times_out(upstream: Upstreams, forwarder: Forwarder) -> None:
    """An upstream silent for longer than read_timeout raises UpstreamTimeout (504)."""
    ctx = make_ctx(route_to(upstream.http, read_timeout=0.3), path="/hang-head")
    sink = Client()
    with pytest.raises(UpstreamTimeout) as caught:
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert caught.value.status == 504
    assert sink.start is None


async def test_read_timeout_after_start_aborts(upstream: Upstreams, forwarder: Forwarder) -> None:
    """A stall between body chunks after the response started raises ResponseAborted, not 504."""
    ctx = make_ctx(route_to(upstream.http, read_timeout=0.3), path="/hang-body")
    sink = Client()
    with pytest.raises(ResponseAborted) as caught:
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert sink.start is not None
    assert not sink.complete
    assert caught.value.code == "upstream-timeout"
    assert caught.value.result.bytes_out == len(b"first")


async def test_declared_body_over_limit_refused_before_reading(forwarder: Forwarder) -> None:
    """A Content-Length above max_body_bytes raises RequestTooLarge before reading or connecting."""
    ctx = make_ctx(route_to(closed_port(), max_body_bytes=100), method="POST", path="/echo")
    sink = Client([b"x" * 101])
    headers = plain_headers(ctx, [(b"content-length", b"101")])
    with pytest.raises(RequestTooLarge):
        await forwarder.forward_http(ctx, headers, sink.receive, sink.send)
    assert sink.receives == 0


async def test_streamed_body_over_limit_aborts(upstream: Upstreams, forwarder: Forwarder) -> None:
    """A chunked body crossing max_body_bytes aborts the upstream request with RequestTooLarge."""
    ctx = make_ctx(route_to(upstream.http, max_body_bytes=150_000), method="POST", path="/echo")
    sink = Client([b"x" * 65536] * 4)
    with pytest.raises(RequestTooLarge):
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert sink.start is None


async def test_client_leaving_mid_download_stops_transfer(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """A client that disconnects mid-download ends the exchange with ClientDisconnected."""
    ctx = make_ctx(route_to(upstream.http), path="/download", query=f"n={1024 * MiB}")
    sink = Client(keep=False)

    async def leave() -> None:
        while sink.body_bytes < 4 * MiB:  # noqa: ASYNC110 — polling a byte counter
            await asyncio.sleep(0.01)
        sink.gone.set()

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientDisconnected) as caught:
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    await leaving
    assert caught.value.result is not None
    assert caught.value.result.bytes_out < 512 * MiB


# -- TLS -----------------------------------------------------------------------------------------


async def test_tls_upstream_verified_with_route_ca(
    upstream: Upstreams, forwarder: Forwarder, tls: Tls
) -> None:
    """An https upstream is reached when its certificate chains to the route's CA bundle."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    up = make_upstream("127.0.0.1", upstream.https, scheme="https", ssl_context=context)
    ctx = make_ctx(make_route(up), path="/echo/tls")
    sink = Client()
    result = await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert result.status == 200
    assert json.loads(sink.body)["raw_path"] == "/echo/tls"


async def test_tls_upstream_with_wrong_ca_refused(
    upstream: Upstreams, forwarder: Forwarder, tls: Tls
) -> None:
    """With the wrong CA bundle the upstream is refused (this fails if verification were off)."""
    context = ssl.create_default_context(cafile=str(tls.wrong_ca))
    up = make_upstream("127.0.0.1", upstream.https, scheme="https", ssl_context=context)
    ctx = make_ctx(make_route(up), path="/echo/tls")
    sink = Client()
    with pytest.raises(UpstreamUnavailable) as caught:
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)
    assert caught.value.code == "upstream-tls-error"
    assert sink.start is None


async def test_tls_upstream_without_bundle_uses_system_store(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """Without a route CA bundle, verification still happens (system store): a private CA fails."""
    up = make_upstream("127.0.0.1", upstream.https, scheme="https", ssl_context=None)
    ctx = make_ctx(make_route(up), path="/echo/tls")
    sink = Client()
    with pytest.raises(UpstreamUnavailable):
        await forwarder.forward_http(ctx, plain_headers(ctx), sink.receive, sink.send)


# -- WebSockets ----------------------------------------------------------------------------------


async def test_websocket_relays_text_binary_and_close_codes(
    upstream: Upstreams, forwarder: Forwarder, client: aiohttp.ClientSession
) -> None:
    """Text, binary, subprotocol, cookies and close codes/reasons cross the relay both ways."""
    async with gateway(forwarder, route_to(upstream.http)) as address:
        async with client.ws_connect(
            f"ws://{address}/ws", protocols=("chat.v1",), headers={"Cookie": "sid=abc"}
        ) as ws:
            hello = json.loads((await ws.receive()).data)
            assert hello["cookie"] == "sid=abc"
            assert hello["xff"] == "127.0.0.1"
            assert hello["protocol"] == "chat.v1"
            assert ws.protocol == "chat.v1"
            await ws.send_str("hi")
            assert (await ws.receive()).data == "echo:hi"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive()).data == b"\x02\x01\x00"
            await ws.send_str("close:4321:bye now")
            closing = await ws.receive()
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == 4321
            assert closing.extra == "bye now"
        async with client.ws_connect(f"ws://{address}/ws") as ws:
            await ws.receive()
            await ws.close(code=4000, message=b"client done")
        for _ in range(100):
            async with client.get(f"http://127.0.0.1:{upstream.http}/ws-last-close") as response:
                if (await response.json()).get("code") == 4000:
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the client's close code did not reach the upstream")
        assert len(forwarder.websockets) == 0


async def test_websocket_close_where_closes_matching_relays(
    upstream: Upstreams, forwarder: Forwarder, client: aiohttp.ClientSession
) -> None:
    """close_where closes the matching live sockets with the given code and reason."""
    async with (
        gateway(forwarder, route_to(upstream.http), key="session-9") as address,
        client.ws_connect(f"ws://{address}/ws") as ws,
    ):
        await ws.receive()
        assert forwarder.websockets.close_where(lambda live: live.key == "other") == 0
        closed = forwarder.websockets.close_where(
            lambda live: live.key == "session-9", code=4401, reason="session revoked"
        )
        assert closed == 1
        message = await ws.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 4401
        assert message.extra == "session revoked"


async def test_websocket_upstream_refusal_raises_before_accept(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """A non-101 upstream answer raises UpstreamRefusedWebSocket with its status; nothing sent."""
    ctx = make_ctx(route_to(upstream.http), path="/ws-refuse")
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(UpstreamRefusedWebSocket) as caught:
        await forwarder.forward_websocket(ctx, plain_headers(ctx), receive, send)
    assert caught.value.upstream_status == 403
    assert sent == []


async def test_websocket_upstream_down_gives_502_over_denial_response(
    forwarder: Forwarder, client: aiohttp.ClientSession
) -> None:
    """An unreachable upstream yields an HTTP 502 handshake answer (ASGI denial response)."""
    async with gateway(forwarder, route_to(closed_port())) as address:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            async with client.ws_connect(f"ws://{address}/ws"):
                pass
    assert caught.value.status == 502


# -- memory --------------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.slow
async def test_large_bodies_stream_with_flat_memory(
    upstream: Upstreams, forwarder: Forwarder
) -> None:
    """256 MiB up and 256 MiB down pass through while the process RSS grows by under 64 MiB."""
    size = 256 * MiB
    peak = baseline = rss()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        chunk = b"u" * (64 * 1024)
        up = make_ctx(route_to(upstream.http, max_body_bytes=2 * size), method="POST", path="/echo")
        sink = Client([chunk] * (size // len(chunk)), keep=False)
        result = await forwarder.forward_http(up, plain_headers(up), sink.receive, sink.send)
        assert result.bytes_in == size

        down = make_ctx(route_to(upstream.http), path="/download", query=f"n={size}&length=1")
        sink = Client(keep=False)
        result = await forwarder.forward_http(down, plain_headers(down), sink.receive, sink.send)
        assert result.bytes_out == size
        assert sink.body_bytes == size
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert peak - baseline < 64 * MiB
