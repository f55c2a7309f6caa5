"""Who sent this request: a bearer token (Authorization: Bearer) or the session cookie.

Also the cookie names and a strict Cookie-header reader shared with the login endpoints.
Must not import gateway.settings, authlib or pyjwt (tokens.py and the JOSE module do that).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Protocol

from gateway.errors import GatewayError
from gateway.identity.model import Identity
from gateway.jose import TokenInvalid

log = logging.getLogger("tabiji.identity")

Headers = Iterable[tuple[bytes, bytes]]

# Over HTTPS the `__Host-` prefix makes the browser refuse the cookie unless it is Secure,
# Path=/ and has no Domain (RFC 6265bis §4.1.3.2): no sibling subdomain or plain-HTTP page can
# plant one ("cookie tossing"). The plain names exist only for the loopback HTTP demo. Never
# `_session`: the test IdP uses that name on the same host, and cookies ignore ports.
SESSION_COOKIE_HTTPS = "__Host-tabiji-session"
SESSION_COOKIE_HTTP = "tabiji-session"
LOGIN_COOKIE_HTTPS = "__Host-tabiji-login"
LOGIN_COOKIE_HTTP = "tabiji-login"

# What our cookie values look like (secrets.token_urlsafe): anything else is not ours.
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
# RFC 6750 §2.1 b64token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
MAX_TOKEN_LENGTH = 16 * 1024


def session_cookie_name(https: bool) -> str:
    """The session cookie's name for a request that arrived over HTTPS or plain HTTP."""
    return SESSION_COOKIE_HTTPS if https else SESSION_COOKIE_HTTP


def login_cookie_name(https: bool) -> str:
    """The pre-login binding cookie's name (login CSRF, hand-off binding)."""
    return LOGIN_COOKIE_HTTPS if https else LOGIN_COOKIE_HTTP


def cookie_values(headers: Headers, name: str) -> list[str]:
    """Every value of cookie `name` across all Cookie headers (HTTP/2 sends several)."""
    found: list[str] = []
    prefix = name + "="
    for key, raw in headers:
        if key != b"cookie":
            continue
        for part in raw.decode("latin-1").split(";"):
            pair = part.strip()
            if pair.startswith(prefix):
                found.append(pair[len(prefix) :])
    return found


def single_cookie(headers: Headers, name: str) -> str | None:
    """The one well-formed value of cookie `name`, or None.

    Several cookies of the same name mean someone planted one beside ours ("cookie tossing",
    possible only on plain HTTP, where cookies are shared across ports): we cannot tell which
    is ours, so we use none, and the person signs in again. A malformed value is not ours.
    """
    values = cookie_values(headers, name)
    if len(values) != 1:
        if len(values) > 1:
            log.warning("several %s cookies in one request: none used", name)
        return None
    value = values[0]
    return value if _COOKIE_VALUE.match(value) else None


class IdentityRejected(GatewayError):
    """A credential was presented and is invalid: refused (401), never downgraded to anonymous.

    `code` is the bearer verifier's TokenInvalid code (token-expired, token-wrong-audience…).
    """

    code = "identity-rejected"
    status = 401

    @property
    def www_authenticate(self) -> str:
        """The challenge for the 401 (RFC 6750 §3): the error, never the token's details."""
        return 'Bearer error="invalid_token"'


class BearerVerifierLike(Protocol):
    """What the resolver needs from gateway.identity.tokens.BearerVerifier."""

    def cached(self, token: str, now: float) -> Identity | None: ...

    async def verify(self, token: str, now: float) -> Identity: ...


class SessionLookup(Protocol):
    """What the resolver needs from gateway.identity.sessions.SessionManager."""

    async def lookup(self, cookie_id: str, host: str, now: float) -> Identity | None: ...


class IdentityResolver:
    """Finds the identity a request proves, or None when it presents no credential of ours.

    Order and rules:
    - `Authorization: Bearer …` (scheme case-insensitive, RFC 9110 §11.1) is verified; an
      invalid token raises IdentityRejected, even when a valid session cookie is also present
      (an explicit credential that fails is a refusal, not a reason to try another one).
    - Several Authorization headers are refused (which one would the upstream read?).
    - Other schemes (Basic, Negotiate, Digest…) are not ours: ignored here, left for an upstream
      that does its own authentication; the request still needs a session like any other.
    - Otherwise the session cookie of this scheme (`__Host-tabiji-session` over HTTPS), only
      that name, exactly one of it, looked up for this host.
    With a warm cache neither path suspends.
    """

    def __init__(self, sessions: SessionLookup, bearer: BearerVerifierLike | None) -> None:
        self._sessions = sessions
        self._bearer = bearer

    async def resolve(
        self, headers: list[tuple[bytes, bytes]], authority: str, https: bool, now: float
    ) -> Identity | None:
        """The identity of this request at `authority` (canonical host[:port]), or None."""
        authorization: bytes | None = None
        has_cookie = False
        for key, value in headers:
            if key == b"authorization":
                if authorization is not None:
                    raise IdentityRejected("several Authorization headers", code="token-malformed")
                authorization = value
            elif key == b"cookie":
                has_cookie = True
        if authorization is not None:
            token = _bearer_token(authorization)
            if token is not None:
                return await self._verify_bearer(token, now)
        if not has_cookie:
            return None
        cookie = single_cookie(headers, session_cookie_name(https))
        if cookie is None:
            return None
        return await self._sessions.lookup(cookie, authority, now)

    async def _verify_bearer(self, token: str, now: float) -> Identity:
        if self._bearer is None:
            # No bearer issuers configured: a bearer token cannot be ours to accept.
            raise IdentityRejected("bearer tokens are not accepted", code="token-wrong-issuer")
        if not token or len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.match(token):
            raise IdentityRejected("not a bearer token", code="token-malformed")
        identity = self._bearer.cached(token, now)
        if identity is not None:
            return identity
        try:
            return await self._bearer.verify(token, now)
        except TokenInvalid as exc:
            raise IdentityRejected(exc.detail or exc.code, code=exc.code) from exc


def _bearer_token(value: bytes) -> str | None:
    """The token of a Bearer credential; None for another scheme; "" for a malformed Bearer."""
    text = value.decode("latin-1").strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return rest.strip()
