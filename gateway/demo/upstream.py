"""The demo upstream, 「庁内グループウェア」: a tiny internal web app to put behind the gateway.

It shows what the gateway told it (forwarded headers, request id, and who the user is: the
X-Tabiji-Assertion verified against the gateway's /.tabiji/jwks.json), echoes WebSocket messages,
and at /jumin/ shows 「住民記録」 only to a request whose verified assertion names the device
the gateway proved (device claims). Listens on loopback only.
Run: python -m gateway.demo.upstream --port 9001
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
from datetime import UTC, datetime
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


async def _verified_claims(request: Request) -> dict[str, Any] | str:
    """The verified assertion's claims, or the HTML that says why there are none."""
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
        return await verifier.verify(token)
    except ValueError as error:
        return (
            "<h2>利用者 / User</h2><p><strong>X-Tabiji-Assertion を信用しません / rejected: "
            f"{html.escape(str(error))}</strong></p>"
        )


async def _identity_section(request: Request) -> str:
    claims = await _verified_claims(request)
    if isinstance(claims, str):
        return claims
    return _identity_html(claims)


def _identity_html(claims: dict[str, Any]) -> str:
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
        '<p><a href="/jumin/">住民記録（登録・承認済みの端末から）</a> / '
        "resident records (from an approved device)</p>"
        f"<h2>届いたヘッダ / Headers received</h2><table>{rows}</table></html>"
    )
    return HTMLResponse(body)


# Where the device key lives, as the gateway vouches for it (assertion claim device_trust).
TRUST_WORDS = {
    "tpm": "TPM（セキュリティチップ、証明を確認済み）/ TPM, attestation verified",
    "tpm-claimed": "TPM（証明は未確認）/ TPM, not verified",
    "software": "ファイル（本人だけが読める鍵ファイル）/ a key file only its user can read",
}
# Fictional residents: the demo's stand-in for a system that must never open on a lost laptop.
DEMO_RESIDENTS = (
    ("R-000123", "旅路 一郎", "1980-04-01", "旅路町 1-2-3"),
    ("R-000124", "旅路 花", "1982-11-23", "旅路町 1-2-3"),
    ("R-000311", "港 太郎", "1955-07-07", "旅路町 港 4-5"),
)


def _posture_time(value: object, now: float) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return "—"
    when = datetime.fromtimestamp(value, UTC).astimezone().isoformat(timespec="seconds")
    minutes = max(0, int(now - value) // 60)
    return f"{when}（{minutes} 分前 / {minutes} min ago）"


def _device_html(claims: dict[str, Any], now: float) -> str:
    trust = str(claims.get("device_trust"))
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in (
            ("端末 ID / device_id", str(claims["device_id"])),
            ("鍵の保管 / device_trust", TRUST_WORDS.get(trust, trust)),
            ("状態の報告 / device_posture_at", _posture_time(claims.get("device_posture_at"), now)),
        )
    )
    return (
        "<h2>この端末 / This device</h2>"
        "<p>ゲートウェイが確認した端末です（署名付きの X-Tabiji-Assertion の device クレーム）。"
        "ゲートウェイのポリシー jumin-kiroku が、承認済みの本人の端末で、ディスクが暗号化され、"
        "状態の報告が 15 分以内であることを確かめてから通しています。<br>"
        "The device the gateway proved, from the signed assertion's device claims. The gateway's "
        "policy let the request through only from the user's own approved device with an "
        "encrypted disk and a posture report from the last 15 minutes.</p>"
        f"<table>{rows}</table>"
    )


async def jumin(request: Request) -> Response:
    """「住民記録」: shown only when the verified assertion names a device the gateway proved —
    the app checks for itself too, so a route without device trust (the public localhost one)
    never shows the records."""
    claims = await _verified_claims(request)
    head = (
        "<!doctype html><html lang=ja><meta charset=utf-8>"
        "<title>住民記録 — 庁内グループウェア</title>"
        "<h1>住民記録（デモ）</h1>"
    )
    if isinstance(claims, str):
        return HTMLResponse(head + claims + "</html>", status_code=403)
    if not isinstance(claims.get("device_id"), str):
        refusal = (
            "<p><strong>端末の確認がない要求には住民記録を表示しません。</strong><br>"
            "No device was proved for this request: the records stay closed.</p>"
        )
        return HTMLResponse(head + _identity_html(claims) + refusal + "</html>", status_code=403)
    records = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in resident) + "</tr>"
        for resident in DEMO_RESIDENTS
    )
    body = (
        head
        + _identity_html(claims)
        + _device_html(claims, time.time())
        + "<h2>住民記録（架空のデータ）/ Resident records (fictional)</h2>"
        "<table><tr><th>番号</th><th>氏名</th><th>生年月日</th><th>住所</th></tr>"
        f"{records}</table></html>"
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
            Route("/jumin", jumin),
            Route("/jumin/", jumin),
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
    parser.add_argument(
        "--demo-allow-non-loopback",
        action="store_true",
        help="DEMO ONLY (containers): listen on a non-loopback address",
    )
    args = parser.parse_args(argv)
    host = args.host
    if args.fd is not None:
        with socket.socket(fileno=os.dup(args.fd)) as inherited:
            host = inherited.getsockname()[0]
    if not (args.demo_allow_non_loopback or ipaddress.ip_address(host).is_loopback):
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
