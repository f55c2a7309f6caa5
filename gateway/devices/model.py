"""The device registry's values and interfaces: what the gateway knows of each enrolled device.

Value types and Protocols only (no I/O): the stores (SQLite, PostgreSQL), the registry service,
the enrolment and posture endpoints and the pipeline's device stage all meet here.
Must not import gateway.settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal, Protocol

from device_agent.report import PostureFacts
from policies.model import Device, Posture

DeviceStatus = Literal["pending", "approved", "revoked"]
# What the gateway *believes* about where the key lives: "tpm" only after verified TPM
# attestation; an unverified claim stays "tpm-claimed" (issue #6, README threat model).
KeyStorageFact = Literal["tpm", "tpm-claimed", "software"]
STATUSES: tuple[DeviceStatus, ...] = ("pending", "approved", "revoked")


class DeviceError(Exception):
    """A refused device operation: `code` is a stable kebab-case reason (API answers, audit)."""

    status = 400

    def __init__(
        self, code: str, detail: str = "", status: int | None = None, *, device_id: str = ""
    ) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.device_id = device_id  # the device concerned, once a signature has proved which
        if status is not None:
            self.status = status


class RegistryUnavailable(DeviceError):
    """The device store cannot be reached: every device fact is unknown (fail closed)."""

    status = 503

    def __init__(self, detail: str = "") -> None:
        super().__init__("device-registry-unavailable", detail)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device as the registry keeps it. Times are unix seconds (the gateway's clock)."""

    id: str
    owner_issuer: str
    owner_subject: str
    key_thumbprint: str  # RFC 7638, unique across the registry
    public_key_pem: str
    key_storage: KeyStorageFact
    status: DeviceStatus
    created_at: float
    owner_email: str | None = None
    hostname: str = ""
    serial: str = ""  # self-reported: shown to IT, never trusted for a decision
    tags: frozenset[str] = frozenset()
    approved_at: float | None = None
    revoked_at: float | None = None
    last_seen: float | None = None
    cert_serial: str | None = None  # hex serial of the current device certificate
    cert_not_after: float | None = None
    posture: PostureFacts | None = None
    posture_at: float | None = None  # when the gateway accepted the latest report
    posture_reported_at: float | None = None  # the laptop's own `iat` of that report
    posture_counter: int = -1  # the last accepted report counter; a new one must be larger
    loopback_port: int | None = None  # where the agent answers browser attestations
    version: int = 0  # the store's change sequence number at the last change (cache refresh)
    actor: str = ""  # who made the last administrative change (for the admin page)

    @property
    def owner(self) -> tuple[str, str]:
        return (self.owner_issuer, self.owner_subject)

    def with_changes(self, **changes: object) -> DeviceRecord:
        return replace(self, **changes)  # type: ignore[arg-type]

    def policy_fact(self) -> Device:
        """The policy engine's view of this device (policies.model.Device)."""
        facts = self.posture
        posture = None
        if facts is not None:
            posture = Posture(
                os=facts.os,
                os_version=facts.os_version,
                disk_encrypted=facts.disk_encrypted,
                firewall=facts.firewall,
                screen_lock_timeout=_lock_timeout(facts),
                auto_update=facts.auto_update,
                patch_age_days=facts.patch_age_days,
                agent_version=facts.agent_version,
                reported_at=(
                    datetime.fromtimestamp(self.posture_at, UTC)
                    if self.posture_at is not None
                    else None
                ),
            )
        return Device(
            id=self.id,
            enrolled=self.status != "revoked",
            approved=self.status == "approved",
            revoked=self.status == "revoked",
            owner=self.owner_email or self.owner_subject,
            tags=self.tags,
            key_storage=self.key_storage,
            posture=posture,
        )


def _lock_timeout(facts: PostureFacts) -> int | None:
    # A lock that is switched off waits forever: policies read "0 or less" as "never locks".
    if facts.screen_lock is False:
        return 0
    return facts.screen_lock_timeout


@dataclass(frozen=True, slots=True)
class NewDevice:
    """What enrolment hands the store to create a device (status pending or approved)."""

    id: str
    owner_issuer: str
    owner_subject: str
    owner_email: str | None
    key_thumbprint: str
    public_key_pem: str
    key_storage: KeyStorageFact
    status: DeviceStatus
    hostname: str
    serial: str
    created_at: float
    tags: frozenset[str] = field(default_factory=frozenset)
    actor: str = ""


class DeviceStore(Protocol):
    """Where devices live: SQLite (embedded default) or PostgreSQL (several replicas).

    Every write bumps a store-wide change sequence (`version`) so replicas' caches can follow
    `changed_since`. Store errors raise RegistryUnavailable; nothing is half-written.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def add(self, device: NewDevice) -> DeviceRecord:
        """Create a device; DeviceError('device-key-already-enrolled', status=409) if the key
        thumbprint is taken."""
        ...

    async def get(self, device_id: str) -> DeviceRecord | None: ...

    async def by_thumbprint(self, thumbprint: str) -> DeviceRecord | None: ...

    async def by_cert_serial(self, serial: str) -> DeviceRecord | None: ...

    async def list(
        self,
        *,
        status: DeviceStatus | None = None,
        owner: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> Sequence[DeviceRecord]: ...

    async def set_status(
        self, device_id: str, status: DeviceStatus, *, now: float, actor: str
    ) -> DeviceRecord | None:
        """Approve or revoke. A revoked device never comes back (returns None for it)."""
        ...

    async def set_tags(
        self, device_id: str, tags: frozenset[str], *, now: float, actor: str
    ) -> DeviceRecord | None: ...

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord | None: ...

    async def accept_posture(
        self,
        device_id: str,
        *,
        counter: int,
        facts: PostureFacts,
        reported_at: float,
        received_at: float,
        loopback_port: int | None,
    ) -> DeviceRecord | None:
        """Store a verified report atomically iff its counter is larger than the last one and the
        device is not revoked; None otherwise (the caller says which)."""
        ...

    async def touch(self, seen: Sequence[tuple[str, float]]) -> None:
        """Record last-seen times in one batch (off the request path)."""
        ...

    async def expire_pending(self, older_than: float, *, now: float) -> int:
        """Revoke pending devices created before `older_than`; returns how many."""
        ...

    async def changed_since(self, version: int) -> tuple[Sequence[DeviceRecord], int]:
        """Devices changed after `version`, and the store's current version."""
        ...
