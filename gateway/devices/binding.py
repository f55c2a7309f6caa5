"""Browser binding: a signed-in browser's session is bound to the device it runs on, silently.

/.tabiji/device/check makes a single-use challenge (bound to the session, the gateway origin
and the way back) and sends the browser to the device agent on 127.0.0.1; the agent signs it
and sends the browser to /.tabiji/device/attested, which verifies the signature with the
device's enrolled key and binds the device to the session for every worker and replica.
Must not import gateway.settings.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.asymmetric import ec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from device_agent.report import MAX_TOKEN_BYTES, ReportInvalid, verify_attestation
from gateway.devices.model import DeviceError, DeviceRecord
from gateway.identity.model import Identity
from gateway.identity.resolve import session_cookie_name, single_cookie
from gateway.identity.returnto import safe_return_path
from gateway.pages import Pages
from gateway.routing import canonical_authority
from gateway.state.ratelimit import RateLimiter
from gateway.web.endpoint_audit import Audit, audit_action
from gateway.web.responses import error_page, redirect, respond
from gateway.web.where import Where, where_of

CHECK_PATH = "/.tabiji/device/check"
ATTESTED_PATH = "/.tabiji/device/attested"
LOGIN_PATH = "/.tabiji/login"
AGENT_PATH = "/tabiji/attest"  # the agent's loopback endpoint (device_agent)
ATTEST_NS = "attest"  # state store namespace: challenge -> session hash, origin, way back
CHALLENGE_BYTES = 32
MAX_CHALLENGE = 128
MAX_DEVICE_ID = 64


class BindingSessions(Protocol):
    """What binding needs of gateway.identity.sessions.SessionManager."""

    async def lookup(self, cookie_id: str, host: str, now: float) -> Identity | None: ...

    async def bind_device(self, main_hash: str, device_id: str, now: float) -> bool: ...


class ChallengeStore(Protocol):
    """The part of gateway.state.base.StateStore the challenges live in."""

    async def put(self, ns: str, key: str, value: bytes, ttl: float) -> None: ...

    async def take(self, ns: str, key: str) -> bytes | None: ...


class BindingRegistry(Protocol):
    """What binding needs of gateway.devices.registry.DeviceRegistry."""

    def get_cached(self, device_id: str) -> DeviceRecord | None: ...

    def owner_devices_cached(self, owner: tuple[str, str]) -> tuple[DeviceRecord, ...]: ...

    def key_of(self, record: DeviceRecord) -> ec.EllipticCurvePublicKey: ...

    async def get(self, device_id: str) -> DeviceRecord | None: ...


class _Refused(Exception):
    """Stop with the error page of this status and code (`note`: the precise cause, audited)."""

    def __init__(self, status: int, *, code: str, note: str = "") -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.note = note


def choose_port(devices: Sequence[DeviceRecord], ports: Sequence[int]) -> int:
    """Where the user's agent listens: the port last reported by their most recently reporting
    approved device, if it is one of the configured ports; else the first configured port."""
    best: DeviceRecord | None = None
    for device in devices:
        if device.status != "approved" or device.loopback_port not in ports:
            continue
        if best is None or (device.posture_at or 0.0) > (best.posture_at or 0.0):
            best = device
    if best is not None and best.loopback_port is not None:
        return best.loopback_port
    return ports[0]


class DeviceBindingEndpoints:
    """GET /.tabiji/device/check and GET /.tabiji/device/attested; `routes()` lists them."""

    def __init__(
        self,
        *,
        sessions: BindingSessions,
        store: ChallengeStore,
        registry: BindingRegistry,
        pages: Pages,
        public_origin: str,
        loopback_ports: Sequence[int],
        challenge_ttl: float = 120.0,
        max_skew: float = 300.0,
        audit: Audit | None = None,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        scheme, _, authority = public_origin.rstrip("/").partition("://")
        # Each check stores a challenge: a session may make only so many (a loop, a script).
        self.limiter = limiter if limiter is not None else RateLimiter(30, 10)
        if scheme not in ("http", "https") or not authority or not loopback_ports:
            raise ValueError("public_origin must be http(s)://host[:port]; ports must be given")
        # The origin the agent enrolled with: the only place it sends a browser back to.
        self.public_origin = f"{scheme}://{canonical_authority(authority, scheme)}"
        self.sessions = sessions
        self.store = store
        self.registry = registry
        self.pages = pages
        self.ports = tuple(loopback_ports)
        self.challenge_ttl = challenge_ttl
        self.max_skew = int(max_skew)
        self.audit_hook = audit
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            Route(CHECK_PATH, self.check, methods=["GET"]),
            Route(ATTESTED_PATH, self.attested, methods=["GET"]),
        ]

    # -- plumbing -----------------------------------------------------------------------------

    async def _identity(self, request: Request, where: Where, now: float) -> Identity | None:
        cookie = single_cookie(request.scope["headers"], session_cookie_name(where.https))
        if cookie is None:
            return None
        return await self.sessions.lookup(cookie, where.authority, now)

    def _audit(self, action: str, request: Request, where: Where, **fields: object) -> None:
        audit_action(self.audit_hook, action, request, where, **fields)

    def _error(self, request: Request, where: Where, refused: _Refused) -> Response:
        return error_page(
            self.pages, request, https=where.https, status=refused.status, code=refused.code
        )

    def _redirect(self, where: Where, location: str) -> Response:
        return redirect(self.pages, location, https=where.https)

    # -- endpoints ----------------------------------------------------------------------------

    async def check(self, request: Request) -> Response:
        """Make a challenge for this session and send the browser to its device agent."""
        where = where_of(request)
        now = self.clock()
        back = safe_return_path(request.query_params.get("rd"), "/")
        identity = await self._identity(request, where, now)
        if identity is None or identity.session_hash is None:
            # Relative: the login of this same host, which comes back to where the person was
            # going (and from there to this check again).
            return self._redirect(where, f"{LOGIN_PATH}?rd={quote(back, safe='')}")
        if not self.limiter.allow(identity.session_hash, time.monotonic()):
            return self._error(request, where, _Refused(429, code="device-rate-limited"))
        challenge = secrets.token_urlsafe(CHALLENGE_BYTES)
        record = {
            "session": identity.session_hash,
            "origin": self.public_origin,
            # The way back is on the host the person was on: it holds a session of theirs, so
            # it is one of the gateway's hosts (sessions are host-bound), not a Host trick.
            "back": where.origin + back,
        }
        await self.store.put(ATTEST_NS, challenge, json.dumps(record).encode(), self.challenge_ttl)
        port = choose_port(self.registry.owner_devices_cached(identity.key), self.ports)
        query = urlencode({"challenge": challenge, "return": self.public_origin + ATTESTED_PATH})
        agent_url = f"http://127.0.0.1:{port}{AGENT_PATH}?{query}"
        language = self.pages.language(request.scope["headers"])
        headers, body = self.pages.render_page(
            "device_check.html",
            language=language,
            https=where.https,
            extra_css="identity.css",
            agent_url=agent_url,
            retry_url=back,
        )
        return respond(200, body, headers)

    async def attested(self, request: Request) -> Response:
        """Verify the agent's answer and bind its device to the session; then go back."""
        where = where_of(request)
        try:
            device_id, back = await self._verify(request, where)
        except _Refused as refused:
            self._audit(
                "device.bind-refused",
                request,
                where,
                code=refused.code,
                detail=refused.note or None,
                device=request.query_params.get("device", "")[:MAX_DEVICE_ID] or None,
            )
            return self._error(request, where, refused)
        except DeviceError as error:  # the registry could not be read: nothing is bound
            return self._error(request, where, _Refused(error.status, code=error.code))
        self._audit("device.bind", request, where, device=device_id)
        return self._redirect(where, back)

    async def _verify(self, request: Request, where: Where) -> tuple[str, str]:
        now = self.clock()
        params = request.query_params
        challenge = params.get("challenge", "")
        device_id = params.get("device", "")
        token = params.get("attestation", "")
        if not (
            0 < len(challenge) <= MAX_CHALLENGE
            and 0 < len(device_id) <= MAX_DEVICE_ID
            and 0 < len(token) <= MAX_TOKEN_BYTES
        ):
            raise _Refused(400, code="attest-malformed")
        # Single use: taken before anything else is checked, so it can never be tried twice.
        pending = _challenge(await self.store.take(ATTEST_NS, challenge))
        if pending is None:
            raise _Refused(400, code="attest-challenge-unknown")
        identity = await self._identity(request, where, now)
        if identity is None:
            raise _Refused(401, code="attest-no-session")
        if not secrets.compare_digest(identity.session_hash or "", pending["session"]):
            raise _Refused(403, code="attest-wrong-session")
        record = self.registry.get_cached(device_id) or await self.registry.get(device_id)
        if record is None:
            raise _Refused(403, code="attest-device-unknown")
        try:
            verify_attestation(
                token,
                self.registry.key_of(record),
                device_id=device_id,
                challenge=challenge,
                origin=pending["origin"],
                now=now,
                max_age=int(self.challenge_ttl),
                max_skew=self.max_skew,
            )
        except (ReportInvalid, DeviceError) as error:
            raise _Refused(403, code="attest-invalid", note=error.code) from None
        if record.status == "revoked":
            raise _Refused(403, code="device-revoked")
        if record.owner != identity.key:
            raise _Refused(403, code="device-not-owned")
        if record.status != "approved":
            raise _Refused(403, code="device-not-approved")
        if not await self.sessions.bind_device(pending["session"], device_id, now):
            raise _Refused(401, code="attest-no-session", note="session-ended")
        return device_id, pending["back"]


def _challenge(raw: bytes | None) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        data: Any = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    fields = ("session", "origin", "back")
    if not all(isinstance(data.get(name), str) for name in fields):
        return None
    return {name: data[name] for name in fields}
