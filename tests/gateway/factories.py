"""Factories for the gateway tests: a route, an upstream, a peer or a context in one line."""

from __future__ import annotations

import ssl
from dataclasses import replace
from typing import Any

from gateway.context import Peer, RequestContext
from gateway.routing import Route, Upstream
from gateway.target import Target


def make_upstream(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    scheme: str = "http",
    base_path: str = "",
    ssl_context: ssl.SSLContext | None = None,
) -> Upstream:
    """An Upstream in one line."""
    return Upstream(scheme, host, port, base_path, ssl_context)


def make_route(upstream: Upstream | None = None, **changes: Any) -> Route:
    """A public route for app.example.test in one line; any field can be changed."""
    route = Route(
        name="app",
        scheme="https",
        host="app.example.test",
        path_prefix="/",
        upstream=upstream or make_upstream(),
        preserve_host=False,
        connect_timeout=2.0,
        read_timeout=5.0,
        max_body_bytes=10 * 1024 * 1024,
        websockets=True,
        public=True,
        policy=None,
    )
    return replace(route, **changes) if changes else route


def make_peer(
    client_ip: str = "203.0.113.7",
    *,
    scheme: str = "https",
    authority: str = "app.example.test",
    via_trusted_proxy: bool = False,
    forwarded_for: tuple[str, ...] | None = None,
) -> Peer:
    """A Peer in one line (an untrusted direct client by default)."""
    return Peer(
        client_ip=client_ip,
        scheme=scheme,
        authority=authority,
        via_trusted_proxy=via_trusted_proxy,
        forwarded_for=forwarded_for if forwarded_for is not None else (client_ip,),
    )


def make_ctx(
    route: Route | None = None,
    *,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    peer: Peer | None = None,
    request_id: str = "req-0123456789",
) -> RequestContext:
    """A RequestContext in one line."""
    return RequestContext(
        request_id=request_id,
        method=method,
        peer=peer or make_peer(),
        target=Target(path, query),
        route=route or make_route(),
    )
