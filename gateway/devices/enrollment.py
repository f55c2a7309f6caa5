"""Device enrolment, gateway side: the agent's signed request, the person's confirmation in the
browser ("this is my computer"), the agent's poll for its device id and certificate.

Protocol: /tmp/plan/PROTOCOL.md §Enrolment. The user code is RFC 8628-style (§6.1: 8 characters
of 20 consonants, case-insensitive, single use, 15 minutes, stored only as a hash). TPM
attestation makes the key "tpm" only when the agent answers the credential challenge; a TPM claim
without that stays "tpm-claimed". Must not import gateway.settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from device_agent.report import key_thumbprint, public_key_pem, verify_enrolment
from gateway.decide import PolicyHolder
from gateway.devices.intake_http import (
    AdminAudit,
    ApiError,
    CertificateAuthority,
    RateLimiterLike,
    answer,
    api_error_of,
    json_response,
    limited,
    read_jwt,
    record_admin,
)
from gateway.devices.model import DeviceError, DeviceRecord, KeyStorageFact, NewDevice
from gateway.errors import GatewayError
from gateway.identity.csrf import Csrf
from gateway.identity.model import Identity
from gateway.pages import Pages
from gateway.routing import canonical_authority
from gateway.state.base import StateStore
from gateway.web.catalogue import LANGUAGES
from gateway.web.forms import posted_by_own_page, read_form
from gateway.web.guard import Resolver
from gateway.web.responses import (
    chosen_language,
    error_page,
    for_forms,
    redirect,
    respond,
    switch_language_href,
)
from gateway.web.where import Where, where_of
from policies.geoip import GeoIP
from policies.model import AccessRequest, Device, Resource

log = logging.getLogger("tabiji.devices")

ENROL_PATH: Final = "/.tabiji/devices/enroll"
POLL_PATH: Final = "/.tabiji/devices/enroll/poll"
CONFIRM_PATH: Final = "/.tabiji/devices/confirm"
ENROLLED_PATH: Final = "/.tabiji/devices/enrolled"
ENROL_NS: Final = "device-enrol"  # enrolment id -> the enrolment (JSON)
CODE_NS: Final = "device-code"  # sha256 hex of the normalised user code -> enrolment id
CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 §6.1: no vowels, no 0/O, 1/I/L mix-ups
CODE_LENGTH: Final = 8
POLL_INTERVAL: Final = 2
MAX_FACT_CHARS: Final = 100
MAX_FORM_BYTES: Final = 4096
CSRF_PURPOSE: Final = "device-confirm"
APPROVAL_RESOURCE: Final = "tabiji-devices"
OS_NAMES: Final = {"linux": "Linux", "macos": "macOS", "windows": "Windows"}
_REQUEST_KEYS: Final = frozenset(
    {"hostname", "serial", "os", "key_storage", "attestation", "aud", "iat"}
)
_POLL_KEYS: Final = frozenset({"enrolment_id", "credential_answer", "aud", "iat"})


@dataclass(frozen=True, slots=True)
class EnrolmentFacts:
    """What the agent said about the device, checked for shape (never trusted for a decision
    except the key storage, and "tpm" only after verified attestation)."""

    hostname: str
    serial: str
    os: str
    key_storage: KeyStorageFact  # what the gateway believes now
    thumbprint: str


# Whether the confirming user's new device is approved at once: (user, device, browser address).
AutoApprove = Callable[[Identity, EnrolmentFacts, str], Awaitable[bool]]


class EnrolRegistry(Protocol):
    """gateway.devices.registry.DeviceRegistry (the parts enrolment uses)."""

    async def get(self, device_id: str) -> DeviceRecord | None: ...

    async def add(self, device: NewDevice) -> DeviceRecord: ...

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord: ...

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord: ...

    async def expire_pending(self, older_than: float, *, now: float) -> int: ...


class ThumbprintLookup(Protocol):
    """gateway.devices.model.DeviceStore.by_thumbprint."""

    async def by_thumbprint(self, thumbprint: str) -> DeviceRecord | None: ...


class Challenge(Protocol):
    def to_json(self) -> dict[str, str]: ...


class Attestation(Protocol):
    """gateway.devices.attestation.AttestationVerifier."""

    def challenge(
        self,
        evidence: Mapping[str, str],
        device_public_key: EllipticCurvePublicKey,
        nonce: bytes,
    ) -> tuple[Challenge, bytes]: ...

    @staticmethod
    def confirm(expected_secret: bytes, answer: object) -> bool: ...


def attestation_nonce(audience: str, public_key: EllipticCurvePublicKey) -> bytes:
    """The nonce the TPM certified with (H1's formula, gateway/devices/attestation.py)."""
    from gateway.devices.attestation import attestation_nonce as nonce_of

    return nonce_of(audience, public_key)


# -- the user code -------------------------------------------------------------------------------


def new_user_code() -> str:
    """8 characters of the RFC 8628 §6.1 alphabet (~34.6 bits), shown as XXXX-XXXX."""
    return shown_code("".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH)))


def shown_code(normalised: str) -> str:
    """A normalised code as people see it, on the agent's screen and the gateway's: XXXX-XXXX."""
    return f"{normalised[:4]}-{normalised[4:]}"


def normalise_code(text: str) -> str | None:
    """The code as typed (any case, with or without '-' or spaces) → its canonical 8 letters."""
    if len(text) > 32:
        return None
    raw = "".join(ch for ch in text.upper() if ch not in "- \t")
    if len(raw) != CODE_LENGTH or any(ch not in CODE_ALPHABET for ch in raw):
        return None
    return raw


def code_key(code: str) -> str:
    """The state-store key of a (normalised) code: its SHA-256, so the store never holds codes."""
    return hashlib.sha256(b"tabiji-device-code\x00" + code.encode()).hexdigest()


# -- the stored enrolment ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrolment:
    """One enrolment in the state store, from the agent's request to its certificate."""

    id: str
    thumbprint: str
    public_key_pem: str
    hostname: str
    serial: str
    os: str
    claimed: Literal["tpm", "software"]
    expires_at: float
    secret: str | None = None  # the expected TPM credential answer (base64), when challenged
    attested: bool = False
    attestation_error: str | None = None
    state: Literal["waiting", "confirmed"] = "waiting"
    device_id: str | None = None
    certificate: str | None = None  # the certificate handed out at approval (re-sent on re-poll)

    def key_storage(self) -> KeyStorageFact:
        if self.claimed == "software":
            return "software"
        return "tpm" if self.attested else "tpm-claimed"

    def facts(self) -> EnrolmentFacts:
        return EnrolmentFacts(
            self.hostname, self.serial, self.os, self.key_storage(), self.thumbprint
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {name: getattr(self, name) for name in self.__slots__}, separators=(",", ":")
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> Enrolment | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(**data)
        except (ValueError, TypeError):
            return None

    def replace(self, **changes: object) -> Enrolment:
        data = {name: getattr(self, name) for name in self.__slots__}
        data.update(changes)
        return Enrolment(**data)


def _text_fact(claims: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = claims.get(name, "" if not required else None)
    if not isinstance(value, str) or len(value) > MAX_FACT_CHARS or not value.isprintable():
        raise ApiError("enrol-malformed")
    if required and not value.strip():
        raise ApiError("enrol-malformed")
    return value.strip()


def request_facts(
    claims: Mapping[str, Any],
) -> tuple[str, str, str, Literal["tpm", "software"], dict[str, str] | None]:
    """hostname, serial, os, claimed key storage, attestation evidence — or enrol-malformed."""
    if set(claims) - _REQUEST_KEYS:
        raise ApiError("enrol-malformed")
    hostname = _text_fact(claims, "hostname", required=True)
    serial = _text_fact(claims, "serial", required=False)
    os_name = claims.get("os")
    if os_name not in OS_NAMES:
        raise ApiError("enrol-malformed")
    storage = claims.get("key_storage")
    if storage not in ("tpm", "software"):
        raise ApiError("enrol-malformed")
    evidence = claims.get("attestation")
    if evidence is not None and (
        not isinstance(evidence, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in evidence.items())
    ):
        raise ApiError("enrol-malformed")
    return hostname, serial, str(os_name), storage, evidence


def new_device_id() -> str:
    """A device id: short, unguessable, safe as a JWS `kid` and in a URL path."""
    return "dev-" + secrets.token_hex(10)


# -- auto-approval by policy ---------------------------------------------------------------------


def policy_auto_approve(
    *,
    holder: PolicyHolder,
    policy: str,
    geoip: GeoIP | None = None,
    clock: Callable[[], float] = time.time,
) -> AutoApprove:
    """The settings policy `devices.auto_approve_policy` as an AutoApprove: the confirming user
    is the subject, the would-be device (enrolled, not yet approved) the device."""

    async def decide(identity: Identity, facts: EnrolmentFacts, client_ip: str) -> bool:
        device = Device(
            id="(new)",
            enrolled=True,
            approved=False,
            owner=identity.email or identity.subject,
            key_storage=facts.key_storage,
        )
        request = AccessRequest(
            resource=Resource(APPROVAL_RESOURCE, "", CONFIRM_PATH, "POST"),
            subject=identity.subject_fact(),
            device=device,
            source_ip=client_ip or None,
            country=geoip.country(client_ip) if geoip is not None and client_ip else None,
        )
        now = datetime.fromtimestamp(clock(), UTC)
        return holder.current.evaluate(policy, request, now).allowed

    return decide


# -- the endpoints -------------------------------------------------------------------------------


def _enrolment_refusal(error: Exception) -> ApiError:
    """As for every device API call, except that a bad signature answers 400, not 401: here it is
    a forged proof of possession inside the request, not a device failing to authenticate."""
    refusal = api_error_of(error)
    if refusal.code == "report-bad-signature":
        return ApiError(refusal.code, 400)
    return refusal


class EnrolmentEndpoints:
    """POST /enroll, POST /enroll/poll, GET+POST /confirm, GET /enrolled under /.tabiji/devices."""

    def __init__(
        self,
        *,
        registry: EnrolRegistry,
        store: ThumbprintLookup,
        ca: CertificateAuthority,
        attestation: Attestation | None,
        state: StateStore,
        resolver: Resolver,
        pages: Pages,
        csrf: Csrf,
        origin: str,
        auto_approve: AutoApprove | None,
        auto_approve_name: str = "auto-approve",
        audit: AdminAudit,
        enrol_limiter: RateLimiterLike,
        poll_limiter: RateLimiterLike,
        confirm_limiter: RateLimiterLike,
        code_ttl: float = 900.0,
        pending_ttl: float = 7 * 86400.0,
        max_skew: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.store = store
        self.ca = ca
        self.attestation = attestation
        self.state = state
        self.resolver = resolver
        self.pages = pages
        self.csrf = csrf
        self.origin = origin.rstrip("/")
        scheme, _, authority = self.origin.partition("://")
        # The person's pages answer here only (see _off_public).
        self.public_origin = f"{scheme}://{canonical_authority(authority, scheme)}"
        self.auto_approve = auto_approve
        self.auto_approve_name = auto_approve_name
        self.audit = audit
        self.enrol_limiter = enrol_limiter
        self.poll_limiter = poll_limiter
        self.confirm_limiter = confirm_limiter
        self.code_ttl = code_ttl
        self.pending_ttl = pending_ttl
        self.max_skew = max_skew
        self.clock = clock

    def routes(self) -> list[BaseRoute]:
        return [
            Route(ENROL_PATH, self.enroll, methods=["POST"]),
            Route(POLL_PATH, self.poll, methods=["POST"]),
            Route(CONFIRM_PATH, self.confirm_page, methods=["GET"]),
            Route(CONFIRM_PATH, self.confirm, methods=["POST"]),
            Route(ENROLLED_PATH, self.enrolled_page, methods=["GET"]),
        ]

    # -- the agent's side ---------------------------------------------------------------------

    async def enroll(self, request: Request) -> Response:
        """The agent asks to enrol a key it proves it holds; answers a code for the person."""
        return await answer(
            self.pages, request, self._enroll, action="enrolment", refusal_of=_enrolment_refusal
        )

    async def _signed(
        self, request: Request, where: Where, limiter: RateLimiterLike, bucket: str
    ) -> tuple[float, EllipticCurvePublicKey, dict[str, Any]]:
        """(now, the agent's key, the claims) of a signed agent request, within the address's
        rate limit; the key is proved by the signature (proof of possession)."""
        now = self.clock()
        limited(limiter, f"{bucket}:{where.client_ip}", now)
        token = await read_jwt(request)
        key, claims = verify_enrolment(token, audience=self.origin, now=now, max_skew=self.max_skew)
        return now, key, claims

    async def _enroll(self, request: Request, where: Where) -> Response:
        now, key, claims = await self._signed(request, where, self.enrol_limiter, "enrol")
        hostname, serial, os_name, claimed, evidence = request_facts(claims)
        thumbprint = key_thumbprint(key)
        if await self.store.by_thumbprint(thumbprint) is not None:
            raise ApiError("device-key-already-enrolled")
        enrolment_id = secrets.token_urlsafe(18)
        credential, secret, attestation_error = self._challenge(claimed, evidence, key)
        enrolment = Enrolment(
            id=enrolment_id,
            thumbprint=thumbprint,
            public_key_pem=public_key_pem(key),
            hostname=hostname,
            serial=serial,
            os=os_name,
            claimed=claimed,
            expires_at=now + self.code_ttl,
            secret=secret,
            attestation_error=attestation_error,
        )
        await self.state.put(ENROL_NS, enrolment_id, enrolment.to_json(), self.code_ttl)
        user_code = await self._new_code(enrolment_id)
        record_admin(
            self.audit,
            "device.enrol",
            {
                "enrolment_id": enrolment_id,
                "thumbprint": thumbprint,
                "hostname": hostname,
                "serial": serial,
                "os": os_name,
                "key_storage": claimed,
                "attestation": "challenged" if credential else (attestation_error or "none"),
                "client_ip": where.client_ip,
            },
            actor=f"agent@{where.client_ip}",
        )
        answer: dict[str, object] = {
            "enrolment_id": enrolment_id,
            "user_code": user_code,
            "confirm_url": f"{self.origin}{CONFIRM_PATH}?{urlencode({'code': user_code})}",
            "poll_interval": POLL_INTERVAL,
            "expires_in": int(self.code_ttl),
        }
        if credential is not None:
            answer["credential"] = credential
        return json_response(self.pages, where, 201, answer)

    def _challenge(
        self,
        claimed: str,
        evidence: Mapping[str, str] | None,
        key: EllipticCurvePublicKey,
    ) -> tuple[dict[str, str] | None, str | None, str | None]:
        """(credential for the agent, expected answer, why not) for a TPM claim with evidence."""
        if claimed != "tpm":
            return None, None, None
        if evidence is None:
            return None, None, "attestation-absent"
        if self.attestation is None:
            return None, None, "attestation-not-configured"
        try:
            challenge, secret = self.attestation.challenge(
                evidence, key, attestation_nonce(self.origin, key)
            )
        except DeviceError as error:
            log.info("TPM attestation not verified: %s", error)
            return None, None, error.code
        except Exception:
            log.exception("TPM attestation check failed")
            return None, None, "attestation-malformed"
        return challenge.to_json(), secret.hex(), None

    async def _new_code(self, enrolment_id: str) -> str:
        """A fresh user code pointing at the enrolment; never overwrites another one's code."""
        for _ in range(8):
            code = new_user_code()
            key = code_key(normalise_code(code) or "")
            if await self.state.put_new(CODE_NS, key, enrolment_id.encode(), self.code_ttl):
                return code
        raise ApiError("gateway-error", 503)

    async def _load(self, enrolment_id: str) -> Enrolment | None:
        return Enrolment.from_json(await self.state.get(ENROL_NS, enrolment_id))

    async def _save(self, enrolment: Enrolment, now: float) -> None:
        ttl = enrolment.expires_at - now
        if ttl <= 0:
            raise ApiError("enrolment-expired")
        await self.state.put(ENROL_NS, enrolment.id, enrolment.to_json(), ttl)

    async def poll(self, request: Request) -> Response:
        """The agent's question: confirmed yet? approved yet? (with its credential answer)."""
        return await answer(
            self.pages, request, self._poll, action="enrolment poll", refusal_of=_enrolment_refusal
        )

    async def _poll(self, request: Request, where: Where) -> Response:
        now, key, claims = await self._signed(request, where, self.poll_limiter, "poll")
        enrolment_id = claims.get("enrolment_id")
        if (
            set(claims) - _POLL_KEYS
            or not isinstance(enrolment_id, str)
            or not 0 < len(enrolment_id) <= 64
        ):
            raise ApiError("enrol-malformed")
        enrolment = await self._load(enrolment_id)
        if enrolment is None:
            raise ApiError("enrolment-expired")
        if not secrets.compare_digest(enrolment.thumbprint, key_thumbprint(key)):
            raise ApiError("enrolment-refused")  # another key asks about this enrolment
        enrolment = await self._credential(enrolment, claims.get("credential_answer"), now)
        if enrolment.state == "waiting" or enrolment.device_id is None:
            return json_response(self.pages, where, 202, {"status": "waiting-for-user"})
        device = await self.registry.get(enrolment.device_id)
        if device is None:
            raise ApiError("enrolment-expired")
        if device.status == "revoked":
            raise ApiError("enrolment-refused")
        if device.status == "pending":
            return json_response(
                self.pages, where, 200, {"status": "pending", "device_id": device.id}
            )
        certificate = await self._certificate(enrolment, device, where, now)
        return json_response(
            self.pages,
            where,
            200,
            {
                "status": "approved",
                "device_id": device.id,
                "certificate": certificate,
                "ca": self.ca.ca_pem,
            },
        )

    async def _credential(self, enrolment: Enrolment, answer: object, now: float) -> Enrolment:
        """Check a TPM credential answer once; a device already created is upgraded to "tpm"."""
        if answer is None or enrolment.secret is None or enrolment.attested:
            return enrolment
        if self.attestation is None or not self.attestation.confirm(
            bytes.fromhex(enrolment.secret), answer
        ):
            log.info("enrolment %s: the TPM credential answer is wrong", enrolment.id)
            return enrolment
        enrolment = enrolment.replace(attested=True)
        await self._save(enrolment, now)
        if enrolment.device_id is not None:
            await self.registry.set_key_storage(enrolment.device_id, "tpm", now=now)
            record_admin(
                self.audit,
                "device.attested",
                {"device_id": enrolment.device_id, "key_storage": "tpm"},
                actor=f"device:{enrolment.device_id}",
            )
        return enrolment

    async def _certificate(
        self, enrolment: Enrolment, device: DeviceRecord, where: Where, now: float
    ) -> str:
        """The approved device's first certificate: issued once (under a lock shared by every
        replica, so two polls cannot issue two), then handed out again on a repeated poll."""
        if enrolment.certificate is not None:
            return enrolment.certificate
        async with self.state.lock(f"device-enrol-{enrolment.id}", 10.0) as won:
            if not won:
                raise ApiError("state-unavailable", 503)
            current = await self._load(enrolment.id) or enrolment
            if current.certificate is not None:
                return current.certificate
            issued = self.ca.issue(device.id, device.public_key_pem, now=now)
            await self.registry.set_certificate(device.id, issued.serial, issued.not_after, now=now)
            await self._save(current.replace(certificate=issued.cert_pem), now)
        record_admin(
            self.audit,
            "device.certificate",
            {
                "device_id": device.id,
                "serial": issued.serial,
                "not_after": int(issued.not_after),
                "renewal": False,
                "client_ip": where.client_ip,
            },
            actor=f"device:{device.id}",
        )
        return issued.cert_pem

    # -- the person's side --------------------------------------------------------------------

    def _language(self, request: Request) -> str:
        return chosen_language(self.pages, request)

    def _page(self, request: Request, where: Where, template: str, **context: Any) -> Response:
        language = self._language(request)
        headers, body = self.pages.render_page(
            template,
            language=language,
            https=where.https,
            extra_css="devices.css",
            lang_switch_href=switch_language_href(request, language),
            **context,
        )
        return respond(200, body, for_forms(headers))

    def _error(self, request: Request, where: Where, status: int, code: str) -> Response:
        return error_page(self.pages, request, https=where.https, status=status, code=code)

    def _off_public(self, request: Request, where: Where) -> Response | None:
        """404 off the public URL. /.tabiji/* answers on every route host too, where a page of
        the application is same-origin with it: its script could read the CSRF token and post
        "this is my computer" for an attacker's key in the person's host session."""
        if where.origin != self.public_origin:
            return self._error(request, where, 404, "route-not-found")
        return None

    def _login(self, where: Where, back: str) -> Response:
        # Relative, like gateway/web/guard.py: the login of this same host.
        return redirect(self.pages, f"/.tabiji/login?rd={quote(back, safe='')}", https=where.https)

    async def _identity(self, request: Request, where: Where) -> Identity | Response | None:
        """The signed-in person (a browser session: CSRF tokens are bound to it), or None."""
        try:
            identity = await self.resolver.resolve(
                list(request.scope["headers"]), where.authority, where.https, self.clock()
            )
        except GatewayError as error:
            return self._error(request, where, error.status, error.code)
        if identity is None or identity.session_hash is None:
            return None
        return identity

    async def _signed_in(
        self, request: Request, where: Where, back: str | None = None
    ) -> Identity | Response:
        """The session's person, or the response instead: an error page, or the login redirect
        that comes back to `back` (by default this very page)."""
        if (refused := self._off_public(request, where)) is not None:
            return refused
        identity = await self._identity(request, where)
        if identity is None:
            if back is None:
                back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self._login(where, back)
        return identity

    def _user_limited(self, identity: Identity) -> bool:
        key = f"confirm:{identity.issuer}|{identity.subject}"
        return not self.confirm_limiter.allow(key, self.clock())

    async def _by_code(self, code: str | None, *, take: bool) -> Enrolment | None:
        normalised = normalise_code(code or "")
        if normalised is None:
            return None
        key = code_key(normalised)
        raw = await (self.state.take if take else self.state.get)(CODE_NS, key)
        if raw is None:
            return None
        enrolment = await self._load(raw.decode("ascii", "replace"))
        if enrolment is None or enrolment.state != "waiting":
            return None
        return enrolment

    def _facts_view(
        self, enrolment: Enrolment, code: str, language: str
    ) -> list[tuple[str, str, str]]:
        """(label, value, CSS class) rows: first the code, which the agent asks the person to
        compare with its own screen, then what the agent said about the computer."""
        t = self.pages.text
        return [
            (t("ui.label-confirmation-code", language).title, shown_code(code), "mono"),
            (t("ui.label-hostname", language).title, enrolment.hostname, ""),
            (t("ui.label-serial", language).title, enrolment.serial or "—", ""),
            (t("ui.label-os", language).title, OS_NAMES.get(enrolment.os, enrolment.os), ""),
            (
                t("ui.label-key-storage", language).title,
                t(f"ui.key-storage.{enrolment.key_storage()}", language).title,
                "",
            ),
        ]

    async def confirm_page(self, request: Request) -> Response:
        """GET: the device the code names, and the "this is my computer" button."""
        where = where_of(request)
        identity = await self._signed_in(request, where)
        if isinstance(identity, Response):
            return identity
        code = request.query_params.get("code")
        language = self._language(request)
        if not code:
            return self._page(request, where, "device_confirm.html", enrolment=None, code="")
        if self._user_limited(identity):
            return self._error(request, where, 429, "device-rate-limited")
        try:
            enrolment = await self._by_code(code, take=False)
        except GatewayError as error:
            return self._error(request, where, error.status, error.code)
        if enrolment is None:
            return self._error(request, where, 410, "enrolment-code-invalid")
        assert identity.session_hash is not None  # _identity returns session identities only
        normalised = normalise_code(code) or ""  # _by_code found it: it is well-formed
        return self._page(
            request,
            where,
            "device_confirm.html",
            enrolment=enrolment,
            code=normalised,
            facts=self._facts_view(enrolment, normalised, language),
            owner=identity.email or identity.name or identity.subject,
            csrf=self.csrf.token(identity.session_hash, CSRF_PURPOSE),
            form_lang=language,
        )

    async def confirm(self, request: Request) -> Response:
        """POST: bind the device to the signed-in person; approved at once when the policy says."""
        where = where_of(request)
        form = await read_form(request, MAX_FORM_BYTES)
        code = (form or {}).get("code", "")
        identity = await self._signed_in(
            request, where, f"{CONFIRM_PATH}?{urlencode({'code': code})}"
        )
        if isinstance(identity, Response):
            return identity
        assert identity.session_hash is not None
        if form is None or not posted_by_own_page(
            self.csrf,
            form,
            request,
            where,
            session_hash=identity.session_hash,
            purpose=CSRF_PURPOSE,
        ):
            return self._error(request, where, 403, "csrf-invalid")
        if self._user_limited(identity):
            return self._error(request, where, 429, "device-rate-limited")
        try:
            return await self._confirm(request, where, identity, code, form.get("lang", ""))
        except (DeviceError, GatewayError, ApiError) as error:
            return self._error(request, where, error.status, error.code)

    async def _confirm(
        self, request: Request, where: Where, identity: Identity, code: str, language: str
    ) -> Response:
        now = self.clock()
        enrolment = await self._by_code(code, take=True)  # single use, on any replica
        if enrolment is None:
            return self._error(request, where, 410, "enrolment-code-invalid")
        facts = enrolment.facts()
        approved = False
        if self.auto_approve is not None:
            try:
                approved = await self.auto_approve(identity, facts, where.client_ip)
            except Exception:
                log.exception("the auto-approve policy failed: the device waits for IT")
        actor = identity.email or identity.subject
        device = await self.registry.add(
            NewDevice(
                id=new_device_id(),
                owner_issuer=identity.issuer,
                owner_subject=identity.subject,
                owner_email=identity.email,
                key_thumbprint=enrolment.thumbprint,
                public_key_pem=enrolment.public_key_pem,
                key_storage=facts.key_storage,
                status="approved" if approved else "pending",
                hostname=enrolment.hostname,
                serial=enrolment.serial,
                created_at=now,
                actor=f"policy:{self.auto_approve_name}" if approved else actor,
            )
        )
        # The agent keeps polling while IT decides: the enrolment now lives as long as a
        # pending device may wait.
        confirmed = enrolment.replace(
            state="confirmed", device_id=device.id, expires_at=now + self.pending_ttl
        )
        await self._save(confirmed, now)
        detail = {
            "device_id": device.id,
            "enrolment_id": enrolment.id,
            "issuer": identity.issuer,
            "subject": identity.subject,
            "email": identity.email,
            "hostname": enrolment.hostname,
            "serial": enrolment.serial,
            "key_storage": facts.key_storage,
            "status": device.status,
            "client_ip": where.client_ip,
        }
        record_admin(self.audit, "device.confirm", detail, actor=actor)
        if approved:
            record_admin(
                self.audit,
                "device.approve",
                {"device_id": device.id, "policy": self.auto_approve_name, "auto": True},
                actor=f"policy:{self.auto_approve_name}",
            )
        query = {"device": device.id}
        if language in LANGUAGES:
            query["lang"] = language
        return redirect(
            self.pages, f"{ENROLLED_PATH}?{urlencode(query)}", https=where.https, status=303
        )

    async def enrolled_page(self, request: Request) -> Response:
        """GET: the person's own device after confirmation: approved, or waiting for IT."""
        where = where_of(request)
        identity = await self._signed_in(request, where)
        if isinstance(identity, Response):
            return identity
        device_id = request.query_params.get("device", "")
        device = None
        if 0 < len(device_id) <= 64:
            try:
                device = await self.registry.get(device_id)
            except DeviceError as error:
                return self._error(request, where, error.status, error.code)
        # Only the owner sees it: anyone else gets the same answer as for an unknown id.
        if device is None or device.owner != identity.key:
            return self._error(request, where, 404, "device-unknown")
        language = self._language(request)
        t = self.pages.text
        facts = [
            (t("ui.label-hostname", language).title, device.hostname),
            (t("ui.label-serial", language).title, device.serial or "—"),
            (
                t("ui.label-key-storage", language).title,
                t(f"ui.key-storage.{device.key_storage}", language).title,
            ),
            (t("ui.label-device-id", language).title, device.id),
        ]
        return self._page(
            request,
            where,
            "device_enrolled.html",
            status_id=f"ui.device-enrolled.{device.status}",
            device_status=device.status,
            facts=facts,
        )


async def expire_pending(
    registry: EnrolRegistry,
    now: float,
    *,
    pending_ttl: float = 7 * 86400.0,
    audit: AdminAudit | None = None,
) -> int:
    """Withdraw devices IT left pending for longer than `pending_ttl` (a periodic task)."""
    expired = await registry.expire_pending(now - pending_ttl, now=now)
    if expired and audit is not None:
        record_admin(
            audit,
            "device.expire",
            {"expired": expired, "pending_ttl": int(pending_ttl)},
            actor="tabiji",
        )
    return expired
