"""RequestContext: the frozen facts one request has gathered, handed from stage to stage.

Imports only value types (routing, target, identity.model); never gateway.settings or a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.identity.model import Identity
from gateway.routing import Route
from gateway.target import Target


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end, as the network tells it (RFC 7239 when a trusted proxy speaks)."""

    client_ip: str  # the original client, from trusted proxy headers or the socket
    scheme: str  # "http" / "https" as the client reached the gateway
    authority: str  # canonical host[:port] the client asked for
    via_trusted_proxy: bool  # the socket peer is in `trusted_proxies`
    forwarded_for: tuple[str, ...]  # the X-Forwarded-For chain to extend (trusted proxies only)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Everything later stages may rely on; built once the target is routed."""

    request_id: str
    method: str
    peer: Peer
    target: Target
    route: Route
    identity: Identity | None = None  # None: nobody signed in (or a public route: not looked at)
