"""The pipeline's device stage: which enrolled device a request comes from, proved one of three
ways — a per-request DPoP-shaped proof, a client certificate forwarded by a trusted ingress, or
the device bound to the browser session — checked against the registry's in-memory cache.

O(1) and free of I/O on the hot path except the proof's single-use `jti` (the shared state
store, so every replica agrees). Only on the way to a refusal — a device this replica's copy does
not know yet, or a decision the pipeline is about to deny (`recheck`) — is that one device
re-read from the store (rate-limited by the registry), so what another replica just accepted is
honoured on the next request. Must not import gateway.settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import (
    PROOF_TYPE,
    PostureFacts,
    ReportInvalid,
    unverified_device_id,
    verify_proof,
)
from gateway.context import DeviceChannel, DeviceContext, Peer
from gateway.devices.model import DeviceError, DeviceRecord
from gateway.errors import AccessDenied, GatewayError
from gateway.identity.model import Identity
from gateway.target import Target

log = logging.getLogger("tabiji.devices")

PROOF_HEADER = b"dpop"
DPOP_NS = "dpop"  # state store namespace: device id + proof jti already used
# Audit-only notes (the precise cause beside the reason a person sees).
NOTE_REGISTRY_STALE = "device-registry-stale"
NOTE_BINDING_EXPIRED = "device-binding-expired"
NOTE_BINDING_UNKNOWN = "device-binding-unknown"
NOTE_PROOF_REPLAYED = "proof-replayed"
NOTE_PROOF_MULTIPLE = "proof-multiple"
NOTE_CERT_MULTIPLE = "certificate-multiple"
NOTE_DEVICE_UNKNOWN = "device-unknown"
_CONTEXT_CACHE_SIZE = 10_000


class RegistryView(Protocol):
    """What the stage needs of gateway.devices.registry.DeviceRegistry: cache reads only."""

    @property
    def fresh(self) -> bool: ...

    def get_cached(self, device_id: str) -> DeviceRecord | None: ...

    async def reread(self, device_id: str) -> DeviceRecord | None: ...

    def key_of(self, record: DeviceRecord) -> ec.EllipticCurvePublicKey: ...

    def seen(self, device_id: str, now: float) -> None: ...


class VerifiedCertificateLike(Protocol):
    @property
    def serial(self) -> str: ...

    @property
    def device_id(self) -> str: ...


class CertificateVerifier(Protocol):
    """gateway.devices.ca.DeviceCA: checks a device certificate (cached per certificate)."""

    def verify(self, cert: str | bytes, *, now: float) -> VerifiedCertificateLike: ...


class ReplayCache(Protocol):
    """The part of gateway.state.base.StateStore a replay cache needs."""

    async def put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool: ...


class SessionBindings(Protocol):
    """gateway.identity.sessions.SessionManager: the device bound to a (cached) session."""

    def device_binding(self, session_hash: str) -> tuple[str, float] | None: ...


class DeviceRefused(AccessDenied):
    """A device credential was presented and fails (or names someone else's or a revoked
    device): refused outright, never downgraded to "no device" (like an invalid bearer token).

    `reasons` are what the person sees; `notes` the precise causes for the audit record.
    """

    def __init__(
        self,
        *,
        reasons: tuple[str, ...],
        notes: tuple[str, ...] = (),
        device_id: str | None = None,
        status: int = 403,
        www_authenticate: str | None = None,
    ) -> None:
        super().__init__(reasons, detail=", ".join((*reasons, *notes)))
        self.status = status
        self.notes = notes
        self.device_id = device_id
        self.www_authenticate = www_authenticate


class DeviceCheckRequired(GatewayError):
    """A browser session without a (fresh) device binding, on a route whose decision needs a
    device: its navigation is sent to the device check (302), silently attested by the agent."""

    code = "device-check-required"
    status = 302

    def __init__(self, location: str, reasons: tuple[str, ...]) -> None:
        super().__init__("device check required")
        self.location = location
        self.reasons = reasons


@dataclass(frozen=True, slots=True)
class DeviceCheck:
    """The stage's answer: the device (or None), how it was proved, notes for the audit record,
    and whether a browser session should be sent to attest its device (no fresh binding)."""

    device: DeviceContext | None = None
    channel: DeviceChannel | None = None
    notes: tuple[str, ...] = ()
    binding_needed: bool = False


NO_DEVICE = DeviceCheck()
NEEDS_BINDING = DeviceCheck(binding_needed=True)
STALE = DeviceCheck(notes=(NOTE_REGISTRY_STALE,))


def _on_off(value: bool | None) -> str:
    return "?" if value is None else "on" if value else "off"


def posture_summary(facts: PostureFacts | None) -> str | None:
    """A short line for the audit record: "linux 12 disk=on fw=on lock=300s" (? = unknown)."""
    if facts is None:
        return None
    system = " ".join(part for part in (facts.os, facts.os_version) if part) or "?"
    if facts.screen_lock is False:
        lock = "off"
    elif facts.screen_lock_timeout is not None:
        lock = f"{facts.screen_lock_timeout}s"
    else:
        lock = _on_off(facts.screen_lock)
    return f"{system} disk={_on_off(facts.disk_encrypted)} fw={_on_off(facts.firewall)} lock={lock}"


def device_context(record: DeviceRecord) -> DeviceContext:
    """The pipeline's view of one registry record."""
    return DeviceContext(
        id=record.id,
        owner=record.owner,
        fact=record.policy_fact(),
        key_storage=record.key_storage,
        posture_summary=posture_summary(record.posture),
        posture_at=record.posture_at,
        version=record.version,
    )


def _proof_refused(code: str, device_id: str | None) -> DeviceRefused:
    # RFC 9449 §7.1: an unacceptable proof is answered 401 with a DPoP challenge.
    return DeviceRefused(
        reasons=("device-proof-invalid",),
        notes=(code,),
        device_id=device_id,
        status=401,
        www_authenticate='DPoP algs="ES256", error="invalid_dpop_proof"',
    )


def _cert_refused(code: str, device_id: str | None = None) -> DeviceRefused:
    return DeviceRefused(
        reasons=("device-certificate-invalid",), notes=(code,), device_id=device_id
    )


class DeviceStage:
    """Finds and checks the device of one request (see the module docstring for the order)."""

    def __init__(
        self,
        *,
        registry: RegistryView,
        replay: ReplayCache,
        sessions: SessionBindings | None,
        certificates: CertificateVerifier | None = None,
        client_cert_header: str | None = None,
        binding_max_age: float = 8 * 3600.0,
        proof_max_age: float = 60.0,
        proof_max_skew: float = 5.0,
    ) -> None:
        self._registry = registry
        self._replay = replay
        self._sessions = sessions
        self._certificates = certificates
        self._cert_header = client_cert_header.lower().encode() if client_cert_header else None
        self._binding_max_age = binding_max_age
        self._proof_max_age = int(proof_max_age)
        self._proof_max_skew = int(proof_max_skew)
        # The replay cache must outlive every proof it could still accept.
        self._jti_ttl = float(self._proof_max_age + self._proof_max_skew + 5)
        self._contexts: dict[str, tuple[DeviceRecord, DeviceContext]] = {}

    @property
    def dropped_headers(self) -> frozenset[bytes]:
        """Device credentials for the gateway only: never forwarded upstream."""
        names = {PROOF_HEADER}
        if self._cert_header is not None:
            names.add(self._cert_header)
        return frozenset(names)

    def _context(self, record: DeviceRecord) -> DeviceContext:
        cached = self._contexts.get(record.id)
        if cached is not None and cached[0] is record:
            return cached[1]
        context = device_context(record)
        if len(self._contexts) >= _CONTEXT_CACHE_SIZE:
            self._contexts.clear()  # bounded; refilled by the devices still active
        self._contexts[record.id] = (record, context)
        return context

    async def check(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        peer: Peer,
        target: Target,
        method: str,
        identity: Identity | None,
        now: float,
    ) -> DeviceCheck:
        """The request's device, or a DeviceRefused for a credential that fails."""
        proofs: list[bytes] | None = None
        certs: list[bytes] | None = None
        cert_header = self._cert_header
        for name, value in headers:
            if name == PROOF_HEADER:
                proofs = [value] if proofs is None else [*proofs, value]
            elif name == cert_header:
                certs = [value] if certs is None else [*certs, value]
        # RFC 7239 §8.1 spirit: only a trusted ingress may speak for the client's certificate.
        if certs is not None and not peer.via_trusted_proxy:
            certs = None
        if certs is not None and all(not value.strip() for value in certs):
            certs = None  # nginx sends an empty value when the client offered no certificate
        if proofs is None and certs is None:
            return await self._from_session(identity, now)
        if not self._registry.fresh:
            # Fail closed: no key or status can be trusted from a cache that stopped following.
            return STALE
        if proofs is not None:
            record = await self._from_proof(proofs, peer, target, method, now)
            channel: DeviceChannel = "proof"
        else:
            record = await self._from_certificate(certs or [], now)
            channel = "certificate"
        return self._accept(record, channel, identity, now)

    def _accept(
        self, record: DeviceRecord, channel: DeviceChannel, identity: Identity | None, now: float
    ) -> DeviceCheck:
        if record.status == "revoked":
            raise DeviceRefused(reasons=("device-revoked",), device_id=record.id)
        # A device bound to one user never serves another user's request.
        if identity is not None and record.owner != identity.key:
            raise DeviceRefused(reasons=("device-not-owned",), device_id=record.id)
        self._registry.seen(record.id, now)
        return DeviceCheck(self._context(record), channel)

    async def recheck(
        self, check: DeviceCheck, *, identity: Identity | None, now: float
    ) -> DeviceCheck | None:
        """For a request the policy is about to deny: the same device as the store has it now,
        when that is newer than what the decision saw (a posture report or approval another
        replica just accepted); None when nothing newer is known. Raises DeviceRefused if the
        newer record is revoked or no longer the user's. Never called for an allowed request."""
        if check.device is None or check.channel is None:
            return None
        record = await self._registry.reread(check.device.id)
        if record is None or record.version <= check.device.version:
            return None
        return self._accept(record, check.channel, identity, now)

    async def _known(self, device_id: str) -> DeviceRecord | None:
        """The cached device, else (about to refuse it as unknown) one re-read from the store."""
        record = self._registry.get_cached(device_id)
        if record is None:
            record = await self._registry.reread(device_id)
        return record

    async def _from_session(self, identity: Identity | None, now: float) -> DeviceCheck:
        if identity is None or identity.method != "session" or identity.session_hash is None:
            return NO_DEVICE  # programs prove their device per request; browsers by binding
        binding = (
            self._sessions.device_binding(identity.session_hash)
            if self._sessions is not None
            else None
        )
        if binding is None:
            return NEEDS_BINDING
        if not self._registry.fresh:
            return STALE
        device_id, bound_at = binding
        if now - bound_at > self._binding_max_age:
            return DeviceCheck(notes=(NOTE_BINDING_EXPIRED,), binding_needed=True)
        record = await self._known(device_id)
        if record is None:
            return DeviceCheck(notes=(NOTE_BINDING_UNKNOWN,), binding_needed=True)
        return self._accept(record, "session", identity, now)

    async def _from_proof(
        self, proofs: list[bytes], peer: Peer, target: Target, method: str, now: float
    ) -> DeviceRecord:
        if len(proofs) != 1:
            raise _proof_refused(NOTE_PROOF_MULTIPLE, None)  # RFC 9449 §4.3 check 1
        token = proofs[0].decode("latin-1").strip()
        device_id: str | None = None
        try:
            device_id = unverified_device_id(token, PROOF_TYPE)
            record = await self._known(device_id)
            if record is None:
                raise _proof_refused(NOTE_DEVICE_UNKNOWN, device_id)
            key = self._registry.key_of(record)
            # htu: the URL as the client addressed the gateway (trusted-proxy aware), no query.
            url = f"{peer.scheme}://{peer.authority}{target.path}"
            proof = verify_proof(
                token,
                key,
                device_id=device_id,
                method=method,
                url=url,
                now=now,
                max_age=self._proof_max_age,
                max_skew=self._proof_max_skew,
            )
        except (ReportInvalid, DeviceError) as error:
            raise _proof_refused(error.code, device_id) from None
        # RFC 9449 §11.1: each proof once, across every worker and replica.
        fresh = await self._replay.put_new(
            DPOP_NS, f"{device_id}:{proof.proof_id}", b"1", self._jti_ttl
        )
        if not fresh:
            raise _proof_refused(NOTE_PROOF_REPLAYED, device_id)
        return record

    async def _from_certificate(self, certs: list[bytes], now: float) -> DeviceRecord:
        if len(certs) != 1:
            raise _cert_refused(NOTE_CERT_MULTIPLE)
        if self._certificates is None:
            raise _cert_refused("device-ca-unavailable")
        try:
            verified = self._certificates.verify(certs[0].decode("latin-1").strip(), now=now)
        except DeviceError as error:
            raise _cert_refused(error.code, error.device_id or None) from None
        record = await self._known(verified.device_id)
        if record is None:
            raise _cert_refused(NOTE_DEVICE_UNKNOWN, verified.device_id)
        return record
