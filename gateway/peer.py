"""Who is on the other end: client IP, scheme and authority, trusting proxy headers only from
`trusted_proxies` (RFC 7239, X-Forwarded-*). Malformed proxy headers are ignored, never trusted.

Pure; must not import gateway.settings, gateway.app or gateway.cli.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from gateway.context import Peer
from gateway.errors import BadRequestTarget
from gateway.routing import canonical_authority

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CACHE_MAX = 4096
_HTTP_SCHEME = {"ws": "http", "wss": "https"}

# RFC 3986 §3.2.2 reg-name (DNS-style) or IP-literal, with an optional port (RFC 9110 §7.2).
_AUTHORITY = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)
# RFC 7239 §4: forwarded-pair = token "=" value, value = token / quoted-string.
_FORWARDED_PAIR = re.compile(
    r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)=(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)|\"((?:[^\"\\]|\\.)*)\")\s*"
)


class TrustedProxies:
    """The networks whose X-Forwarded-* / Forwarded headers the gateway believes."""

    __slots__ = ("_cache", "_networks")

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def contains(self, ip: str) -> bool:
        """True when `ip` (a textual address) lies in a trusted network; garbage is untrusted."""
        if not self._networks:
            return False
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        address = parse_ip(ip)
        found = address is not None and self._contains_address(address)
        if len(self._cache) >= _CACHE_MAX:
            # Header-supplied addresses could grow the cache without bound: start afresh.
            self._cache.clear()
        self._cache[ip] = found
        return found

    def _contains_address(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


def parse_ip(text: str) -> IPAddress | None:
    """An IP address from its textual form, or None for anything else (host names included)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_NODE_CACHE: dict[str, str | None] = {}


def _node_address(node: str) -> str | None:
    """The canonical IP of an X-Forwarded-For entry or RFC 7239 §6 node ("1.2.3.4:80", "[::1]")."""
    try:
        return _NODE_CACHE[node]
    except KeyError:
        pass
    if len(_NODE_CACHE) >= _CACHE_MAX:
        _NODE_CACHE.clear()  # entries come from headers: keep the cache bounded
    found = _NODE_CACHE[node] = _parse_node(node)
    return found


def _parse_node(node: str) -> str | None:
    node = node.strip()
    if node.startswith("["):
        end = node.find("]")
        if end < 0 or (end + 1 < len(node) and not _is_port(node[end + 1 :])):
            return None
        node = node[1:end]
    elif node.count(":") == 1:
        node, _, port = node.partition(":")
        if not _is_port(":" + port):
            return None
    address = parse_ip(node)
    if address is None or (isinstance(address, ipaddress.IPv6Address) and address.scope_id):
        return None
    return str(address)


def _is_port(text: str) -> bool:
    return len(text) > 1 and text[0] == ":" and text[1:].isdigit() and len(text) <= 6


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str] | None:
    """All values of one header, comma-split (RFC 9110 §5.3), or None when absent or not ASCII."""
    values: list[str] | None = None
    for key, value in headers:
        if key.lower() == name:
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return []
            if values is None:
                values = []
            values.extend(part.strip() for part in text.split(","))
    return values


def _client_from_chain(chain: list[str], trusted: TrustedProxies) -> list[str] | None:
    """The chain from the client onwards (right-to-left walk skipping trusted hops), or None."""
    parsed: list[str] = []
    for entry in reversed(chain):
        address = _node_address(entry)
        if address is None:
            # A trusted hop wrote garbage: believe none of it (fall back to the socket).
            return None
        parsed.append(address)
        if not trusted.contains(address):
            break
    parsed.reverse()
    return parsed


def _parse_forwarded(values: list[str]) -> list[dict[str, str]] | None:
    """RFC 7239 §4 elements as dicts of lower-case parameter names, or None when malformed."""
    elements: list[dict[str, str]] = []
    # Commas inside quoted strings are rare and only matter for malformed input; the split at
    # commas made by _header_values is re-joined where a quote is left open.
    merged: list[str] = []
    for part in values:
        if merged and merged[-1].count('"') % 2 == 1:
            merged[-1] += "," + part
        else:
            merged.append(part)
    for element in merged:
        params: dict[str, str] = {}
        for pair in element.split(";") if element else []:
            match = _FORWARDED_PAIR.fullmatch(pair)
            if match is None:
                return None
            name = match.group(1).lower()
            if name in params:
                return None  # RFC 7239 §4: a parameter MUST NOT occur more than once per element
            token, quoted = match.group(2), match.group(3)
            params[name] = token if token is not None else re.sub(r"\\(.)", r"\1", quoted)
        elements.append(params)
    return elements


def _single(values: list[str] | None) -> str | None:
    """The one value all entries agree on, or None when absent, empty or contradictory."""
    if not values:
        return None
    first = values[0]
    if not first or any(value != first for value in values):
        return None
    return first


_AUTHORITY_CACHE: dict[tuple[str, str], str] = {}


def _canonical(host: str, scheme: str) -> str:
    key = (host, scheme)
    found = _AUTHORITY_CACHE.get(key)
    if found is None:
        if len(_AUTHORITY_CACHE) >= _CACHE_MAX:
            _AUTHORITY_CACHE.clear()  # Host is client-chosen: keep the cache bounded
        found = _AUTHORITY_CACHE[key] = canonical_authority(host, scheme)
    return found


_VALID_HOSTS: dict[bytes, str] = {}


def _host(headers: Iterable[tuple[bytes, bytes]]) -> str:
    found: bytes | None = None
    for key, value in headers:
        if key.lower() == b"host":
            if found is not None:
                # RFC 9112 §3.2: more than one Host field line → 400.
                raise BadRequestTarget("more than one Host header", code="host-multiple")
            found = value
    if not found:
        # RFC 9112 §3.2: an HTTP/1.1 request without Host → 400.
        raise BadRequestTarget("Host header missing", code="host-missing")
    host = _VALID_HOSTS.get(found)
    if host is not None:
        return host
    host = found.decode("ascii", "replace").strip().lower()
    if _AUTHORITY.fullmatch(host) is None:
        # RFC 9112 §3.2: an invalid Host field value → 400.
        raise BadRequestTarget("invalid Host header", code="host-invalid")
    if len(_VALID_HOSTS) >= _CACHE_MAX:
        _VALID_HOSTS.clear()  # Host is client-chosen: keep the cache bounded
    _VALID_HOSTS[found] = host
    return host


def resolve_peer(
    scope_client_ip: str,
    scope_scheme: str,
    headers: Sequence[tuple[bytes, bytes]],
    trusted: TrustedProxies,
) -> Peer:
    """The client as far as the network tells; proxy headers are believed only from `trusted`.

    `forwarded_for` is the chain the upstream's X-Forwarded-For must list, client first, socket
    peer last; entries left of the first untrusted address are unverifiable and are dropped.
    """
    host = _host(headers)
    # A WebSocket scope says ws/wss; upstreams and X-Forwarded-Proto speak http/https.
    scope_scheme = _HTTP_SCHEME.get(scope_scheme, scope_scheme)
    # uvicorn hands over the socket address already in canonical text form.
    socket_ip = scope_client_ip
    if not trusted.contains(socket_ip):
        # RFC 7239 §8.1: headers from an untrusted peer are spoofable; believe only the socket.
        return Peer(
            client_ip=socket_ip,
            scheme=scope_scheme,
            authority=_canonical(host, scope_scheme),
            via_trusted_proxy=False,
            forwarded_for=(socket_ip,),
        )

    chain: list[str] | None = None
    proto: str | None = None
    fwd_host: str | None = None
    xff = _header_values(headers, b"x-forwarded-for")
    if xff:
        chain = _client_from_chain(xff, trusted)
    else:
        forwarded = _header_values(headers, b"forwarded")
        elements = _parse_forwarded(forwarded) if forwarded else None
        if elements:
            fors = [element.get("for", "") for element in elements]
            chain = _client_from_chain(fors, trusted)
            if chain is not None:
                client_element = elements[len(elements) - len(chain)]
                proto = client_element.get("proto")
                fwd_host = client_element.get("host")

    proto = _single(_header_values(headers, b"x-forwarded-proto")) or proto
    scheme = proto.lower() if proto and proto.lower() in ("http", "https") else scope_scheme
    fwd_host = _single(_header_values(headers, b"x-forwarded-host")) or fwd_host
    if fwd_host is not None:
        fwd_host = fwd_host.lower()
        if _AUTHORITY.fullmatch(fwd_host) is None:
            fwd_host = None  # malformed: ignored, the Host header stands
    authority = _canonical(fwd_host or host, scheme)

    if not chain:
        chain = []
    return Peer(
        client_ip=chain[0] if chain else socket_ip,
        scheme=scheme,
        authority=authority,
        via_trusted_proxy=True,
        forwarded_for=(*chain, socket_ip),
    )
