"""Header hygiene between client and upstream: hop-by-hop removal, the gateway's own namespace,
X-Forwarded-* / Forwarded (RFC 7239) and X-Request-Id. Pure functions, precomputed name sets.

Must not import gateway.settings, gateway.app, gateway.cli or any HTTP library.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence

from gateway.context import Peer
from gateway.routing import Route

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward (plus the de-facto
# Proxy-Connection and Keep-Alive), and Proxy-Authorization/-Authenticate (RFC 9110 §11.7),
# which are meant for this hop only.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# The headers the gateway itself writes: a client's copies are always dropped, so a client can
# neither pre-empt nor duplicate them. Host is rewritten (RFC 9110 §7.2).
_GATEWAY_WRITTEN = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
    | {b"x-request-id"}
)
# Client-sent proxy headers believed (and passed on) only from a trusted proxy (RFC 7239 §8.1).
_PROXY_ONLY = frozenset({b"x-forwarded-port"})
# Expect is answered by the gateway's own server (RFC 9110 §10.1.1); X-Real-IP is an unverifiable
# duplicate of the client address, which the gateway writes into X-Forwarded-For/Forwarded.
# DPoP (RFC 9449) is a device credential for the gateway only; a device certificate header is
# added per deployment (`extra_dropped`): an upstream never sees either.
_ALWAYS_DROPPED = HOP_BY_HOP | _GATEWAY_WRITTEN | {b"expect", b"x-real-ip", b"dpop"}
_DROP_UNTRUSTED = _ALWAYS_DROPPED | _PROXY_ONLY
_TABIJI_PREFIX = b"x-tabiji-"  # the gateway's own namespace: never accepted from a client
# The gateway's own cookies (session, login binding) are credentials for the gateway only: an
# upstream (or anyone who can read its logs) must never receive them.
_OUR_COOKIE = re.compile(r"^\s*(?:__Host-)?tabiji-[a-z-]*\s*=", re.IGNORECASE)


def strip_gateway_cookies(value: str) -> str:
    """The Cookie header without the gateway's own cookies ("" when nothing else is left)."""
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and not _OUR_COOKIE.match(part)
    )


_RESPONSE_DROPPED = HOP_BY_HOP | {b"x-request-id"}

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    # RFC 9110 §7.6.1: every field named in Connection is hop-by-hop too.
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def _decode(value: bytes) -> str:
    # aiohttp writes header values as UTF-8; ASCII and UTF-8 values round-trip byte for byte.
    # Other obs-text (RFC 9110 §5.5) is opaque and is kept as Latin-1 code points.
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def forwarded_node(ip: str) -> str:
    """An RFC 7239 §6 node for `ip`: IPv6 is bracketed and quoted ("[2001:db8::1]")."""
    return f'"[{ip}]"' if ":" in ip else ip


_FORWARDED_CACHE: dict[tuple[tuple[str, ...], str, str], str] = {}


def _forwarded_value(peer: Peer) -> str:
    key = (peer.forwarded_for, peer.scheme, peer.authority)
    value = _FORWARDED_CACHE.get(key)
    if value is None:
        if len(_FORWARDED_CACHE) >= 4096:
            _FORWARDED_CACHE.clear()  # client addresses vary: keep the cache bounded
        value = _FORWARDED_CACHE[key] = _build_forwarded(peer)
    return value


def _build_forwarded(peer: Peer) -> str:
    # RFC 7239 §4: one element per hop, first (the client's) carrying proto and host.
    host = peer.authority if _TOKEN.fullmatch(peer.authority) else f'"{peer.authority}"'
    first, *rest = peer.forwarded_for
    elements = [f"for={forwarded_node(first)};proto={peer.scheme};host={host}"]
    elements.extend(f"for={forwarded_node(ip)}" for ip in rest)
    return ", ".join(elements)


_DROP_CACHE: dict[tuple[frozenset[bytes], tuple[str, ...]], frozenset[bytes]] = {}


def _with_gateway_names(
    drop: frozenset[bytes], gateway_headers: Sequence[tuple[str, str]]
) -> frozenset[bytes]:
    """`drop` plus the names of the gateway's own headers: made once per set of names (the
    assertion, the convenience headers), not on every request."""
    key = (drop, tuple(name for name, _ in gateway_headers))
    found = _DROP_CACHE.get(key)
    if found is None:
        if len(_DROP_CACHE) >= 64:
            _DROP_CACHE.clear()  # a handful of name sets exist; stay bounded regardless
        found = _DROP_CACHE[key] = drop | {name.lower().encode("latin-1") for name in key[1]}
    return found


_EXTRA_CACHE: dict[tuple[frozenset[bytes], frozenset[bytes]], frozenset[bytes]] = {}


def _with_extra(drop: frozenset[bytes], extra: frozenset[bytes]) -> frozenset[bytes]:
    key = (drop, extra)
    found = _EXTRA_CACHE.get(key)
    if found is None:
        if len(_EXTRA_CACHE) >= 64:
            _EXTRA_CACHE.clear()  # one or two sets per deployment; stay bounded regardless
        found = _EXTRA_CACHE[key] = drop | {name.lower() for name in extra}
    return found


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: Peer,
    route: Route,
    request_id: str,
    gateway_headers: Sequence[tuple[str, str]] = (),
    extra_dropped: frozenset[bytes] = frozenset(),
) -> list[tuple[str, str]]:
    """The headers to send upstream: the client's, cleaned, then the gateway's own (added last).

    Nothing a client sends (Connection tokens included) can remove or alter a header the gateway
    adds: those are appended after filtering, and client copies of them are dropped.
    `extra_dropped` names further headers meant for the gateway only (a configured client
    certificate header), dropped from every client whether trusted or not.
    """
    drop = _ALWAYS_DROPPED if peer.via_trusted_proxy else _DROP_UNTRUSTED
    if extra_dropped:
        drop = _with_extra(drop, extra_dropped)
    if gateway_headers:
        drop = _with_gateway_names(drop, gateway_headers)
    out: list[tuple[str, str]] = []
    append = out.append
    connection: list[bytes] | None = None
    for raw_name, value in client_headers:
        name = raw_name.lower()
        if name in drop or name.startswith(_TABIJI_PREFIX):
            if name == b"connection":
                connection = [value] if connection is None else [*connection, value]
            continue
        if name == b"cookie" and b"tabiji-" in value.lower():
            kept = strip_gateway_cookies(_decode(value))
            if kept:
                append(("cookie", kept))
            continue
        try:
            append((name.decode("latin-1"), value.decode()))
        except UnicodeDecodeError:
            append((name.decode("latin-1"), _decode(value)))
    if connection is not None:
        # Tokens like "keep-alive"/"close" name nothing left to drop; filter only when needed.
        named = _connection_tokens(connection) - drop
        if named:
            out = [(k, v) for k, v in out if k.encode("latin-1") not in named]

    out.append(
        ("host", peer.authority if route.preserve_host else route.upstream.host_header),
    )
    out.append(("x-forwarded-for", ", ".join(peer.forwarded_for)))
    out.append(("x-forwarded-proto", peer.scheme))
    out.append(("x-forwarded-host", peer.authority))
    out.append(("forwarded", _forwarded_value(peer)))
    out.append(("x-request-id", request_id))
    out.extend(gateway_headers)
    return out


def new_request_id(headers: Iterable[tuple[bytes, bytes]], trusted: bool) -> str:
    """The request's id: a trusted proxy's well-formed X-Request-Id, else 32 fresh hex digits."""
    if trusted:
        found: list[bytes] = [value for name, value in headers if name.lower() == b"x-request-id"]
        if len(found) == 1:
            candidate = found[0].decode("latin-1")
            # Only a strict shape is kept: the id lands in logs, audit records and pages.
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
    return secrets.token_hex(16)


def downstream_response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones (RFC 9110 §7.6.1), plus X-Request-Id.

    Names are lower-cased (ASGI); the upstream's own X-Request-Id is replaced by the gateway's.
    """
    out: list[tuple[bytes, bytes]] = []
    connection: list[bytes] | None = None
    for raw_name, value in upstream_headers:
        name = raw_name.lower()
        if name in _RESPONSE_DROPPED:
            if name == b"connection":
                if connection is None:
                    connection = []
                connection.append(value)
            continue
        out.append((name, value))
    if connection is not None:
        # Usually just "keep-alive", already dropped above: filter only for other names.
        named = _connection_tokens(connection) - _RESPONSE_DROPPED
        if named:
            out = [(name, value) for name, value in out if name not in named]
    out.append((b"x-request-id", request_id.encode("ascii")))
    return out
