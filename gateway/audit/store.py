"""The AuditStore interface (SQLite: store_sqlite.py, PostgreSQL: store_postgres.py), the row
layout and filter SQL they share, and `open_audit_store(url, base_dir)`. No gateway.settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from gateway.audit.batch import SealedBatch
from gateway.audit.checkpoint import Checkpoint
from gateway.audit.query import AuditFilter, AuditStats
from gateway.audit.record import EVENT_FIELDS, AuditRecord, event_from_values


class AuditStoreUnavailable(Exception):
    """The store could not be reached or refused a write: the writer spools and retries."""

    code = "audit-unavailable"


# Called by delete_before for each chain it trims: (chain_id, last deleted seq, its hash,
# how many deleted) -> a signed "retention" checkpoint, stored in the same transaction.
RetentionSigner = Callable[[str, int, str, int], Checkpoint]


class AuditStore(Protocol):
    """Append-only storage of sealed records and signed checkpoints."""

    async def open(self) -> None:
        """Connect, create tables, indexes and the append-only triggers. Idempotent."""

    async def close(self) -> None:
        """Release connections."""

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        """Insert all records in one transaction (all or nothing). `ignore_existing` skips
        (chain_id, seq) already present: draining a spool that was partly committed."""

    async def append_log(
        self, batches: Sequence[SealedBatch], *, ignore_existing: bool = False, check: bool = True
    ) -> int:
        """The writer's path: sealed batches in one transaction; returns the records not yet
        indexed (SQLite defers indexing; PostgreSQL writes indexed rows and returns 0)."""

    async def chains(self) -> list[str]:
        """Every chain id with records, sorted."""

    def iter_chain(self, chain_id: str) -> AsyncIterator[AuditRecord]:
        """A chain's records in seq order, streamed in pages (never the whole table at once)."""

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        """(seq, hash) of a chain's last record, or None."""

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        """Matching records, newest first."""

    async def count(self, filter: AuditFilter) -> int:
        """How many records match."""

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        """One record."""

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        """Series and top refused users, devices and reasons."""

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a signed checkpoint."""

    async def checkpoints(self) -> list[Checkpoint]:
        """Every stored checkpoint, by chain then seq."""

    async def delete_before(self, time_us: int, sign: RetentionSigner) -> dict[str, int]:
        """Retention: per chain, delete the records up to the newest checkpoint made before
        `time_us` (never past a checkpoint boundary) and store a signed retention checkpoint in
        the same transaction, so verify can start the chain there. Returns deleted per chain."""


# --------------------------------------------------------------------------- shared row layout

COLUMNS: Final[tuple[str, ...]] = ("chain_id", "seq", "prev_hash", "hash", *EVENT_FIELDS)
_JSON_COLUMNS: Final = frozenset({"groups", "reasons", "detail"})
# The column types both stores share: which columns may be NULL, which hold integers.
NULLABLE_COLUMNS: Final = frozenset(
    {
        "query",
        "country",
        "user_issuer",
        "user_subject",
        "user_email",
        "session_hash",
        "device_id",
        "posture",
        "posture_age_s",
        "policy_hash",
        "rule",
        "action",
        "actor",
    }
)
INTEGER_COLUMNS: Final = frozenset(
    {"seq", "time_us", "posture_age_s", "status", "bytes_in", "bytes_out", "latency_us"}
)
_JSON_IDX: Final = tuple(i for i, c in enumerate(COLUMNS) if c in _JSON_COLUMNS)
# (name, columns, partial-index condition or ""). The user and device indexes leave out the rows
# without a user or device (public routes, refusals before sign-in): a filter on those columns
# (`col = value`) never matches NULL, and both SQLite and PostgreSQL prove `col IS NOT NULL`
# from it, so the index still serves it. Each index skipped saves an index insert per record on
# the request path's writer. Stores made before keep their full indexes (CREATE ... IF NOT EXISTS).
INDEXES: Final[tuple[tuple[str, str, str], ...]] = (
    ("audit_records_time", "time_us", ""),
    ("audit_records_email", "user_email, time_us", "user_email IS NOT NULL"),
    ("audit_records_subject", "user_subject, time_us", "user_subject IS NOT NULL"),
    ("audit_records_route", "route, time_us", ""),
    ("audit_records_decision", "decision, time_us", ""),
    ("audit_records_device", "device_id, time_us", "device_id IS NOT NULL"),
)


def index_ddl(name: str, columns: str, where: str) -> str:
    """CREATE INDEX for one INDEXES entry (the same statement for SQLite and PostgreSQL)."""
    return f"CREATE INDEX IF NOT EXISTS {name} ON audit_records ({columns})" + (
        f" WHERE {where}" if where else ""
    )


CHECKPOINT_COLUMNS: Final = (
    "chain_id",
    "seq",
    "head_hash",
    "time_us",
    "count",
    "kind",
    "key_id",
    "signature",
    "tsa_token",
)


def record_row(record: AuditRecord) -> tuple[Any, ...]:
    """A record as one row in COLUMNS order (JSON text for groups, reasons, detail)."""
    e = record.event
    dumps = orjson.dumps
    return (
        record.chain_id,
        record.seq,
        record.prev_hash,
        record.hash,
        e.kind,
        e.time_us,
        e.request_id,
        e.route,
        e.method,
        e.host,
        e.path,
        e.query,
        e.client_ip,
        e.country,
        e.user_issuer,
        e.user_subject,
        e.user_email,
        dumps(e.groups).decode(),
        e.session_hash,
        e.device_id,
        e.posture,
        e.posture_age_s,
        e.policy_hash,
        e.rule,
        e.decision,
        dumps(e.reasons).decode(),
        e.status,
        e.bytes_in,
        e.bytes_out,
        e.action,
        e.actor,
        dumps(e.detail, option=orjson.OPT_SORT_KEYS).decode(),
        e.latency_us,
    )


def row_record(row: Sequence[Any]) -> AuditRecord:
    """Inverse of record_row. The columns ARE the record: verify re-hashes what is read here, so
    an edit of any column (even one only used for filtering) breaks the chain."""
    d = dict(zip(COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        d[name] = orjson.loads(d[name])
    return AuditRecord(
        event=event_from_values(d),
        chain_id=d["chain_id"],
        seq=int(d["seq"]),
        prev_hash=d["prev_hash"],
        hash=d["hash"],
    )


def checkpoint_row(cp: Checkpoint) -> tuple[Any, ...]:
    return tuple(cp.to_dict()[c] for c in CHECKPOINT_COLUMNS)


def row_checkpoint(row: Sequence[Any]) -> Checkpoint:
    return Checkpoint.from_dict(dict(zip(CHECKPOINT_COLUMNS, row, strict=True)))


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def filter_sql(filter: AuditFilter, ph: str) -> tuple[str, list[Any]]:
    """A WHERE clause (or "") and its parameters; `ph` is the placeholder ("?" or "%s")."""
    where: list[str] = []
    args: list[Any] = []
    if filter.since_us is not None:
        where.append(f"time_us >= {ph}")
        args.append(filter.since_us)
    if filter.until_us is not None:
        where.append(f"time_us < {ph}")
        args.append(filter.until_us)
    if filter.user:
        where.append(f"(user_email = {ph} OR user_subject = {ph})")
        args += [filter.user, filter.user]
    for col, value in (
        ("device_id", filter.device),
        ("route", filter.route),
        ("decision", filter.decision),
        ("kind", filter.kind),
    ):
        if value:
            where.append(f"{col} = {ph}")
            args.append(value)
    if filter.reason:
        # reasons is a JSON array of kebab-case codes: match the quoted element exactly.
        where.append(f"reasons LIKE {ph} ESCAPE '\\'")
        args.append(_like(orjson.dumps(filter.reason).decode()))
    if filter.text:
        pattern = _like(filter.text)
        where.append(
            "("
            + " OR ".join(
                f"{c} LIKE {ph} ESCAPE '\\'" for c in ("path", "host", "request_id", "action")
            )
            + ")"
        )
        args += [pattern] * 4
    return (" WHERE " + " AND ".join(where)) if where else "", args


REFUSED_SQL: Final = "decision IN ('deny', 'error')"
USER_SQL: Final = "COALESCE(user_email, user_subject)"


def open_audit_store(url: str, base_dir: Path) -> AuditStore:
    """`sqlite:///relative/or/absolute.db` (relative to `base_dir`; four slashes for an absolute
    path) or `postgresql://…` (psycopg conninfo URL). Not opened yet: call `await store.open()`."""
    if url.startswith("sqlite:///"):
        from gateway.audit.store_sqlite import SqliteAuditStore

        raw = url[len("sqlite:///") :]
        path = Path(raw)
        return SqliteAuditStore(path if path.is_absolute() else base_dir / path)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.audit.store_postgres import PostgresAuditStore

        return PostgresAuditStore(url)
    raise ValueError(f"audit store URL must start with sqlite:/// or postgresql:// (got {url!r})")
