"""The agent's loopback attestation server: the browser's silent device check (PROTOCOL.md).

GET http://127.0.0.1:<port>/tabiji/attest?challenge=…&return=<gateway>/.tabiji/device/attested
→ 302 back to the *enrolled* gateway with the signed attestation. Anything else → a small 400 page,
never a redirect (no open redirect), no CORS headers (no page may read an answer), and only requests
whose Host is exactly 127.0.0.1:<port> (a DNS-rebinding page names its own host). Standard library
http.server in a thread. Must not import the gateway.
"""

from __future__ import annotations

import html
import logging
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final
from urllib.parse import parse_qs, urlencode, urlsplit

from device_agent.client import ATTESTED_PATH, GatewayError, gateway_origin
from device_agent.messages import say

HOST: Final = "127.0.0.1"
DEFAULT_PORTS: Final = tuple(range(47801, 47806))
ATTEST_PATH: Final = "/tabiji/attest"
CHALLENGE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{16,256}")
MAX_TARGET: Final = 4096  # the request target; a challenge and a return URL are ~200 bytes
_UNSAFE_URL_CHARACTERS: Final = re.compile(r"[\x00-\x20\x7f\\]")

log = logging.getLogger("tabiji_agent.loopback")

# challenge -> the attestation JWS (report.sign_attestation with the device key, for this origin)
Attester = Callable[[str], str]


class LoopbackUnavailable(Exception):
    """No port of the configured range could be bound (another program holds them all)."""

    code = "loopback-ports-busy"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str  # stable kebab-case; also the message catalogue key "loopback-<code>"


def check_attest_request(target: str, origin: str) -> tuple[str, str] | Refusal:
    """The challenge and the redirect target for a well-formed request, or why it is refused.

    The redirect target is rebuilt from the enrolled origin, never copied from the request, so
    nothing a web page chose reaches the Location header except the validated challenge.
    """
    if len(target) > MAX_TARGET:
        return Refusal(414, "request-too-long")
    parts = urlsplit(target)
    if parts.path != ATTEST_PATH:
        return Refusal(404, "not-found")
    query = _single_values(parts.query)
    if query is None or set(query) != {"challenge", "return"}:
        return Refusal(400, "bad-query")
    if not CHALLENGE_PATTERN.fullmatch(query["challenge"]):
        return Refusal(400, "bad-challenge")
    if not is_attested_url(query["return"], origin):
        return Refusal(400, "wrong-gateway")
    return query["challenge"], f"{origin}{ATTESTED_PATH}"


def _single_values(query: str) -> dict[str, str] | None:
    """The query's parameters when each appears once; None when malformed or repeated."""
    try:
        parsed = parse_qs(query, strict_parsing=True, max_num_fields=4)
    except ValueError:
        return None
    if any(len(values) != 1 for values in parsed.values()):
        return None
    return {name: values[0] for name, values in parsed.items()}


def is_attested_url(value: str, origin: str) -> bool:
    """True only for <enrolled origin>/.tabiji/device/attested: same scheme, host and port,
    no user info, no query, no fragment, no path tricks."""
    if _UNSAFE_URL_CHARACTERS.search(value):
        return False
    parts = urlsplit(value)
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in value or "#" in value:
        return False
    if parts.path != ATTESTED_PATH:
        return False
    try:
        return gateway_origin(f"{parts.scheme}://{parts.netloc}") == origin
    except GatewayError:
        return False


def page_language(accept_language: str | None) -> str:
    """English when the browser prefers it, Japanese otherwise (the catalogue's default)."""
    first = (accept_language or "").split(",")[0].strip().lower()
    return "en" if first.startswith("en") else "ja"


def refusal_page(refusal: Refusal, language: str) -> bytes:
    title = html.escape(say("loopback-title", language))
    text = html.escape(say(f"loopback-{refusal.code}", language))
    hint = html.escape(say("loopback-hint", language))
    return (
        f'<!doctype html><html lang="{language}"><meta charset="utf-8">'
        f"<title>{title}</title><h1>{title}</h1><p>{text}</p><p>{hint}</p>"
        f"<p><small>{html.escape(refusal.code)}</small></p></html>"
    ).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # On Windows SO_REUSEADDR lets a second program bind a port already in use (port hijacking);
    # elsewhere it only skips TIME_WAIT after a restart.
    allow_reuse_address = sys.platform != "win32"

    def __init__(self, port: int, origin: str, device_id: str, attest: Attester) -> None:
        self.origin = origin
        self.device_id = device_id
        self.attest = attest
        self.expected_host = f"{HOST}:{port}"
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall on a laptop
        # with broken DNS; the loopback address needs no name.
        if sys.platform == "win32":
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tabiji-agent"
    sys_version = ""
    timeout = 10  # a connection that sends nothing does not hold a thread for long

    def do_GET(self) -> None:
        hosts = self.headers.get_all("Host") or []
        if hosts != [self.server.expected_host]:
            # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
            self._refuse(Refusal(400, "wrong-host"))
            return
        checked = check_attest_request(self.path, self.server.origin)
        if isinstance(checked, Refusal):
            self._refuse(checked)
            return
        challenge, attested_url = checked
        try:
            attestation = self.server.attest(challenge)
        except Exception:  # fail closed: any key or TPM trouble is a refusal page, never a redirect
            log.exception("attestation could not be signed")
            self._refuse(Refusal(500, "sign-failed"))
            return
        location = f"{attested_url}?" + urlencode(
            {"challenge": challenge, "device": self.server.device_id, "attestation": attestation}
        )
        self.send_response(302)
        self.send_header("Location", location)
        self._common_headers()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _method_not_allowed(self) -> None:
        self._refuse(Refusal(405, "method-not-allowed"), extra=(("Allow", "GET"),))

    def do_POST(self) -> None:
        self._method_not_allowed()

    def do_PUT(self) -> None:
        self._method_not_allowed()

    def do_DELETE(self) -> None:
        self._method_not_allowed()

    def do_PATCH(self) -> None:
        self._method_not_allowed()

    def do_OPTIONS(self) -> None:
        # A CORS preflight gets no Access-Control-* header: no page may script this server.
        self._method_not_allowed()

    def do_HEAD(self) -> None:
        self._refuse(Refusal(405, "method-not-allowed"), extra=(("Allow", "GET"),), body=False)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, unknown method, headers too long) get our
        # page too, without echoing the request back.
        if code == 501:  # a method http.server does not know: the same answer as POST
            self._method_not_allowed()
        else:
            self._refuse(Refusal(code, "bad-request"))

    def _refuse(
        self, refusal: Refusal, extra: Sequence[tuple[str, str]] = (), body: bool = True
    ) -> None:
        headers = getattr(self, "headers", None)
        language = page_language(headers.get("Accept-Language") if headers else None)
        page = refusal_page(refusal, language)
        self.send_response(refusal.status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", "default-src 'none'")
        self.send_header("X-Frame-Options", "DENY")
        self._common_headers()
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and getattr(self, "command", "") != "HEAD":
            self.wfile.write(page)
        self.close_connection = True

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")

    def log_message(self, format: str, *args: object) -> None:
        # Never the query string: it carries the challenge.
        log.info("loopback %s %s", getattr(self, "command", "-"), urlsplit(self.path or "").path)


class LoopbackServer:
    """The attestation server on 127.0.0.1, first free port of `ports`, in a daemon thread."""

    def __init__(
        self,
        *,
        origin: str,
        device_id: str,
        attest: Attester,
        ports: Sequence[int] = DEFAULT_PORTS,
        poll_interval: float = 1.0,
    ) -> None:
        self.origin = gateway_origin(origin)
        # How often the idle server thread wakes to check for stop(): rarely, for the battery.
        self.poll_interval = poll_interval
        self.device_id = device_id
        self.attest = attest
        self.ports = tuple(ports)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_address[1]

    def start(self) -> int:
        """Bind the first free port of the range and serve; LoopbackUnavailable if none is free."""
        for port in self.ports:
            try:
                server = _Server(port, self.origin, self.device_id, self.attest)
            except OSError:
                continue
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                args=(self.poll_interval,),
                name=f"tabiji-loopback-{port}",
                daemon=True,
            )
            self._thread.start()
            return port
        raise LoopbackUnavailable(", ".join(str(p) for p in self.ports))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LoopbackServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
