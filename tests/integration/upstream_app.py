"""A real upstream for the integration tests: an aiohttp.web server on 127.0.0.1 (run as a script).

Every path echoes what arrived (method, raw path, query, headers) as JSON, except paths containing
`/_up/NAME`, which pick a behaviour (see `_SPECIAL`). It logs each request's raw path so tests can
ask it directly (`/_up/log`) whether the gateway forwarded something. Prints its port, then serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import WSMsgType, web

_CHUNK = b"\xa5" * (1024 * 1024)
_PAGE = b"<!doctype html><title>page</title>" + b"x" * (1024 - 34)


class _State:
    def __init__(self) -> None:
        self.log: list[str] = []  # raw paths (path + query) of every request, in order
        self.ws_closes: dict[str, tuple[int | None, str]] = {}  # id -> close the client sent


STATE = _State()


def _echo_body(request: web.Request, body_bytes: int) -> dict[str, object]:
    return {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.path,
        "query": request.query_string,
        "headers": [[name, value] for name, value in request.headers.items()],
        "body_bytes": body_bytes,
    }


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(_echo_body(request, len(body)))


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_PAGE, content_type="text/html")


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("n", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left > 0:
        piece = _CHUNK if left >= len(_CHUNK) else _CHUNK[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    # Counted as it streams in: never read whole into memory.
    count = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        count += len(chunk)
    return web.json_response({"bytes": count})


async def redirect(request: web.Request) -> web.Response:
    to = request.query.get("to", "http://elsewhere.example/landing?x=1")
    return web.Response(status=302, headers={"Location": to})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "60")))
    return web.json_response({"slept": float(request.query.get("s", "60"))})


async def hop(request: web.Request) -> web.Response:
    # Hop-by-hop headers, and one named in Connection, that the gateway must not pass on.
    return web.Response(
        text="hop",
        headers={
            "Connection": "close, X-Secret",
            "X-Secret": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": 'Basic realm="upstream"',
            "X-Request-Id": "upstream-chosen-id-123",
            "X-Kept": "yes",
        },
    )


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ident = request.query.get("id", "-")
    ws = web.WebSocketResponse(autoclose=False)
    await ws.prepare(request)
    while True:
        # ws.receive(), not `async for`: the iterator swallows the CLOSE message we record.
        message = await ws.receive()
        if message.type == WSMsgType.TEXT:
            text = message.data
            if text.startswith("close:"):
                _, code, reason = text.split(":", 2)
                await ws.close(code=int(code), message=reason.encode())
                break
            if text == "headers":
                await ws.send_str(json.dumps(dict(request.headers.items())))
            else:
                await ws.send_str(text)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
        elif message.type == WSMsgType.CLOSE:
            STATE.ws_closes[ident] = (message.data, message.extra or "")
            await ws.close()
            break
        else:  # CLOSING / CLOSED / ERROR
            break
    return ws


async def log(request: web.Request) -> web.Response:
    return web.json_response({"log": STATE.log, "ws_closes": STATE.ws_closes})


_SPECIAL = {
    "page": page,
    "download": download,
    "upload": upload,
    "redirect": redirect,
    "slow": slow,
    "hop": hop,
    "ws": websocket,
    "log": log,
}


async def dispatch(request: web.Request) -> web.StreamResponse:
    name = request.path.rsplit("/_up/", 1)[1] if "/_up/" in request.path else ""
    if name != "log":
        STATE.log.append(request.raw_path)
    handler = _SPECIAL.get(name, echo)
    return await handler(request)


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(bound, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)
