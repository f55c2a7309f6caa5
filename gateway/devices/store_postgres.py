"""The device store for several replicas: PostgreSQL through psycopg 3 (async) and psycopg_pool.

Versions come from a sequence; every write first takes a transaction-level advisory lock, so
versions are committed in the order they are handed out and a reader never sees version n+1
before n (`changed_since` would otherwise skip n forever). The statements themselves are
SqlDeviceStore's. A home of psycopg (with the audit store). Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psycopg
import psycopg_pool

from gateway.devices.model import DeviceRecord, NewDevice, RegistryUnavailable
from gateway.devices.store_rows import (
    COLUMNS,
    already_enrolled,
    check_new,
    new_row,
    row_or_marker,
    row_record,
)
from gateway.devices.store_sql import Row, SqlDeviceStore

_SCHEMA_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# tags and posture are JSONB (queryable by hand); read back as text for the shared codec.
_SELECT_COLUMNS: Final = ", ".join(f"{c}::text" if c in ("tags", "posture") else c for c in COLUMNS)
_SELECT: Final = f"SELECT {_SELECT_COLUMNS} FROM devices"  # noqa: S608  # constant column names
_RETURNING: Final = f" RETURNING {_SELECT_COLUMNS}"
_NEXT: Final = "nextval('device_version_seq')"
_INSERT: Final = (
    f"INSERT INTO devices ({', '.join(COLUMNS)}) VALUES ("  # noqa: S608  # constant column names; values are bound
    + ", ".join(
        "%s::jsonb" if c in ("tags", "posture") else (_NEXT if c == "version" else "%s")
        for c in COLUMNS
    )
    + ")"
)
_DDL: Final = (
    "CREATE SEQUENCE IF NOT EXISTS device_version_seq",
    """CREATE TABLE IF NOT EXISTS devices (
        id TEXT PRIMARY KEY,
        owner_issuer TEXT NOT NULL,
        owner_subject TEXT NOT NULL,
        key_thumbprint TEXT NOT NULL UNIQUE,
        public_key_pem TEXT NOT NULL,
        key_storage TEXT NOT NULL CHECK (key_storage IN ('tpm', 'tpm-claimed', 'software')),
        status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'revoked')),
        created_at DOUBLE PRECISION NOT NULL,
        owner_email TEXT,
        hostname TEXT NOT NULL,
        serial TEXT NOT NULL,
        tags JSONB NOT NULL DEFAULT '[]',
        approved_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION,
        last_seen DOUBLE PRECISION,
        cert_serial TEXT,
        cert_not_after DOUBLE PRECISION,
        posture JSONB,
        posture_at DOUBLE PRECISION,
        posture_reported_at DOUBLE PRECISION,
        posture_counter BIGINT NOT NULL DEFAULT -1,
        loopback_port INTEGER,
        version BIGINT NOT NULL,
        actor TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS devices_version ON devices (version)",
    "CREATE INDEX IF NOT EXISTS devices_owner ON devices (owner_issuer, owner_subject)",
    "CREATE INDEX IF NOT EXISTS devices_cert_serial ON devices (cert_serial)",
    "CREATE INDEX IF NOT EXISTS devices_status_created ON devices (status, created_at)",
    """CREATE OR REPLACE FUNCTION tabiji_devices_revoked_is_final() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN
         IF OLD.status = 'revoked' AND NEW.status <> 'revoked' THEN
           RAISE EXCEPTION 'a revoked device stays revoked';
         END IF;
         RETURN NEW;
       END $$""",
    "CREATE OR REPLACE TRIGGER devices_revoked_is_final BEFORE UPDATE OF status ON devices"
    " FOR EACH ROW EXECUTE FUNCTION tabiji_devices_revoked_is_final()",
)


class PostgresDeviceStore(SqlDeviceStore):
    """DeviceStore on PostgreSQL; `schema` (default: the server's search_path) holds the tables."""

    placeholder = "%s"
    json_placeholder = "%s::jsonb"  # tags and posture are JSONB
    greatest = "GREATEST"
    select = _SELECT

    def __init__(
        self, url: str, *, schema: str | None = None, timeout: float = 5.0, max_size: int = 4
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"device store schema name must match {_SCHEMA_NAME.pattern}")
        self._url = url
        self._schema = schema
        self._timeout = timeout
        self._max_size = max_size
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._lock_key = 0  # the advisory lock that orders writes, per schema
        self._opening = asyncio.Lock()  # first requests arriving together open one pool

    async def open(self) -> None:
        async with self._opening:
            await self._open()

    async def _open(self) -> None:
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
                # Replicas starting together: one creates the tables, the others wait.
                await conn.execute("SELECT pg_advisory_xact_lock(7261747)")
                if self._schema:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                for ddl in _DDL:
                    await conn.execute(ddl)
                cur = await conn.execute(
                    "SELECT hashtext(current_schema() || ':tabiji-devices')::bigint"
                )
                row = await cur.fetchone()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            await pool.close()
            raise RegistryUnavailable(f"device store: {type(exc).__name__}: {exc}") from exc
        self._lock_key = int(row[0]) if row else 0
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _ready(self) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        return self._pool

    async def ping(self) -> bool:
        try:
            await self._fetch("SELECT 1")
        except RegistryUnavailable:
            return False
        return True

    # -- the primitives (see SqlDeviceStore) ------------------------------------------------

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> Sequence[Row]:
        pool = await self._ready()
        with _unavailable_on_error():
            async with pool.connection() as conn:
                cur = await conn.execute(sql, args)
                return list(await cur.fetchall())

    async def _update(
        self,
        assignments: str,
        set_args: Sequence[Any],
        condition: str,
        where_args: Sequence[Any],
    ) -> Sequence[Row]:
        """In its own transaction, after the ordering lock (see the module doc)."""
        sql = f"UPDATE devices SET {assignments}, version = {_NEXT} WHERE {condition}{_RETURNING}"  # noqa: S608  # constant pieces; values are bound
        pool = await self._ready()
        with _unavailable_on_error():
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                cur = await conn.execute(sql, (*set_args, *where_args))
                return list(await cur.fetchall())

    async def _update_each(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        pool = await self._ready()
        with _unavailable_on_error():
            async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.executemany(sql, args)

    # -- what only this store does ----------------------------------------------------------

    async def add(self, device: NewDevice) -> DeviceRecord:
        check_new(device)
        values = new_row(device, 0)
        args = [v for c, v in zip(COLUMNS, values, strict=True) if c != "version"]
        pool = await self._ready()
        with _unavailable_on_error():
            try:
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    # Checked under the lock every writer takes, so no version number is spent
                    # on a refused enrolment (the UNIQUE constraints still stand behind this).
                    cur = await conn.execute(
                        "SELECT key_thumbprint = %s FROM devices"
                        " WHERE key_thumbprint = %s OR id = %s",
                        (device.key_thumbprint, device.key_thumbprint, device.id),
                    )
                    taken = await cur.fetchall()
                    if taken:
                        raise already_enrolled(any(row[0] for row in taken), device.id)
                    cur = await conn.execute(_INSERT + _RETURNING, args)
                    row = await cur.fetchone()
            except psycopg.errors.UniqueViolation as exc:
                constraint = getattr(exc.diag, "constraint_name", None) or ""
                raise already_enrolled("key_thumbprint" in constraint, device.id) from exc
        assert row is not None
        return row_record(row)

    async def changed_since(self, version: int) -> tuple[Sequence[DeviceRecord], int]:
        pool = await self._ready()
        with _unavailable_on_error():
            async with pool.connection() as conn, conn.transaction():
                # One snapshot for the rows and the high-water mark. The mark is the newest
                # committed version (the sequence's own value may belong to a write in flight).
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = await conn.execute(
                    f"{_SELECT} WHERE version > %s ORDER BY version, id", (version,)
                )
                rows = await cur.fetchall()
                cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM devices")
                mark = await cur.fetchone()
        return [row_or_marker(r) for r in rows], int(mark[0]) if mark else 0

    async def drop_schema(self) -> None:
        """Tests: remove this store's schema and everything in it."""
        if not self._schema:
            raise ValueError("drop_schema needs an explicit schema")
        pool = await self._ready()
        async with pool.connection() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self._schema} CASCADE")


@contextlib.contextmanager
def _unavailable_on_error() -> Iterator[None]:
    """psycopg and pool errors mean the store cannot be reached: every device fact is unknown."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        raise RegistryUnavailable(f"device store: {type(exc).__name__}: {exc}") from exc
