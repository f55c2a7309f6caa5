"""The embedded device store: one SQLite file (WAL) shared by the gateway's worker processes.

Blocking sqlite3 calls run on one dedicated thread with its own connection. Every write runs in a
BEGIN IMMEDIATE transaction that also bumps the one-row change counter, so versions are handed
out in commit order and `changed_since` never skips a change. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from device_agent.report import PostureFacts
from gateway.devices.model import (
    DeviceError,
    DeviceRecord,
    DeviceStatus,
    KeyStorageFact,
    NewDevice,
    RegistryUnavailable,
)
from gateway.devices.store_rows import (
    COLUMNS,
    SELECT_COLUMNS,
    check_new,
    check_tags,
    new_row,
    normalise_serial,
    posture_json,
    row_or_marker,
    row_record,
    rows_or_skip,
    tags_json,
)

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


def _update(assignments: str, condition: str) -> str:
    """An UPDATE … RETURNING the row, from constant pieces (values are always bound)."""
    return f"UPDATE devices SET {assignments} WHERE {condition}{_RETURNING}"  # noqa: S608  # constant pieces; values are bound


_ACCEPT: Final = _update(
    "posture = ?, posture_at = ?, posture_reported_at = ?, posture_counter = ?,"
    " loopback_port = ?, last_seen = MAX(COALESCE(last_seen, 0), ?), version = ?",
    "id = ? AND status <> 'revoked' AND posture_counter < ?",
)


class SqliteDeviceStore:
    """DeviceStore on a SQLite file; every process (uvicorn worker) opens its own instance."""

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only on the executor's thread
        self._opening = asyncio.Lock()  # first requests arriving together open one connection

    @property
    def path(self) -> Path:
        return self._path

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` on the store's thread; SQLite and OS errors mean unavailable (fail closed)."""
        if self._executor is None or self._conn is None:
            await self.open()
        assert self._executor is not None
        conn = self._conn
        assert conn is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job, conn)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryUnavailable(f"SQLite device store {self._path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        """Create the directory (0700) and file (0600: it holds owners' e-mail) and the schema."""
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Several workers may race here; whoever creates the file sets 0600 (the -wal and -shm
        # files get the database file's mode).
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=True
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # an approval or revocation is on disk
            # Each statement is idempotent and atomic: workers starting together are safe.
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Create the file, tables, thread and connection. Idempotent."""
        async with self._opening:
            await self._open()

    async def _open(self) -> None:
        if self._conn is not None:
            return
        if sqlite3.sqlite_version_info < (3, 35, 0):  # UPDATE … RETURNING
            raise RegistryUnavailable(f"SQLite {sqlite3.sqlite_version} is too old: need 3.35+")
        executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix="tabiji-devices")
        self._executor = executor
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryUnavailable(f"SQLite device store {self._path}: {exc}") from exc

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def ping(self) -> bool:
        try:
            await self._run(lambda c: c.execute("SELECT version FROM device_version").fetchone())
        except RegistryUnavailable:
            return False
        return True

    async def _change(self, sql: str, args: Sequence[Any]) -> DeviceRecord | None:
        """One conditional UPDATE … RETURNING with a fresh version; nothing changes (and the
        counter stays) when no row matches."""

        def job(conn: sqlite3.Connection) -> DeviceRecord | None:
            with _write(conn) as version:
                rows = conn.execute(sql, (*args[:-1], version.next, args[-1])).fetchall()
                if not rows:
                    version.unused()
                    return None
            return row_record(rows[0])

        return await self._run(job)

    # -- writes -----------------------------------------------------------------------------

    async def add(self, device: NewDevice) -> DeviceRecord:
        check_new(device)

        def job(conn: sqlite3.Connection) -> DeviceRecord:
            try:
                with _write(conn) as version:
                    conn.execute(_INSERT, new_row(device, version.next))
            except sqlite3.IntegrityError as exc:
                raise _duplicate(str(exc)) from exc
            row = conn.execute(f"{_SELECT} WHERE id = ?", (device.id,)).fetchone()
            return row_record(row)

        return await self._run(job)

    async def set_status(
        self, device_id: str, status: DeviceStatus, *, now: float, actor: str
    ) -> DeviceRecord | None:
        if status == "approved":
            sql = _update(
                "status = 'approved', approved_at = ?, actor = ?, version = ?",
                "id = ? AND status = 'pending'",
            )
        elif status == "revoked":
            sql = _update(
                "status = 'revoked', revoked_at = ?, actor = ?, version = ?",
                "id = ? AND status <> 'revoked'",
            )
        else:
            raise ValueError(f"set_status sets approved or revoked, not {status!r}")
        changed = await self._change(sql, (now, actor, device_id))
        if changed is not None or status == "revoked":
            return changed
        current = await self.get(device_id)  # approving an approved device changes nothing
        return current if current is not None and current.status == "approved" else None

    async def set_tags(
        self, device_id: str, tags: frozenset[str], *, now: float, actor: str
    ) -> DeviceRecord | None:
        check_tags(tags)
        sql = _update("tags = ?, actor = ?, version = ?", "id = ? AND status <> 'revoked'")
        return await self._change(sql, (tags_json(tags), actor, device_id))

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord | None:
        sql = _update(
            "cert_serial = ?, cert_not_after = ?, version = ?", "id = ? AND status <> 'revoked'"
        )
        return await self._change(sql, (normalise_serial(serial), not_after, device_id))

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord | None:
        sql = _update("key_storage = ?, version = ?", "id = ? AND status <> 'revoked'")
        return await self._change(sql, (key_storage, device_id))

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
        def job(conn: sqlite3.Connection) -> DeviceRecord | None:
            with _write(conn) as version:
                # One conditional UPDATE: two workers racing on one report cannot both win.
                rows = conn.execute(
                    _ACCEPT,
                    (
                        posture_json(facts),
                        received_at,
                        reported_at,
                        counter,
                        loopback_port,
                        received_at,
                        version.next,
                        device_id,
                        counter,
                    ),
                ).fetchall()
                if not rows:
                    version.unused()
                    return None
            return row_record(rows[0])

        return await self._run(job)

    async def touch(self, seen: Sequence[tuple[str, float]]) -> None:
        # last_seen is shown to IT, never decided on: it does not bump the change counter, so
        # replicas' caches are not reloaded for every request a device makes.
        if not seen:
            return
        args = [(when, device_id, when) for device_id, when in seen]

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE devices SET last_seen = ? WHERE id = ?"
                    " AND (last_seen IS NULL OR last_seen < ?)",
                    args,
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(job)

    async def expire_pending(self, older_than: float, *, now: float) -> int:
        def job(conn: sqlite3.Connection) -> int:
            with _write(conn) as version:
                n = conn.execute(
                    "UPDATE devices SET status = 'revoked', revoked_at = ?, actor = 'expired',"
                    " version = ? WHERE status = 'pending' AND created_at < ?",
                    (now, version.next, older_than),
                ).rowcount
                if n == 0:
                    version.unused()
            return int(n)

        return await self._run(job)

    # -- reads ------------------------------------------------------------------------------

    async def _one(self, where: str, arg: object) -> DeviceRecord | None:
        def job(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(f"{_SELECT} WHERE {where} = ?", (arg,)).fetchone()
            return None if row is None else row_record(row)

        return await self._run(job)

    async def get(self, device_id: str) -> DeviceRecord | None:
        return await self._one("id", device_id)

    async def by_thumbprint(self, thumbprint: str) -> DeviceRecord | None:
        return await self._one("key_thumbprint", thumbprint)

    async def by_cert_serial(self, serial: str) -> DeviceRecord | None:
        try:
            wanted = normalise_serial(serial)
        except DeviceError:
            return None
        return await self._one("cert_serial", wanted)

    async def list(
        self,
        *,
        status: DeviceStatus | None = None,
        owner: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> Sequence[DeviceRecord]:
        where: list[str] = []
        args: list[object] = []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if owner is not None:
            where.append("owner_issuer = ? AND owner_subject = ?")
            args.extend(owner)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, id LIMIT ?"
        args.append(max(0, int(limit)))

        def job(conn: sqlite3.Connection) -> list[DeviceRecord]:
            return rows_or_skip(conn.execute(sql, args).fetchall())

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


def _duplicate(message: str) -> DeviceError:
    if "key_thumbprint" in message:
        return DeviceError(
            code="device-key-already-enrolled",
            detail="this key is enrolled as another device",
            status=409,
        )
    return DeviceError(code="device-already-exists", detail=message, status=409)
