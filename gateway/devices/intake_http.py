"""The agent's HTTP endpoints after enrolment: POST /.tabiji/devices/report (signed posture in,
status + reasons + localised fixes out) and POST /.tabiji/devices/certificate (renewal with a
DPoP proof). Also the JSON plumbing the enrolment endpoints share (one refusal table).

Protocol: /tmp/plan/PROTOCOL.md §Posture reports, §Certificate renewal. Fails closed: every
error is a refusal with a stable code. Must not import gateway.settings.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from device_agent.report import (
    MAX_TOKEN_BYTES,
    PROOF_HEADER,
    PROOF_TYPE,
    REPORT_TYPE,
    ReportInvalid,
    unverified_device_id,
    verify_proof,
)
from gateway.devices.fixes import DeviceAdvisor
from gateway.devices.model import DeviceError, DeviceRecord, KeyStorageFact
from gateway.errors import GatewayError
from gateway.pages import Pages
from gateway.state.base import StateStore
from gateway.web.catalogue import LANGUAGES
from gateway.web.where import Where, where_of

if TYPE_CHECKING:
    from gateway.devices.ca import IssuedCertificate
    from gateway.devices.posture import IntakeResult

log = logging.getLogger("tabiji.devices")

REPORT_PATH: Final = "/.tabiji/devices/report"
CERTIFICATE_PATH: Final = "/.tabiji/devices/certificate"
JWT_TYPE: Final = "application/jwt"  # RFC 7519 §10.3.1
DPOP_NS: Final = "dpop"  # shared with the pipeline's per-request proofs: one jti, one use


@dataclass(frozen=True, slots=True)
class ApiRefusal:
    """How the device API answers one refusal code."""

    code: str
    status: int


# Every refusal the device API answers with, and its HTTP status. A DeviceError's own status wins
# (the registry knows best); codes from device_agent/report.py (ReportInvalid) get theirs here.
REFUSALS: Final = {
    refusal.code: refusal
    for refusal in (
        ApiRefusal(code="report-too-large", status=413),
        ApiRefusal(code="report-malformed", status=400),
        ApiRefusal(code="report-wrong-type", status=400),
        ApiRefusal(code="report-bad-algorithm", status=400),
        ApiRefusal(code="report-clock-skew", status=400),
        ApiRefusal(code="report-expired", status=400),
        ApiRefusal(code="report-bad-signature", status=401),
        ApiRefusal(code="report-wrong-device", status=401),
        ApiRefusal(code="report-wrong-audience", status=401),
        ApiRefusal(code="report-replayed", status=409),
        ApiRefusal(code="enrol-malformed", status=400),
        ApiRefusal(code="enrolment-expired", status=410),
        ApiRefusal(code="enrolment-refused", status=403),
        ApiRefusal(code="enrolment-code-invalid", status=410),
        ApiRefusal(code="device-key-invalid", status=400),
        ApiRefusal(code="device-key-unsupported", status=400),
        ApiRefusal(code="device-key-already-enrolled", status=409),
        ApiRefusal(code="device-unknown", status=401),
        ApiRefusal(code="device-revoked", status=403),
        ApiRefusal(code="device-not-approved", status=403),
        ApiRefusal(code="device-registry-unavailable", status=503),
        ApiRefusal(code="device-tag-invalid", status=400),
        ApiRefusal(code="proof-missing", status=401),
        ApiRefusal(code="proof-wrong-method", status=401),
        ApiRefusal(code="proof-wrong-url", status=401),
        ApiRefusal(code="proof-replayed", status=401),
        ApiRefusal(code="device-rate-limited", status=429),
        ApiRefusal(code="state-unavailable", status=503),
        ApiRefusal(code="gateway-error", status=500),
    )
}


class ApiError(Exception):
    """Stop an API handler with a refusal: `code`, its status, and Retry-After when limited."""

    def __init__(self, code: str, status: int | None = None, retry_after: int | None = None):
        super().__init__(code)
        self.code = code
        known = REFUSALS.get(code)
        self.status = status or (known.status if known is not None else 400)
        self.retry_after = retry_after


def api_error_of(error: Exception) -> ApiError:
    """The refusal for an exception from verification, the registry or the state store."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ReportInvalid):
        return ApiError(error.code)
    if isinstance(error, DeviceError):
        return ApiError(error.code, error.status)
    if isinstance(error, GatewayError):  # StateUnavailable and kin
        return ApiError(error.code, error.status)
    return ApiError("gateway-error", 500)


class AdminAudit(Protocol):
    """Writes one administrative audit record (gateway.audit.trail.AuditTrail.admin)."""

    def __call__(
        self, action: str, detail: Mapping[str, object], *, actor: str | None = None
    ) -> None: ...


class RateLimiterLike(Protocol):
    """gateway.state.ratelimit.RateLimiter."""

    def allow(self, key: str, now: float) -> bool: ...

    def retry_after(self, key: str, now: float) -> float: ...


def record_admin(audit: AdminAudit, action: str, detail: Mapping[str, object], **kw: Any) -> None:
    """Write an admin record; a failing audit hook is logged, never an unhandled error."""
    try:
        audit(action, detail, **kw)
    except Exception:
        log.exception("the audit hook failed for %s", action)


def json_response(
    pages: Pages,
    where: Where,
    status: int,
    document: Mapping[str, object],
    extra: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    """A JSON answer with the gateway's security headers (no-store among them)."""
    response = Response(
        json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(),
        status_code=status,
    )
    response.raw_headers.extend(pages.security_headers(where.https))
    response.raw_headers.append((b"content-type", b"application/json; charset=utf-8"))
    if extra:
        response.raw_headers.extend(extra)
    return response


def refusal_response(
    pages: Pages,
    where: Where,
    error: ApiError,
    *,
    report: bool = False,
) -> Response:
    """{"error", "message": {ja, en}} (plus "accepted": false for reports), with its status."""
    document: dict[str, object] = {}
    if report:
        document["accepted"] = False
    document["error"] = error.code
    document["message"] = {lang: pages.text(error.code, lang).title for lang in LANGUAGES}
    extra = []
    if error.retry_after is not None:
        extra.append((b"retry-after", str(error.retry_after).encode()))
    return json_response(pages, where, error.status, document, extra)


async def answer(
    pages: Pages,
    request: Request,
    handler: Callable[[Request, Where], Awaitable[Response]],
    *,
    action: str,
    report: bool = False,
    refusal_of: Callable[[Exception], ApiError] = api_error_of,
) -> Response:
    """Run one device API handler; whatever it raises becomes its JSON refusal (fail closed).
    `action` names it in the log line of a refusal that is the gateway's fault (5xx)."""
    where = where_of(request)
    try:
        return await handler(request, where)
    except Exception as error:
        refusal = refusal_of(error)
        if refusal.status >= 500:
            log.warning("%s refused (%s): %s", action, refusal.code, error)
        return refusal_response(pages, where, refusal, report=report)


async def read_jwt(request: Request, limit: int = MAX_TOKEN_BYTES) -> str:
    """The compact JWS body of an application/jwt POST, read at most `limit` bytes far."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JWT_TYPE:
        raise ApiError("report-malformed", 415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError("report-too-large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError("report-too-large")
    try:
        token = body.decode("ascii").strip()
    except UnicodeDecodeError as error:
        raise ApiError("report-malformed") from error
    if not token:
        raise ApiError("report-malformed")
    return token


def limited(limiter: RateLimiterLike, key: str, now: float) -> None:
    """Spend one token of `key`, or refuse with 429 and when to come back."""
    if not limiter.allow(key, now):
        raise ApiError(
            "device-rate-limited", retry_after=max(1, math.ceil(limiter.retry_after(key, now)))
        )


def exhausted(limiter: RateLimiterLike, key: str, now: float) -> None:
    """Refuse with 429 when `key` has no token left, without spending one."""
    wait = limiter.retry_after(key, now)
    if wait > 0:
        raise ApiError("device-rate-limited", retry_after=max(1, math.ceil(wait)))


# -- what we need from H3's registry, intake and CA -------------------------------------------


class RegistryLike(Protocol):
    """gateway.devices.registry.DeviceRegistry (the parts these endpoints use)."""

    def get_cached(self, device_id: str) -> DeviceRecord | None: ...

    def key_of(self, record: DeviceRecord) -> EllipticCurvePublicKey: ...

    async def get(self, device_id: str) -> DeviceRecord | None: ...

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord: ...

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord: ...


class IntakeLike(Protocol):
    """gateway.devices.posture.PostureIntake."""

    async def accept(self, token: str, *, now: float) -> IntakeResult: ...


class CertificateAuthority(Protocol):
    """gateway.devices.ca.DeviceCA."""

    @property
    def ca_pem(self) -> str: ...

    def issue(
        self,
        device_id: str,
        public_key: EllipticCurvePublicKey | str,
        *,
        now: float,
        lifetime: float | None = None,
    ) -> IssuedCertificate: ...


# -- the endpoints -------------------------------------------------------------------------------


class DeviceApi:
    """POST /.tabiji/devices/report and /.tabiji/devices/certificate."""

    def __init__(
        self,
        *,
        intake: IntakeLike,
        registry: RegistryLike,
        ca: CertificateAuthority,
        advisor: DeviceAdvisor,
        state: StateStore,
        pages: Pages,
        origin: str,
        audit: AdminAudit,
        address_limiter: RateLimiterLike,
        owner_limiter: RateLimiterLike,
        report_interval: int = 300,
        proof_max_age: int = 60,
        proof_max_skew: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.intake = intake
        self.registry = registry
        self.ca = ca
        self.advisor = advisor
        self.state = state
        self.pages = pages
        self.origin = origin.rstrip("/")
        self.audit = audit
        self.address_limiter = address_limiter
        self.owner_limiter = owner_limiter
        self.report_interval = report_interval
        self.proof_max_age = proof_max_age
        self.proof_max_skew = proof_max_skew
        self.clock = clock

    def routes(self) -> list[BaseRoute]:
        return [
            Route(REPORT_PATH, self.report, methods=["POST"]),
            Route(CERTIFICATE_PATH, self.certificate, methods=["POST"]),
        ]

    async def report(self, request: Request) -> Response:
        """A signed posture report in; status, the device-* reasons and their fixes out."""
        return await answer(self.pages, request, self._report, action="posture report", report=True)

    def _owner_keys(self, device_id: str) -> list[str]:
        keys = [f"device:{device_id}"]
        cached = self.registry.get_cached(device_id)
        if cached is not None:
            keys.append(f"owner:{cached.owner_issuer}|{cached.owner_subject}")
        return keys

    async def _report(self, request: Request, where: Where) -> Response:
        now = self.clock()
        limited(self.address_limiter, f"report:{where.client_ip}", now)
        token = await read_jwt(request)
        device_id = unverified_device_id(token, REPORT_TYPE)
        # Per device and per owner, only *verified* reports spend tokens: a forger who knows a
        # device id cannot starve the real device's reports (and make its posture go stale).
        keys = self._owner_keys(device_id)
        for key in keys:
            exhausted(self.owner_limiter, key, now)
        result = await self.intake.accept(token, now=now)
        for key in keys:
            self.owner_limiter.allow(key, now)
        record = result.record
        reasons = self.advisor.reasons(record, now=now)
        return json_response(
            self.pages,
            where,
            200,
            {
                "accepted": True,
                "device_id": record.id,
                "status": record.status,
                "reasons": list(reasons),
                "fixes": self.advisor.fixes(reasons),
                "next_report_in": self.report_interval,
            },
        )

    async def certificate(self, request: Request) -> Response:
        """A new device certificate for an approved device that proves its key (DPoP)."""
        return await answer(self.pages, request, self._certificate, action="certificate renewal")

    async def _certificate(self, request: Request, where: Where) -> Response:
        now = self.clock()
        limited(self.address_limiter, f"report:{where.client_ip}", now)
        proofs = request.headers.getlist(PROOF_HEADER)
        if len(proofs) != 1:  # RFC 9449 §4.3: exactly one DPoP header
            raise ApiError("proof-missing")
        proof = proofs[0].strip()
        device_id = unverified_device_id(proof, PROOF_TYPE)
        exhausted(self.owner_limiter, f"certificate:{device_id}", now)
        record = await self.registry.get(device_id)
        if record is None:
            raise ApiError("device-unknown")
        checked = verify_proof(
            proof,
            self.registry.key_of(record),
            device_id=device_id,
            method="POST",
            url=self.origin + CERTIFICATE_PATH,
            now=now,
            max_age=self.proof_max_age,
            max_skew=self.proof_max_skew,
        )
        ttl = self.proof_max_age + self.proof_max_skew + 5
        if not await self.state.put_new(DPOP_NS, f"{device_id}:{checked.proof_id}", b"1", ttl):
            raise ApiError("proof-replayed")
        self.owner_limiter.allow(f"certificate:{device_id}", now)
        if record.status == "revoked":
            raise ApiError("device-revoked")
        if record.status != "approved":
            raise ApiError("device-not-approved")
        issued = self.ca.issue(device_id, record.public_key_pem, now=now)
        await self.registry.set_certificate(device_id, issued.serial, issued.not_after, now=now)
        record_admin(
            self.audit,
            "device.certificate",
            {
                "device_id": device_id,
                "serial": issued.serial,
                "not_after": int(issued.not_after),
                "renewal": True,
                "client_ip": where.client_ip,
            },
            actor=f"device:{device_id}",
        )
        return json_response(
            self.pages,
            where,
            200,
            {
                "certificate": issued.cert_pem,
                "ca": self.ca.ca_pem,
                "not_after": int(issued.not_after),
            },
        )
