"""Guards the gateway's own pages (the audit view, later the admin pages) with a named policy.

Who may look is itself a policy (e.g. group `auditors`): the requester's identity is resolved
as for any request, and the policy engine decides. Must not import gateway.settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.context import Peer
from gateway.decide import PolicyHolder
from gateway.identity.model import Identity
from gateway.pages import Pages
from gateway.routing import canonical_authority
from gateway.web.audit_view import Viewer
from gateway.web.where import where_of
from policies.engine import evaluate
from policies.geoip import GeoIP
from policies.model import AccessRequest, Resource


class Resolver(Protocol):
    async def resolve(
        self, headers: list[tuple[bytes, bytes]], authority: str, https: bool, now: float
    ) -> Identity | None: ...


class PolicyGuard:
    """`await guard(request)` → the Viewer allowed in, or the response to send instead
    (a login redirect when nobody is signed in, the refusal page with the policy's reasons)."""

    def __init__(
        self,
        *,
        holder: PolicyHolder,
        policy: str,
        resource: str,
        resolver: Resolver | None,
        pages: Pages,
        geoip: GeoIP | None = None,
        public_origin: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # These pages answer only on the public URL: on a route host they would share an origin
        # (and the session cookie) with that application, so its scripts could read them.
        self._public_origin = None
        if public_origin is not None:
            scheme, _, authority = public_origin.rstrip("/").partition("://")
            self._public_origin = f"{scheme}://{canonical_authority(authority, scheme)}"
        self._holder = holder
        self._policy = policy
        self._resource = resource
        self._resolver = resolver
        self._pages = pages
        self._geoip = geoip
        self._clock = clock

    async def __call__(self, request: Request) -> Viewer | Response:
        if self._public_origin is not None and where_of(request).origin != self._public_origin:
            return self._page(request, 404, "route-not-found", ())
        peer: Peer | None = request.scope.get("tabiji.peer")
        https = (peer.scheme if peer else request.url.scheme) == "https"
        authority = peer.authority if peer else request.url.netloc
        client_ip = peer.client_ip if peer else (request.client.host if request.client else "")
        headers = list(request.scope["headers"])
        now = self._clock()
        identity = None
        if self._resolver is not None:
            identity = await self._resolver.resolve(headers, authority, https, now)
        policy = self._holder.current.policy(self._policy)
        if policy is None:  # fail closed: a guard whose policy vanished lets nobody in
            return self._refuse(request, headers, https, ("policy-unknown",))
        facts = AccessRequest(
            resource=Resource(self._resource, authority, request.url.path, request.method),
            subject=identity.subject_fact() if identity is not None else None,
            source_ip=client_ip,
            country=self._geoip.country(client_ip) if self._geoip and client_ip else None,
        )
        decision = evaluate(policy, facts, datetime.fromtimestamp(now, UTC))
        if decision.allowed and identity is not None:
            return Viewer(identity.issuer, identity.subject, identity.email, identity.name)
        reasons = tuple(str(r) for r in decision.reasons) or ("user-unauthenticated",)
        if identity is None:
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            # Relative (RFC 9110 §10.2.2): the login on this same host, never one the Host header
            # names (these pages answer on every host, routed or not).
            return RedirectResponse(f"/.tabiji/login?rd={quote(back, safe='')}", status_code=302)
        return self._refuse(request, headers, https, reasons)

    def _refuse(
        self,
        request: Request,
        headers: list[tuple[bytes, bytes]],
        https: bool,
        reasons: tuple[str, ...],
    ) -> Response:
        return self._page(request, 403, "access-denied", reasons, headers=headers, https=https)

    def _page(
        self,
        request: Request,
        status: int,
        code: str,
        reasons: tuple[str, ...],
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        https: bool | None = None,
    ) -> Response:
        page_headers, body = self._pages.render_error(
            status=status,
            code=code,
            request_id=request.scope.get("tabiji.request_id", "-"),
            request_headers=headers if headers is not None else list(request.scope["headers"]),
            reasons=reasons,
            https=where_of(request).https if https is None else https,
        )
        response = Response(body, status_code=status)
        for name, value in page_headers:
            response.headers[name.decode()] = value.decode()
        return response
