"""Composition root: the one place that reads settings and wires them into objects.

`create_app()` is the factory every uvicorn worker calls (config path from TABIJI_CONFIG). The
returned app is raw ASGI: the proxy path avoids framework overhead (see bench/stacks.py);
Starlette serves only the gateway's own endpoints under /.tabiji/.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.routing import BaseRoute

from gateway import observability
from gateway.app_services import Service, upstream_ssl_context
from gateway.audit.writer import AuditWriter
from gateway.decide import PolicyDecider, PolicyHolder, empty_policy_set
from gateway.forward import Forwarder
from gateway.observability import Readiness
from gateway.pages import Pages
from gateway.peer import TrustedProxies
from gateway.pipeline import Pipeline, Receive, Scope, Send
from gateway.policy_reload import PolicyReloader
from gateway.routing import Route, RouteTable, Upstream
from gateway.settings import CONFIG_ENV, GatewaySettings, RouteConfig, load_settings
from gateway.state.base import StateStore
from gateway.web.catalogue import load_catalogue
from gateway.web.endpoints import build_internal_app
from gateway.wire_audit import audit_view_routes, build_audit
from gateway.wire_devices import build_devices
from gateway.wire_identity import build_identity
from policies.geoip import GeoIP
from policies.loader import load_policy_dir

log = logging.getLogger("tabiji.app")
GC_THRESHOLDS = (20_000, 20, 20)  # measured in bench/proxy.py; CPython's default is (700, 10, 10)


def build_route(config: RouteConfig, default_max_body: int) -> Route:
    """Turn a validated route config into the pipeline's own Route value."""
    scheme, authority, prefix = config.from_parts
    target = urlsplit(config.to)
    upstream_scheme = target.scheme
    port = target.port or (443 if upstream_scheme == "https" else 80)
    return Route(
        name=config.name,
        scheme=scheme,
        host=authority,
        path_prefix=prefix,
        upstream=Upstream(
            scheme=upstream_scheme,
            host=target.hostname or "",
            port=port,
            base_path=target.path.rstrip("/"),
            ssl_context=(
                upstream_ssl_context(config.tls_ca_bundle) if upstream_scheme == "https" else None
            ),
        ),
        preserve_host=config.preserve_host,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        max_body_bytes=int(config.max_body_bytes or default_max_body),
        websockets=config.websockets,
        public=config.public,
        policy=config.policy,
        providers=tuple(config.providers) if config.providers is not None else None,
        identity_headers=config.identity_headers,
        audit_query=config.audit_query,
    )


class GatewayApp:
    """The raw ASGI app: HTTP and WebSocket go to the pipeline; it also runs the lifespan."""

    def __init__(
        self,
        pipeline: Pipeline,
        forwarder: Forwarder,
        reloader: PolicyReloader | None = None,
        services: Sequence[Service] = (),
    ) -> None:
        self.pipeline = pipeline
        self.forwarder = forwarder
        self.reloader = reloader
        self.services = tuple(services)
        self._started: list[Service] = []
        self.handle_http = pipeline.handle_http
        self.handle_websocket = pipeline.handle_websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle_http(scope, receive, send)
        elif kind == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.forwarder.start()
                    for service in self.services:
                        await service.start()
                        self._started.append(service)
                    if self.reloader is not None:
                        # Catch up with changes made between loading the config and now.
                        await self.reloader.reload()
                        await self.reloader.start()
                except Exception as error:  # a worker that cannot start must say why and stop
                    log.exception("start-up failed")
                    await self._stop_services()
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                # Start-up objects live as long as the worker: keep the collector off them, and
                # collect young objects less often (a request allocates hundreds; cycles are rare).
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.pipeline.access_log is not None:
                    self.pipeline.access_log.flush()
                if self.reloader is not None:
                    await self.reloader.stop()
                await self._stop_services()
                await self.forwarder.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _stop_services(self) -> None:
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:  # one failing stop must not keep the others (audit!) from theirs
                log.exception("stopping %s failed", service.name)


def build_app(settings: GatewaySettings, *, dry_run: bool = False) -> GatewayApp:
    """Wire every collaborator from settings (no other module reads them).

    `dry_run` (check-config) builds every object but writes nothing (no keys, no secrets).
    """
    routes = RouteTable(
        [build_route(route, int(settings.server.max_body_bytes)) for route in settings.routes]
    )
    pages = Pages(load_catalogue())
    readiness = Readiness()
    readiness.add("config", lambda: (True, f"{len(routes.routes)} routes loaded"))
    audit = build_audit(settings, dry_run=dry_run) if settings.audit.enabled else None
    policies = settings.policies
    holder = PolicyHolder(load_policy_dir(policies.dir) if policies else empty_policy_set())
    reloader = None
    if policies is not None:
        reloader = PolicyReloader(
            directory=policies.dir,
            holder=holder,
            required=frozenset(r.policy for r in settings.routes if r.policy),
            poll_interval=policies.poll_interval,
            use_events=policies.watch == "events",
            count=observability.count_policy_reload,
            audit=audit.trail.admin if audit is not None else None,
        )
        readiness.add("policies", reloader.readiness)
    geoip = GeoIP(settings.geoip.database) if settings.geoip else None
    forwarder = Forwarder()
    services: list[Service] = []
    extra_routes: list[BaseRoute] = []
    if audit is not None:
        services += audit.services  # first up, last down: everything else may still record
        writer = audit.writer
        readiness.add("audit", lambda: _audit_ready(writer))
    identity = None
    if settings.identity.providers or settings.identity.bearer:
        identity = build_identity(
            settings,
            routes=routes,
            pages=pages,
            forwarder=forwarder,
            audit=audit.trail.admin if audit is not None else None,
            dry_run=dry_run,
        )
        services += identity.services
        extra_routes += identity.routes
        store = identity.store
        readiness.add("state", lambda: _ping(store, identity.store_description))
    devices = None
    if settings.devices.enabled:
        devices = build_devices(
            settings,
            routes=routes,
            pages=pages,
            holder=holder,
            geoip=geoip,
            sockets=forwarder.websockets,
            identity=identity,
            admin_audit=audit.trail.admin if audit is not None else None,
            dry_run=dry_run,
        )
        services += devices.services  # after the state store: the device stage uses it
        extra_routes += devices.routes
        readiness.add("devices", devices.readiness)
    # The signed assertion carries the device verified for each request (device stage).
    assertions = identity.assertions if identity is not None else None
    if audit is not None:
        extra_routes += audit_view_routes(
            settings,
            audit,
            holder=holder,
            resolver=identity.resolver if identity else None,
            pages=pages,
            geoip=geoip,
        )
    pipeline = Pipeline(
        routes=routes,
        trusted_proxies=TrustedProxies(list(settings.trusted_proxies)),
        decider=PolicyDecider(holder, geoip),
        forwarder=forwarder,
        pages=pages,
        internal_app=build_internal_app(
            pages=pages, readiness=readiness.check_all, extra_routes=extra_routes
        ),
        stages=observability.stages,
        metrics=observability.metrics,
        access_log=observability.AccessLog() if settings.logging.access_log else None,
        identity=identity.resolver if identity else None,
        assertions=assertions,
        audit=audit.trail if audit is not None else None,
        devices=devices.stage if devices is not None else None,
    )
    return GatewayApp(pipeline, forwarder, reloader, services)


def _audit_ready(writer: AuditWriter) -> tuple[bool, str]:
    # Spooling is still ready (nothing is lost); only a writer that cannot persist at all is not.
    if not writer.healthy:
        return False, "audit records cannot be written (store and spool both failing)"
    if not writer.store_ok:
        return True, "audit store down: spooling locally"
    return True, f"audit store answers; {writer.unindexed} records not indexed yet"


async def _ping(store: StateStore, description: str) -> tuple[bool, str]:
    ok = await store.ping()
    return ok, f"{description} {'answers' if ok else 'does not answer'}"


def create_app() -> Any:
    """uvicorn factory: read the config named by TABIJI_CONFIG and build the app."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"set {CONFIG_ENV} to the gateway's config file")
    return build_app(load_settings(Path(path)))
