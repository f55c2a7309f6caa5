"""Composition root, identity part: settings → state store, sessions, providers, bearer issuers,
the assertion key ring, the identity endpoints and the services that keep them running.

Part of gateway.app (it reads settings; no stage imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.app_services import Service, periodic, upstream_ssl_context
from gateway.assertion import AssertionKeyRing, AssertionMinter, UpstreamAssertions
from gateway.forward import Forwarder
from gateway.identity.csrf import Csrf
from gateway.identity.resolve import IdentityResolver
from gateway.identity.routes import identity_routes, oidc_refresher
from gateway.identity.sessions import SessionManager
from gateway.identity.tokens import BearerIssuer, BearerVerifier
from gateway.jose import JwksCache
from gateway.pages import Pages
from gateway.routing import RouteTable, canonical_authority
from gateway.settings import GatewaySettings
from gateway.state.base import StateStore
from gateway.state.factory import describe_store, open_state_store
from gateway.state.ratelimit import RateLimiter

log = logging.getLogger("tabiji.identity")
KEY_RING_REFRESH = 30.0  # seconds between looks at the key directory (`tabiji keys rotate`)
EXPIRY_SWEEP = 5.0  # seconds between closing WebSockets whose session has ended
CSRF_SECRET_FILE = "csrf.secret"  # noqa: S105 — a file name, not a secret
AuditHook = Callable[[str, Mapping[str, object]], None]


@dataclass
class IdentityParts:
    """What gateway.app needs from the identity side."""

    store: StateStore
    store_description: str
    sessions: SessionManager
    resolver: IdentityResolver
    assertions: UpstreamAssertions
    key_ring: AssertionKeyRing
    routes: list[BaseRoute]
    services: list[Service] = field(default_factory=list)


def load_or_create_secret(path: Path, *, create: bool) -> bytes:
    """A 32-byte secret shared by every worker (and every replica sharing the directory)."""
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    if not create:
        return secrets.token_bytes(32)  # check-config: a throwaway, nothing is written
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: of several workers starting at once exactly one writes; the others read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            data = path.read_bytes()
            if len(data) >= 32:
                return data
            time.sleep(0.01)
        raise RuntimeError(f"{path}: the shared secret is empty or short") from None
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
        out.flush()
        os.fsync(out.fileno())
    return path.read_bytes()


def _provider_label(config: Any) -> str:
    name = config.display_name
    return f"{name.ja}（{name.en}）" if name is not None else config.name


def _providers(settings: GatewaySettings) -> tuple[dict[str, Any], dict[str, str]]:
    from gateway.identity.oidc import OidcProvider, ProviderConfig  # authlib only when configured

    callback = f"{settings.public_url}/.tabiji/oidc/callback"
    providers: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for config in settings.identity.providers:
        secret = None
        if config.client_secret_file is not None:
            secret = config.client_secret_file.read_text(encoding="utf-8").strip() or None
        providers[config.name] = OidcProvider(
            ProviderConfig(
                name=config.name,
                issuer=config.issuer,
                client_id=config.client_id,
                client_secret=secret,
                redirect_uri=callback,
                scopes=tuple(config.scopes),
                groups_claim=config.groups_claim,
                algorithms=tuple(config.algorithms),
                ca_bundle=config.ca_bundle,
                end_session=config.end_session,
                graph_member_of_url=config.graph_groups_url,
            )
        )
        labels[config.name] = _provider_label(config)
    return providers, labels


def _bearer(settings: GatewaySettings) -> tuple[BearerVerifier | None, list[JwksCache]]:
    issuers = []
    caches = []
    for config in settings.identity.bearer:
        cache = JwksCache(
            config.jwks_uri or "",
            ssl_context=upstream_ssl_context(config.ca_bundle),
        )
        caches.append(cache)
        issuers.append(
            BearerIssuer(
                name=config.name,
                issuer=config.issuer,
                audiences=tuple(config.audiences),
                keys=cache,
                algorithms=tuple(config.algorithms),
                groups_claim=config.groups_claim,
            )
        )
    return (BearerVerifier(issuers) if issuers else None), caches


def _route_for(routes: RouteTable) -> Callable[[str, str], tuple[str, tuple[str, ...]] | None]:
    def route_for(authority: str, path: str) -> tuple[str, tuple[str, ...]] | None:
        route = routes.match(authority, path)
        if route is None or route.public:
            return None
        return route.name, route.providers or ()  # () means every configured provider

    return route_for


def _jwks_route(key_ring: AssertionKeyRing) -> BaseRoute:
    async def jwks(request: Request) -> Response:
        """The public keys upstreams verify X-Tabiji-Assertion with (RFC 7517)."""
        return JSONResponse(
            key_ring.jwks(time.time()),
            headers={"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"},
        )

    return Route("/.tabiji/jwks.json", jwks, methods=["GET", "HEAD"])


def build_identity(
    settings: GatewaySettings,
    *,
    routes: RouteTable,
    pages: Pages,
    forwarder: Forwarder,
    audit: AuditHook | None,
    dry_run: bool,
) -> IdentityParts:
    """Every identity object, unstarted; `dry_run` (check-config) writes no file."""
    identity = settings.identity
    public = urlsplit(settings.public_url)
    public_host = canonical_authority(public.netloc.lower(), public.scheme)
    config_dir = settings.assertion.key_dir.parent
    store = open_state_store(identity.session.store, base_dir=config_dir)
    providers, labels = _providers(settings)
    bearer, jwks_caches = _bearer(settings)
    sessions = SessionManager(
        store,
        public_host=public_host,
        lifetime=identity.session.lifetime,
        idle_timeout=identity.session.idle_timeout,
        refresh_interval=identity.session.refresh_interval,
        refresher=oidc_refresher(providers) if providers else None,
    )
    key_ring = AssertionKeyRing(settings.assertion.key_dir)
    if not dry_run:
        key_ring.ensure(time.time())  # the first start makes the first key
        key_ring.load()
    minter = AssertionMinter(key_ring, settings.public_url, lifetime=settings.assertion.lifetime)
    csrf = Csrf(
        load_or_create_secret(settings.assertion.key_dir / CSRF_SECRET_FILE, create=not dry_run)
    )
    limiter = RateLimiter(identity.rate_limit.per_minute, identity.rate_limit.burst)
    endpoint_routes: list[BaseRoute] = [_jwks_route(key_ring)]
    if providers:
        # Bearer-only deployments (programs, no browser login) have no login endpoints.
        endpoint_routes += identity_routes(
            sessions=sessions,
            providers=providers,
            public_origin=settings.public_url,
            route_for=_route_for(routes),
            store=store,
            pages=pages,
            csrf=csrf,
            limiter=limiter,
            audit=audit,
            labels=labels,
        )
    parts = IdentityParts(
        store=store,
        store_description=describe_store(identity.session.store),
        sessions=sessions,
        resolver=IdentityResolver(sessions, bearer),
        assertions=UpstreamAssertions(minter),
        key_ring=key_ring,
        routes=endpoint_routes,
    )
    parts.services = _services(parts, forwarder, jwks_caches)
    return parts


def _services(
    parts: IdentityParts, forwarder: Forwarder, jwks_caches: list[JwksCache]
) -> list[Service]:
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    sockets = forwarder.websockets

    def close_revoked(hashes: frozenset[str]) -> None:
        # A revoked session's WebSockets close at once (4401: the page should log in again).
        closed = sockets.close_where(
            lambda live: live.ctx.identity is not None and live.ctx.identity.session_hash in hashes,
            code=4401,
            reason="session-ended",
        )
        if closed:
            log.info("closed %d WebSocket(s) of ended sessions", closed)

    def close_expired() -> None:
        now = time.time()
        sockets.close_where(
            lambda live: live.ctx.identity is not None and live.ctx.identity.expires_at <= now,
            code=4401,
            reason="session-expired",
        )

    parts.sessions.on_revoked(close_revoked)

    async def start_store() -> None:
        await parts.store.open()

    async def stop_store() -> None:
        await parts.store.close()

    async def start_feed() -> None:
        stop.clear()
        tasks.append(asyncio.create_task(parts.sessions.run_feed(stop)))
        tasks.append(asyncio.create_task(periodic(stop, EXPIRY_SWEEP, close_expired)))
        tasks.append(asyncio.create_task(periodic(stop, KEY_RING_REFRESH, parts.key_ring.refresh)))
        for cache in jwks_caches:
            # Best effort: an issuer that is down now is fetched again on the first token.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cache.refresh(), 5.0)

    async def stop_feed() -> None:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        tasks.clear()
        await parts.sessions.drain()

    return [
        Service("state store", start_store, stop_store),
        Service("session feed", start_feed, stop_feed),
    ]
