"""The embedded device store: one SQLite file (WAL) shared by the gateway's worker processes.

Blocking sqlite3 calls run on one dedicated thread with its own connection (SqliteThread, as the
state store's). Every write runs in a BEGIN IMMEDIATE transaction that also bumps the one-row
change counter, so versions are handed out in commit order and `changed_since` never skips a
change. The statements themselves are SqlDeviceStore's. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.devices.model import DeviceRecord, NewDevice, RegistryUnavailable
from gateway.devices.store_rows import (
    COLUMNS,
    SELECT_COLUMNS,
    already_enrolled,
    check_new,
    new_row,
    row_or_marker,
    row_record,
)
from gateway.devices.store_sql import Row, SqlDeviceStore
from gateway.state.sqlite import SqliteThread

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    owner_issuer TEXT NOT NULL,
    owner_subject TEXT NOT NULL,
    key_thumbprint TEXT NOT NULL UNIQUE,
    public_key_pem TEXT NOT NULL,
    key_storage TEXT NOT NULL CHECK (key_storage IN ('tpm', 'tpm-claimed', 'software')),
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'revoked')),
    created_at REAL NOT NULL,
    owner_email TEXT,
    hostname TEXT NOT NULL,
    serial TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    approved_at REAL,
    revoked_at REAL,
    last_seen REAL,
    cert_serial TEXT,
    cert_not_after REAL,
    posture TEXT,
    posture_at REAL,
    posture_reported_at REAL,
    posture_counter INTEGER NOT NULL DEFAULT -1,
    loopback_port INTEGER,
    version INTEGER NOT NULL,
    actor TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS devices_version ON devices (version);
CREATE INDEX IF NOT EXISTS devices_owner ON devices (owner_issuer, owner_subject);
CREATE INDEX IF NOT EXISTS devices_cert_serial ON devices (cert_serial);
CREATE INDEX IF NOT EXISTS devices_status_created ON devices (status, created_at);
CREATE TABLE IF NOT EXISTS device_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO device_version (id, version) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS devices_revoked_is_final BEFORE UPDATE OF status ON devices
    WHEN OLD.status = 'revoked' AND NEW.status <> 'revoked'
    BEGIN SELECT RAISE(ABORT, 'a revoked device stays revoked'); END;
"""
_SELECT: Final = f"SELECT {SELECT_COLUMNS} FROM devices"  # noqa: S608  # constant column names
_RETURNING: Final = f" RETURNING {SELECT_COLUMNS}"
_INSERT: Final = f"INSERT INTO devices ({SELECT_COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608  # constant column names; values are bound


class SqliteDeviceStore(SqlDeviceStore):
    """DeviceStore on a SQLite file; every process (uvicorn worker) opens its own instance."""

    placeholder = "?"
    json_placeholder = "?"
    greatest = "MAX"
    select = _SELECT

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._thread = SqliteThread(
            path,
            schema=_SCHEMA,
            synchronous="FULL",  # an approval or revocation is on disk
            busy_timeout=busy_timeout,
            what="device store",
            unavailable=RegistryUnavailable,
        )
        self._opening = asyncio.Lock()  # first requests arriving together open one connection

    @property
    def path(self) -> Path:
        return self._thread.path

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` on the store's thread (opening it first if need be); SQLite and OS errors
        mean unavailable (fail closed)."""
        if not self._thread.is_open:
            await self.open()
        return await self._thread.run(job)

    async def open(self) -> None:
        """Create the file (0600: it holds owners' e-mail), tables, thread and connection.
        Idempotent."""
        async with self._opening:
            await self._thread.open()

    async def close(self) -> None:
        await self._thread.close(wait=True)

    async def ping(self) -> bool:
        try:
            await self._run(lambda c: c.execute("SELECT version FROM device_version").fetchone())
        except RegistryUnavailable:
            return False
        return True

    # -- the primitives (see SqlDeviceStore) ------------------------------------------------

    async def _update(
        self,
        assignments: str,
        set_args: Sequence[Any],
        condition: str,
        where_args: Sequence[Any],
    ) -> Sequence[Row]:
        sql = f"UPDATE devices SET {assignments}, version = ? WHERE {condition}{_RETURNING}"  # noqa: S608  # constant pieces; values are bound

        def job(conn: sqlite3.Connection) -> list[Row]:
            with _write(conn) as version:
                rows: list[Row] = conn.execute(
                    sql, (*set_args, version.next, *where_args)
                ).fetchall()
                if not rows:
                    version.unused()
            return rows

        return await self._run(job)

    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Row]:
        def job(conn: sqlite3.Connection) -> list[Row]:
            rows: list[Row] = conn.execute(sql, args).fetchall()
            return rows

        return await self._run(job)

    async def _update_each(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, args)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(job)

    # -- what only this store does ----------------------------------------------------------

    async def add(self, device: NewDevice) -> DeviceRecord:
        check_new(device)

        def job(conn: sqlite3.Connection) -> DeviceRecord:
            try:
                with _write(conn) as version:
                    conn.execute(_INSERT, new_row(device, version.next))
            except sqlite3.IntegrityError as exc:
                raise already_enrolled("key_thumbprint" in str(exc), str(exc)) from exc
            row = conn.execute(f"{_SELECT} WHERE id = ?", (device.id,)).fetchone()
            return row_record(row)

        return await self._run(job)

    async def changed_since(self, version: int) -> tuple[Sequence[DeviceRecord], int]:
        def job(conn: sqlite3.Connection) -> tuple[list[DeviceRecord], int]:
            conn.execute("BEGIN")  # one snapshot for the rows and the counter
            try:
                rows = conn.execute(
                    f"{_SELECT} WHERE version > ? ORDER BY version, id", (version,)
                ).fetchall()
                current = conn.execute("SELECT version FROM device_version").fetchone()
            finally:
                conn.execute("COMMIT")
            return [row_or_marker(r) for r in rows], int(current[0]) if current else 0

        return await self._run(job)


class _Version:
    """The next change number, taken inside the write transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "UPDATE device_version SET version = version + 1 WHERE id = 1 RETURNING version"
        ).fetchone()
        self.next = int(row[0])
        self.changed = True

    def unused(self) -> None:
        """Nothing matched: roll back, so the counter moves only with a change."""
        self.changed = False


class _write:  # noqa: N801  # used like a function: `with _write(conn) as version:`
    """BEGIN IMMEDIATE … COMMIT (or ROLLBACK on error or when nothing changed)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._version: _Version | None = None

    def __enter__(self) -> _Version:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._version = _Version(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return self._version

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        conn = self._conn
        if not conn.in_transaction:
            return
        if exc is not None or self._version is None or not self._version.changed:
            conn.execute("ROLLBACK")
            return
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT must not leave the next write inside it
                conn.execute("ROLLBACK")
            raise
