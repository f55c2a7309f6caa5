"""A real JWKS endpoint for the JOSE tests: an HTTP(S) server in a thread on 127.0.0.1 that counts
fetches, plus keys, tokens and a throwaway CA made with real crypto."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tls_ca import make_ca  # tests/gateway's test CA (integration tests preload it)


@dataclass
class JwksState:
    """What the server answers; tests change it while it runs."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    status: int = 200
    location: str | None = None  # answer a redirect to here instead
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class JwksServer:
    state: JwksState
    url: str  # the JWKS URI


def _handler(state: JwksState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.fetches += 1
                body = json.dumps(state.document).encode()
                status, location = state.status, state.location
            if location is not None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/jwk-set+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@contextmanager
def serve_jwks(
    state: JwksState | None = None, ssl_context: ssl.SSLContext | None = None
) -> Iterator[JwksServer]:
    """Serve `state` at /jwks.json on 127.0.0.1 (TLS when a context is given); stops on exit."""
    state = state or JwksState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    scheme = "https" if ssl_context is not None else "http"
    try:
        yield JwksServer(state, f"{scheme}://127.0.0.1:{server.server_port}/jwks.json")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- keys and tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A private key with its kid and the alg it signs with."""

    kid: str
    alg: str
    private: Any

    def jwk(self, *, with_alg: bool = True, **extra: Any) -> dict[str, Any]:
        """The public JWK (optionally without `alg`, plus any extra members)."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        public: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        public["kid"] = self.kid
        if with_alg:
            public["alg"] = self.alg
        public.update(extra)
        return public

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, claims: Mapping[str, Any], **header: Any) -> str:
        """A token signed with this key; `kid` header unless header says kid=None."""
        headers = {"kid": self.kid, **header}
        if headers["kid"] is None:
            del headers["kid"]
        return jwt.encode(dict(claims), self.private, algorithm=self.alg, headers=headers)


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def rsa_key(kid: str = "rsa-1", alg: str = "RS256") -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def jwks_of(*keys: SigningKey, with_alg: bool = True) -> dict[str, Any]:
    return {"keys": [key.jwk(with_alg=with_alg) for key in keys]}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """A token with any header and an empty signature (alg none and friends)."""
    head = b64url(json.dumps(dict(header)).encode())
    body = b64url(json.dumps(dict(claims)).encode())
    return f"{head}.{body}."


# --- a throwaway CA for the TLS endpoint -----------------------------------------------------


def make_tls(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for 127.0.0.1, client context trusting only the new CA)."""
    ca = make_ca(directory / "ca", "jwks test CA")
    cert_path, key_path = ca.issue(["127.0.0.1"], directory)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(ca.ca_path))
    return server, client
