"""CSRF protection for the gateway's own state-changing forms: a per-session HMAC token plus
same-origin checks of Origin / Referer / Sec-Fetch-Site. Standard library only; no settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.routing import canonical_authority

MIN_SECRET_BYTES = 32


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    found: str | None = None
    for key, value in headers:
        if key == name:
            if found is not None:
                return "\x00"  # a repeated header is ambiguous: never equal to an origin
            found = value.decode("latin-1")
    return found


def origin_of(url: str) -> str | None:
    """scheme://host[:port] of an absolute http(s) URL (default port dropped), else None."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return f"{scheme}://{canonical_authority(parts.netloc, scheme)}"


class Csrf:
    """Tokens = base64url(HMAC-SHA256(secret, purpose, session hash)); checked in constant time.

    The token is bound to the session (a token from another session is useless) and to the form's
    purpose (a logout token cannot confirm another action). The secret comes from the operator.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the CSRF secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def token(self, session_hash: str, purpose: str) -> str:
        """The token a form for `purpose` carries in the session `session_hash`."""
        # A NUL separates the fields so ("ab", "c") and ("a", "bc") cannot collide.
        message = b"tabiji-csrf\x00" + purpose.encode() + b"\x00" + session_hash.encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def token_ok(self, token: str | None, session_hash: str, purpose: str) -> bool:
        """True only for the exact token of this session and purpose (constant-time compare)."""
        if not token or len(token) > 128:
            return False
        expected = self.token(session_hash, purpose)
        return hmac.compare_digest(token.encode(), expected.encode())

    @staticmethod
    def same_origin(headers: Iterable[tuple[bytes, bytes]], request_origin: str) -> bool:
        """The request comes from a page of `request_origin` itself.

        Sec-Fetch-Site "cross-site" is refused when present (Fetch Metadata); then Origin must
        equal the request's origin, or, when a browser sent no Origin, the Referer's origin must
        (OWASP CSRF cheat sheet, "verifying origin with standard headers"). Neither → refused:
        our pages use `Referrer-Policy: same-origin` on forms, so browsers send both.
        """
        headers = list(headers)
        fetch_site = _header(headers, b"sec-fetch-site")
        if fetch_site is not None and fetch_site.strip().lower() not in (
            "same-origin",
            "none",  # typed into the address bar / a bookmark: a person, not another site
        ):
            return False
        origin = _header(headers, b"origin")
        if origin is not None:
            # "null" (opaque origins, sandboxed frames, privacy redirects) never matches.
            return origin_of(origin) == request_origin
        referer = _header(headers, b"referer")
        if referer is None:
            return False
        return origin_of(referer) == request_origin

    def check(
        self,
        *,
        token: str | None,
        session_hash: str,
        purpose: str,
        headers: Iterable[tuple[bytes, bytes]],
        request_origin: str,
    ) -> bool:
        """Both defences: the same-origin headers and the session's token for `purpose`."""
        return self.same_origin(headers, request_origin) and self.token_ok(
            token, session_hash, purpose
        )
