"""What readers of the audit trail (the auditors' web view, the CLI) see: filters, stats, the
verification report, and the AuditReader protocol over a store. Must not import gateway.settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.audit.record import AuditRecord

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gateway.audit.store import AuditStore


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which records: every set field must match (AND). Times are UTC µs, `until_us` exclusive."""

    since_us: int | None = None
    until_us: int | None = None
    user: str | None = None  # equals the e-mail or the subject
    device: str | None = None  # equals the device id
    route: str | None = None  # equals the route name
    decision: str | None = None  # "allow" | "deny" | "error" | "info"
    reason: str | None = None  # one of the record's reason codes
    kind: str | None = None  # "request" | "admin" | "view"
    text: str | None = None  # substring of path, host, request id or action


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Charts for a filter: counts per time bucket and the most refused users, devices, reasons."""

    bucket_seconds: int
    # (bucket_start_us, total, denied), oldest first; denied = decision "deny" or "error"
    series: tuple[tuple[int, int, int], ...]
    top_users: tuple[tuple[str, int], ...]  # refused requests per user, most first
    top_devices: tuple[tuple[str, int], ...]
    top_reasons: tuple[tuple[str, int], ...]
    total: int
    denied: int  # refused: decision "deny" or "error"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """The first place the trail does not hold: which chain, which seq, what kind of damage."""

    chain_id: str
    seq: int
    what: str  # stable code: see gateway/audit/verify.py PROBLEMS
    detail: str = ""  # for operators: hashes, the checkpoint concerned


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of walking every chain and checking every signed checkpoint."""

    ok: bool
    records_checked: int
    chains_checked: int
    checkpoints_checked: int
    first_bad: BadRecord | None
    last_checkpoint_us: int | None  # the newest signed checkpoint's time (None: none yet)
    checked_at_us: int = 0


class AuditReader(Protocol):
    """Read side of the audit trail. Results are newest first; `offset`/`limit` page them."""

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        """Records matching the filter, newest first."""

    async def count(self, filter: AuditFilter) -> int:
        """How many records match."""

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        """One record, or None."""

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        """Counts per bucket and the top refused users/devices/reasons."""

    async def verify_status(self) -> VerifyReport:
        """Whether the chains and checkpoints verify (may be cached for a short while)."""


class StoreReader:
    """AuditReader over an AuditStore; `verify_status` is re-run at most every `verify_ttl` s
    (a full verify walks every record, too slow for each page view)."""

    def __init__(
        self,
        store: AuditStore,
        public_key: Ed25519PublicKey | Mapping[str, Ed25519PublicKey] | None,
        export_path: Path | None = None,
        *,
        verify_ttl: float = 60.0,
    ) -> None:
        self._store = store
        self._public_key = public_key
        self._export_path = export_path
        self._verify_ttl = verify_ttl
        self._cached: tuple[float, VerifyReport] | None = None

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        return await self._store.query(filter, limit, offset)

    async def count(self, filter: AuditFilter) -> int:
        return await self._store.count(filter)

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        return await self._store.get(chain_id, seq)

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        return await self._store.stats(filter, bucket_seconds)

    async def verify_status(self) -> VerifyReport:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self._verify_ttl:
            return self._cached[1]
        from gateway.audit.verify import verify

        report = await verify(self._store, self._public_key, self._export_path)
        self._cached = (now, report)
        return report
