"""A real upstream for the forwarding tests (aiohttp.web on 127.0.0.1, plain and TLS listeners).

Run as `python upstream_server.py [CERT KEY]`; prints {"http": PORT, "https": PORT} on one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys

from aiohttp import WSMsgType, web

PATTERN = bytes(range(256)) * 256  # 64 KiB


async def echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
        }
    )


async def download(request: web.Request) -> web.StreamResponse:
    total = int(request.query["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("length") == "1":
        response.content_length = total
    await response.prepare(request)
    sent = 0
    while sent < total:
        piece = PATTERN[: min(len(PATTERN), total - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/elsewhere", headers={"Set-Cookie": "upstream=1; Path=/"})


async def hang_head(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3600)
    return web.Response()


async def hang_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"first")
    await asyncio.sleep(3600)
    return response


async def hop(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text="ok",
        headers={"Connection": "X-Internal", "X-Internal": "secret", "X-Request-Id": "theirs"},
    )


async def compressed(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b"\x1f\x8b not really gzip", headers={"Content-Encoding": "gzip"})


async def reset(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(1)
    return web.Response()


LAST_CLOSE: dict[str, object] = {}


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
    await ws.prepare(request)
    await ws.send_str(
        json.dumps(
            {
                "cookie": request.headers.get("Cookie"),
                "xff": request.headers.get("X-Forwarded-For"),
                "protocol": ws.ws_protocol,
            }
        )
    )
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                _, code, reason = msg.data.split(":", 2)
                await ws.close(code=int(code), message=reason.encode())
                break
            await ws.send_str("echo:" + msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    LAST_CLOSE["code"] = ws.close_code
    return ws


async def last_close(request: web.Request) -> web.StreamResponse:
    return web.json_response(LAST_CLOSE)


async def ws_refuse(request: web.Request) -> web.StreamResponse:
    return web.Response(status=403, text="no sockets for you")


async def main() -> None:
    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/download", download)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/hang-head", hang_head)
    app.router.add_get("/hang-body", hang_body)
    app.router.add_get("/hop", hop)
    app.router.add_get("/compressed", compressed)
    app.router.add_get("/reset", reset)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ws-last-close", last_close)
    app.router.add_get("/ws-refuse", ws_refuse)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    await plain.start()
    ports = {"http": plain._server.sockets[0].getsockname()[1]}  # type: ignore[union-attr]
    if len(sys.argv) == 3:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[1], sys.argv[2])
        secure = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await secure.start()
        ports["https"] = secure._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
