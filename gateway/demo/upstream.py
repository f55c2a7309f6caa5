"""The demo upstream, 「庁内グループウェア」: a tiny internal web app to put behind the gateway.

It shows what the gateway told it (forwarded headers, request id) and echoes WebSocket messages.
Listens on loopback only. Run: python -m gateway.demo.upstream --port 9001
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

SHOWN_HEADERS = (
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-request-id",
)


async def home(request: Request) -> Response:
    """The groupware's front page: who the gateway says is asking, in Japanese."""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td><code>{html.escape(request.headers.get(name, '—'))}"
        "</code></td></tr>"
        for name in SHOWN_HEADERS
    )
    body = (
        "<!doctype html><html lang=ja><meta charset=utf-8><title>庁内グループウェア</title>"
        "<h1>庁内グループウェア（デモ）</h1>"
        "<p>この画面は Tabiji ゲートウェイを通して表示されています。</p>"
        f"<table>{rows}</table></html>"
    )
    return HTMLResponse(body)


async def echo_headers(request: Request) -> Response:
    """Every request header as JSON (lets tests see exactly what the gateway forwarded)."""
    return JSONResponse(
        {
            "method": request.method,
            "path": request.scope["raw_path"].decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]
            ],
        }
    )


async def websocket_echo(websocket: WebSocket) -> None:
    """Echo text and binary frames until the client closes."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", home),
            Route("/headers", echo_headers, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            WebSocketRoute("/ws", websocket_echo),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tabiji demo upstream (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        print("the demo upstream listens on loopback only", file=sys.stderr)
        return 2
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
