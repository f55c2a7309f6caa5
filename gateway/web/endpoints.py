"""The gateway's own endpoints under /.tabiji/ (Starlette): health, readiness; later login, admin.

Must not import gateway.settings; what the endpoints need is passed in by gateway.app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import GatewayError
from gateway.pages import Pages

ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]  # {"ready": bool, "checks": {...}}


def build_internal_app(
    *, pages: Pages, readiness: ReadinessCheck, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """The Starlette app for /.tabiji/…; every response carries the gateway's security headers.

    `extra_routes` are the other components' endpoints (login, logout, JWKS, the audit view),
    each under /.tabiji/ and each responsible for its own security headers (Pages.render_page).
    """

    def secured(response: Response, request: Request) -> Response:
        for name, value in pages.security_headers(request.url.scheme == "https"):
            response.headers[name.decode()] = value.decode()
        request_id = request.scope.get("tabiji.request_id")
        if request_id:
            response.headers["x-request-id"] = request_id
        return response

    async def healthz(request: Request) -> Response:
        """Alive: the process answers. Load balancers use readyz to decide on traffic."""
        return secured(JSONResponse({"status": "alive"}), request)

    async def readyz(request: Request) -> Response:
        """Ready: config loaded and every store reachable, with the details of each check."""
        report = await readiness()
        ready = bool(report["ready"])
        body = {"status": "ready" if ready else "not-ready", "checks": report["checks"]}
        return secured(JSONResponse(body, status_code=200 if ready else 503), request)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        code = "method-not-allowed" if status == 405 else "route-not-found"
        headers, body = pages.render_error(
            status=status,
            code=code,
            request_id=request.scope.get("tabiji.request_id", "-"),
            request_headers=request.scope["headers"],
            https=request.url.scheme == "https",
        )
        response = Response(body, status_code=status)
        for name, value in headers:
            response.headers[name.decode()] = value.decode()
        return response

    async def refused(request: Request, exc: Exception) -> Response:
        # A stage error escaping an endpoint (the state store down while a page resolves its
        # viewer's session): its own page and status, never a bare 500.
        status = getattr(exc, "status", 500)
        headers, body = pages.render_error(
            status=status,
            code=getattr(exc, "code", "gateway-error"),
            request_id=request.scope.get("tabiji.request_id", "-"),
            request_headers=request.scope["headers"],
            https=request.url.scheme == "https",
        )
        response = Response(body, status_code=status)
        for name, value in headers:
            response.headers[name.decode()] = value.decode()
        return response

    return Starlette(
        routes=[
            Route("/.tabiji/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/.tabiji/readyz", readyz, methods=["GET", "HEAD"]),
            *extra_routes,
        ],
        exception_handlers={404: not_found, 405: not_found, GatewayError: refused},
    )
