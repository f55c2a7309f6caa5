"""The demo upstream, 「庁内グループウェア」: a tiny internal web app to put behind the gateway.

It shows what the gateway told it (forwarded headers, request id, and who the user is: the
X-Tabiji-Assertion verified against the gateway's /.tabiji/jwks.json) and echoes WebSocket
messages. Listens on loopback only. Run: python -m gateway.demo.upstream --port 9001
Verifies with `cryptography` directly (pyjwt lives in gateway/jose.py only).
"""

from __future__ import annotations

import argparse
import base64
import html
import ipaddress
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import uvicorn
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
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


ASSERTION_HEADER = "x-tabiji-assertion"
JWKS_REFETCH_SECONDS = 10.0  # an unknown kid fetches the JWKS again, at most this often


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _public_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey | None:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        return None
    x = int.from_bytes(_b64url(str(jwk["x"])), "big")
    y = int.from_bytes(_b64url(str(jwk["y"])), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


@dataclass
class AssertionVerifier:
    """Checks X-Tabiji-Assertion as any upstream app should: ES256 only, a key from the gateway's
    JWKS, iss = the gateway, aud = this app's origin, not expired (RFC 7519 §7.2)."""

    gateway: str  # the gateway's public_url: the JWKS lives there and it is the `iss`
    audiences: tuple[str, ...]  # this app's origins as the gateway's routes name them
    keys: dict[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    fetched_at: float = float("-inf")

    async def _refresh(self) -> None:
        now = time.monotonic()
        if now - self.fetched_at < JWKS_REFETCH_SECONDS:
            return
        self.fetched_at = now
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(self.gateway + "/.tabiji/jwks.json")
            response.raise_for_status()
            found: dict[str, ec.EllipticCurvePublicKey] = {}
            for jwk in response.json().get("keys", []):
                key = _public_key(jwk)
                if key is not None and isinstance(jwk.get("kid"), str):
                    found[jwk["kid"]] = key
            self.keys = found

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims; ValueError saying what is wrong otherwise."""
        try:
            head_b64, body_b64, signature_b64 = token.split(".")
            header = json.loads(_b64url(head_b64))
            claims = json.loads(_b64url(body_b64))
            signature = _b64url(signature_b64)
        except ValueError:
            raise ValueError("not a compact JWS") from None
        if header.get("alg") != "ES256" or len(signature) != 64:
            raise ValueError("only ES256 is accepted")  # never the token's own choice of alg
        kid = header.get("kid")
        if kid not in self.keys:
            try:
                await self._refresh()
            except (httpx.HTTPError, ValueError) as error:
                raise ValueError(f"the gateway's JWKS is unavailable: {error}") from None
        key = self.keys.get(kid)
        if key is None:
            raise ValueError("signed with a key the gateway does not publish")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, f"{head_b64}.{body_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ValueError("bad signature") from None
        if not isinstance(claims, dict) or claims.get("iss") != self.gateway:
            raise ValueError("issued by someone other than the gateway")
        if claims.get("aud") not in self.audiences:
            raise ValueError("meant for another application (aud)")
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            raise ValueError("expired")
        return claims


def _plain(value: str) -> str:
    """Undo the gateway's RFC 8187 encoding of convenience headers (UTF-8''%E5%B1%B1…)."""
    return unquote(value[len("UTF-8''") :]) if value.startswith("UTF-8''") else value


async def _identity_section(request: Request) -> str:
    token = request.headers.get(ASSERTION_HEADER)
    if not token:
        return (
            "<h2>利用者 / User</h2><p>本人情報は届いていません（公開ルート、またはログイン前）。"
            "<br>No identity was sent (a public route).</p>"
        )
    verifier: AssertionVerifier | None = request.app.state.verifier
    if verifier is None:
        return "<h2>利用者 / User</h2><p>検証の設定がありません / not configured to verify</p>"
    try:
        claims = await verifier.verify(token)
    except ValueError as error:
        return (
            "<h2>利用者 / User</h2><p><strong>X-Tabiji-Assertion を信用しません / rejected: "
            f"{html.escape(str(error))}</strong></p>"
        )
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th>"
        f"<td>{html.escape(str(claims.get(name) or '—'))}</td></tr>"
        for label, name in (
            ("氏名 / name", "name"),
            ("メール / email", "email"),
            ("利用者 ID / sub", "sub"),
            ("ID プロバイダ / idp", "idp"),
        )
    )
    groups = ", ".join(str(group) for group in claims.get("groups") or []) or "—"
    amr = ", ".join(str(method) for method in claims.get("amr") or []) or "—"
    return (
        f"<h2>ようこそ、{html.escape(str(claims.get('name') or claims.get('sub')))} さん</h2>"
        "<p>X-Tabiji-Assertion の署名をゲートウェイの /.tabiji/jwks.json で検証しました "
        "(ES256, iss, aud, exp)。<br>The identity assertion was verified against the gateway's "
        "published keys.</p>"
        f"<table>{rows}<tr><th>グループ / groups</th><td>{html.escape(groups)}</td></tr>"
        f"<tr><th>認証方式 / amr</th><td>{html.escape(amr)}</td></tr></table>"
    )


async def home(request: Request) -> Response:
    """The groupware's front page: who the gateway says is asking, in Japanese."""
    names = [*SHOWN_HEADERS]
    names += sorted(
        {key for key in request.headers if key.startswith("x-tabiji-")} - {ASSERTION_HEADER}
    )
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        f"<td><code>{html.escape(_plain(request.headers.get(name, '—')))}</code></td></tr>"
        for name in names
    )
    body = (
        "<!doctype html><html lang=ja><meta charset=utf-8><title>庁内グループウェア</title>"
        "<h1>庁内グループウェア（デモ）</h1>"
        "<p>この画面は Tabiji ゲートウェイを通して表示されています。</p>"
        f"{await _identity_section(request)}"
        f"<h2>届いたヘッダ / Headers received</h2><table>{rows}</table></html>"
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


def build_app(verifier: AssertionVerifier | None = None) -> Starlette:
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/headers", echo_headers, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            WebSocketRoute("/ws", websocket_echo),
        ]
    )
    app.state.verifier = verifier
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tabiji demo upstream (loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--gateway", help="the gateway's public_url (to verify X-Tabiji-Assertion)")
    parser.add_argument(
        "--audience", action="append", default=[], help="this app's origin at the gateway"
    )
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    args = parser.parse_args(argv)
    host = args.host
    if args.fd is not None:
        with socket.socket(fileno=os.dup(args.fd)) as inherited:
            host = inherited.getsockname()[0]
    if not ipaddress.ip_address(host).is_loopback:
        print("the demo upstream listens on loopback only", file=sys.stderr)
        return 2
    verifier = None
    if args.gateway:
        gateway = args.gateway.rstrip("/")
        verifier = AssertionVerifier(gateway, tuple(args.audience or [gateway]))
    if args.fd is not None:
        uvicorn.run(build_app(verifier), fd=args.fd, log_level="warning")
    else:
        uvicorn.run(build_app(verifier), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
