"""The audit store for several replicas: PostgreSQL through psycopg 3 (async) and psycopg_pool.

Append-only is enforced by triggers that raise unless the transaction-local setting
`tabiji.retention = on` is set (only delete_before sets it). The one home of psycopg.
Must not import gateway.settings.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import psycopg
import psycopg_pool

from gateway.audit.batch import SealedBatch
from gateway.audit.checkpoint import Checkpoint
from gateway.audit.query import AuditFilter, AuditStats
from gateway.audit.record import AuditRecord
from gateway.audit.store import (
    CHECKPOINT_COLUMNS,
    COLUMNS,
    INDEXES,
    INTEGER_COLUMNS,
    NULLABLE_COLUMNS,
    REFUSED_SQL,
    USER_SQL,
    AuditStoreUnavailable,
    RetentionSigner,
    checkpoint_row,
    filter_sql,
    index_ddl,
    record_row,
    row_checkpoint,
    row_record,
)

PAGE: Final = 1000


def _coldef(name: str) -> str:
    kind = "BIGINT" if name in INTEGER_COLUMNS else "TEXT"
    return f"{name} {kind}" + ("" if name in NULLABLE_COLUMNS else " NOT NULL")


_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_records ("
    + ", ".join(_coldef(c) for c in COLUMNS)
    + ", PRIMARY KEY (chain_id, seq))",
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (chain_id TEXT NOT NULL, seq BIGINT NOT NULL,"
    " head_hash TEXT NOT NULL, time_us BIGINT NOT NULL, count BIGINT NOT NULL,"
    " kind TEXT NOT NULL, key_id TEXT NOT NULL, signature TEXT NOT NULL, tsa_token TEXT,"
    " PRIMARY KEY (chain_id, seq, kind))",
    *(index_ddl(*index) for index in INDEXES),
    # Records: no UPDATE ever; DELETE only inside a retention transaction.
    """CREATE OR REPLACE FUNCTION tabiji_audit_append_only() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN
         IF TG_OP = 'DELETE' AND current_setting('tabiji.retention', true) = 'on' THEN
           RETURN OLD;
         END IF;
         RAISE EXCEPTION 'audit records are append-only (%)', TG_OP;
       END $$""",
    """CREATE OR REPLACE FUNCTION tabiji_audit_frozen() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN
         RAISE EXCEPTION 'audit tables are append-only (%)', TG_OP;
       END $$""",
    "CREATE OR REPLACE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE"
    " ON audit_records FOR EACH ROW EXECUTE FUNCTION tabiji_audit_append_only()",
    "CREATE OR REPLACE TRIGGER audit_records_no_truncate BEFORE TRUNCATE"
    " ON audit_records FOR EACH STATEMENT EXECUTE FUNCTION tabiji_audit_frozen()",
    "CREATE OR REPLACE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE"
    " ON audit_checkpoints FOR EACH ROW EXECUTE FUNCTION tabiji_audit_frozen()",
    "CREATE OR REPLACE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE"
    " ON audit_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION tabiji_audit_frozen()",
)
_SELECT: Final = "SELECT " + ", ".join(COLUMNS) + " FROM audit_records"  # noqa: S608  # constant column names
_INSERT: Final = (
    f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"  # noqa: S608  # constant column names
)
_INSERT_CP: Final = (
    f"INSERT INTO audit_checkpoints ({', '.join(CHECKPOINT_COLUMNS)})"  # noqa: S608  # constant column names
    f" VALUES ({', '.join(['%s'] * len(CHECKPOINT_COLUMNS))}) ON CONFLICT DO NOTHING"
)
_SCHEMA_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresAuditStore:
    """AuditStore on PostgreSQL; `schema` (default: the server's search_path) holds the tables."""

    def __init__(
        self, url: str, *, schema: str | None = None, timeout: float = 5.0, max_size: int = 4
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"audit schema name must match {_SCHEMA_NAME.pattern}")
        self._url = url
        self._schema = schema
        self._timeout = timeout
        self._max_size = max_size
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        kwargs: dict[str, Any] = {"connect_timeout": max(1, int(self._timeout))}
        if self._schema:
            kwargs["options"] = f"-c search_path={self._schema}"
        pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] = (
            psycopg_pool.AsyncConnectionPool(
                self._url,
                kwargs=kwargs,
                min_size=1,
                max_size=self._max_size,
                timeout=self._timeout,
                open=False,
            )
        )
        try:
            await pool.open(wait=True, timeout=self._timeout)
            async with pool.connection() as conn, conn.transaction():
                # Replicas starting together: one creates the schema, the others wait.
                await conn.execute("SELECT pg_advisory_xact_lock(7261746)")
                if self._schema:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                for ddl in _DDL:
                    await conn.execute(ddl)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            await pool.close()
            raise AuditStoreUnavailable(f"audit store: {type(exc).__name__}: {exc}") from exc
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, args)
                return list(await cur.fetchall())
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise AuditStoreUnavailable(f"audit store: {type(exc).__name__}") from exc

    # ---------------------------------------------------------------- writes

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        if not records:
            return
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        sql = _INSERT + (" ON CONFLICT DO NOTHING" if ignore_existing else "")
        rows = [record_row(r) for r in records]
        try:
            async with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                await cur.executemany(sql, rows)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise AuditStoreUnavailable(f"audit store: {type(exc).__name__}") from exc

    async def append_log(
        self, batches: Sequence[SealedBatch], *, ignore_existing: bool = False, check: bool = True
    ) -> int:
        """The writer's batches as full indexed rows (PostgreSQL has no deferred log: several
        replicas write here, and each row is decoded from the same canonical bytes)."""
        rows = [row for b in batches for row in b.rows()]
        if not rows:
            return 0
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        sql = _INSERT + (" ON CONFLICT DO NOTHING" if ignore_existing else "")
        try:
            async with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                await cur.executemany(sql, rows)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise AuditStoreUnavailable(f"audit store: {type(exc).__name__}") from exc
        return 0

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_INSERT_CP, checkpoint_row(checkpoint))
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise AuditStoreUnavailable(f"audit store: {type(exc).__name__}") from exc

    async def delete_before(self, time_us: int, sign: RetentionSigner) -> dict[str, int]:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        out: dict[str, int] = {}
        async with self._pool.connection() as conn, conn.transaction():
            # Transaction-local: the trigger lets these DELETEs through, and nothing else.
            await conn.execute("SELECT set_config('tabiji.retention', 'on', true)")
            cur = await conn.execute(
                "SELECT c.chain_id, MAX(c.seq) FROM audit_checkpoints c"
                " WHERE c.time_us < %s AND c.kind <> 'retention' GROUP BY c.chain_id"
                " HAVING MAX(c.seq) > COALESCE((SELECT MAX(r.seq) FROM audit_checkpoints r"
                " WHERE r.chain_id = c.chain_id AND r.kind = 'retention'), 0)",
                (time_us,),
            )
            for chain_id, boundary in await cur.fetchall():
                head = await (
                    await conn.execute(
                        "SELECT hash FROM audit_records WHERE chain_id = %s AND seq = %s",
                        (chain_id, boundary),
                    )
                ).fetchone()
                if head is None:
                    continue
                deleted = await conn.execute(
                    "DELETE FROM audit_records WHERE chain_id = %s AND seq <= %s",
                    (chain_id, boundary),
                )
                cp = sign(str(chain_id), int(boundary), str(head[0]), deleted.rowcount)
                await conn.execute(_INSERT_CP, checkpoint_row(cp))
                out[cp.chain_id] = cp.count
        return out

    # ---------------------------------------------------------------- reads

    async def chains(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT chain_id FROM audit_records ORDER BY 1")
        return [str(r[0]) for r in rows]

    async def iter_chain(self, chain_id: str) -> AsyncIterator[AuditRecord]:
        after = -1
        while True:
            rows = await self._fetch(
                f"{_SELECT} WHERE chain_id = %s AND seq > %s ORDER BY seq LIMIT {PAGE}",
                (chain_id, after),
            )
            for row in rows:
                yield row_record(row)
            if len(rows) < PAGE:
                return
            after = int(rows[-1][1])

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        rows = await self._fetch(
            "SELECT seq, hash FROM audit_records WHERE chain_id = %s ORDER BY seq DESC LIMIT 1",
            (chain_id,),
        )
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        where, args = filter_sql(filter, "%s")
        rows = await self._fetch(
            f"{_SELECT}{where} ORDER BY time_us DESC, chain_id, seq DESC LIMIT %s OFFSET %s",
            [*args, limit, offset],
        )
        return [row_record(r) for r in rows]

    async def count(self, filter: AuditFilter) -> int:
        where, args = filter_sql(filter, "%s")
        rows = await self._fetch(f"SELECT COUNT(*) FROM audit_records{where}", args)  # noqa: S608  # constant SQL pieces; values are bound
        return int(rows[0][0])

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        rows = await self._fetch(f"{_SELECT} WHERE chain_id = %s AND seq = %s", (chain_id, seq))
        return row_record(rows[0]) if rows else None

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        where, args = filter_sql(filter, "%s")
        bucket = max(1, int(bucket_seconds)) * 1_000_000
        refused_where = (where + " AND " if where else " WHERE ") + REFUSED_SQL
        series = tuple(
            (int(b), int(t), int(d))
            for b, t, d in await self._fetch(
                f"SELECT (time_us / {bucket}) * {bucket} AS b, COUNT(*),"  # noqa: S608  # constant SQL pieces; values are bound
                f" SUM(CASE WHEN {REFUSED_SQL} THEN 1 ELSE 0 END)"
                f" FROM audit_records{where} GROUP BY b ORDER BY b",
                args,
            )
        )

        async def top(expr: str, unnest: str = "") -> tuple[tuple[str, int], ...]:
            rows = await self._fetch(
                f"SELECT {expr} AS v, COUNT(*) AS n"  # noqa: S608  # constant SQL pieces; values are bound
                f" FROM (SELECT * FROM audit_records{refused_where}) AS r{unnest}"
                f" WHERE {expr} IS NOT NULL GROUP BY v ORDER BY n DESC, v LIMIT 10",
                args,
            )
            return tuple((str(v), int(n)) for v, n in rows)

        return AuditStats(
            bucket_seconds=bucket // 1_000_000,
            series=series,
            top_users=await top(USER_SQL),
            top_devices=await top("r.device_id"),
            top_reasons=await top(
                "j.value", ", jsonb_array_elements_text(r.reasons::jsonb) AS j(value)"
            ),
            total=sum(s[1] for s in series),
            denied=sum(s[2] for s in series),
        )

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._fetch(
            f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM audit_checkpoints"  # noqa: S608  # constant column names
            " ORDER BY chain_id, seq, time_us"
        )
        return [row_checkpoint(r) for r in rows]

    async def drop_schema(self) -> None:
        """Tests: remove this store's schema and everything in it."""
        if not self._schema:
            raise ValueError("drop_schema needs an explicit schema")
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        async with self._pool.connection() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self._schema} CASCADE")
