"""The gateway's error tree: every error has a stable kebab-case `code` and its HTTP status.

Imports nothing from the gateway: stages raise these; only the pipeline turns them into responses.
"""

from __future__ import annotations


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; `code` is stable and shown to people."""

    code = "gateway-error"
    status = 500

    def __init__(self, detail: str = "", *, code: str | None = None) -> None:
        super().__init__(detail or self.code)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequestTarget(GatewayError):
    """The request-target is ambiguous or malformed; it is never routed or forwarded."""

    code = "target-invalid"
    status = 400


class UnknownHost(GatewayError):
    """No route serves this Host (or path): 404, never forwarded anywhere."""

    code = "route-not-found"
    status = 404


class RequestTooLarge(GatewayError):
    """The request body exceeds the route's `max_body_bytes`."""

    code = "body-too-large"
    status = 413


class AccessDenied(GatewayError):
    """The decision was deny; `reasons` are policy reason codes."""

    code = "access-denied"
    status = 403

    def __init__(self, reasons: tuple[str, ...], detail: str = "") -> None:
        super().__init__(detail or ", ".join(reasons))
        self.reasons = reasons


class LoginRequired(GatewayError):
    """Nobody is signed in and the policy needs a user: a browser is sent to log in."""

    code = "login-required"
    status = 401

    def __init__(self, login_url: str) -> None:
        super().__init__("login required")
        self.login_url = login_url
        self.reasons = ("user-unauthenticated",)


class AuditUnavailable(GatewayError):
    """`audit.fail_closed` is on and records cannot be written durably: nothing is served."""

    code = "audit-unavailable"
    status = 503


class UpstreamUnavailable(GatewayError):
    """The upstream refused the connection, could not be reached, or broke the exchange."""

    code = "upstream-unavailable"
    status = 502


class UpstreamTimeout(GatewayError):
    """The upstream did not connect or answer within the route's timeouts."""

    code = "upstream-timeout"
    status = 504
