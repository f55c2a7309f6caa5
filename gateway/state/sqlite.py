"""The embedded StateStore: one SQLite file (WAL) shared by the gateway's worker processes.

Each store runs its blocking sqlite3 calls on one dedicated thread with its own connection.
Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TypeVar

from gateway.state.base import StateUnavailable, check_namespace, check_ttl, polled_lock

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires);
CREATE TABLE IF NOT EXISTS idx (
    name TEXT NOT NULL, member TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (name, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_expires ON idx (expires);
CREATE TABLE IF NOT EXISTS feed (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, message TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feed_channel ON feed (channel, id);
"""

# Locks live in a namespace callers cannot name (check_namespace rejects ':').
_LOCK_NS = "lock:"
_SCAN_BATCH = 500
_FEED_BATCH = 1000


class SqliteThread:
    """One SQLite file's connection, kept on a dedicated thread of its own (sqlite3 blocks; the
    event loop must not): opened, used and closed only there. Shared by the embedded stores.

    The file is private (0700 directory, 0600 file) and in WAL mode, so the gateway's worker
    processes share it; `schema` is a script of idempotent statements run at every open.
    SQLite and OS errors come out as `unavailable(detail)` (each store's fail-closed error).
    """

    def __init__(
        self,
        path: Path,
        *,
        schema: str,
        synchronous: str,
        busy_timeout: float,
        what: str,
        unavailable: Callable[[str], Exception],
    ) -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._what = what  # "state store", "device store": the thread's name and the errors'
        self._unavailable = unavailable
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the executor's thread

    @property
    def is_open(self) -> bool:
        return self._executor is not None and self._conn is not None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL-free create: several workers may race here; whoever creates it sets 0600, and
        # SQLite gives the -wal and -shm files the same mode as the database file.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=True
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            # Each statement is idempotent and atomic: workers starting together are safe.
            conn.executescript(self._schema)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Create the file, the schema, the thread and the connection. Idempotent."""
        if self._conn is not None:
            return
        if sqlite3.sqlite_version_info < (3, 35, 0):  # … RETURNING makes single writes atomic
            raise self._unavailable(
                f"SQLite {sqlite3.sqlite_version} is too old: need 3.35 or newer"
            )
        name = "tabiji-" + self._what.split()[0]
        executor = self._executor or ThreadPoolExecutor(1, thread_name_prefix=name)
        self._executor = executor
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(f"SQLite {self._what} {self.path}: {exc}") from exc

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` with the connection on the thread."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise self._unavailable(f"the SQLite {self._what} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job, conn)
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(f"SQLite {self._what} {self.path}: {exc}") from exc

    async def close(self, *, wait: bool) -> None:
        """Close the connection and stop the thread (`wait`: until its last job has ended)."""
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=wait)


class SqliteStateStore:
    """StateStore on a SQLite file; every process (uvicorn worker) opens its own instance.

    Expiry uses wall-clock time (time.time()) because several processes compare it. Expired rows
    are invisible at once and deleted at most every `purge_interval` s, on a write; feed messages
    older than `feed_retention` s are deleted then too.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 5.0,
        purge_interval: float = 60.0,
        feed_retention: float = 3600.0,
    ) -> None:
        self._thread = SqliteThread(
            path,
            schema=_SCHEMA,
            synchronous="NORMAL",
            busy_timeout=busy_timeout,
            what="state store",
            unavailable=StateUnavailable,
        )
        self._purge_interval = purge_interval
        self._feed_retention = feed_retention
        self._last_purge = 0.0  # time.monotonic(); read and written only on the store's thread

    @property
    def path(self) -> Path:
        """The database file."""
        return self._thread.path

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run `job` with the connection on the store's thread; sqlite/OS errors → unavailable."""
        return await self._thread.run(job)

    def _after_write(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete expired rows and old feed messages, at most once per purge interval."""
        tick = time.monotonic()
        if tick - self._last_purge < self._purge_interval:
            return
        self._last_purge = tick
        conn.execute("DELETE FROM kv WHERE expires <= ?", (now,))
        conn.execute("DELETE FROM idx WHERE expires <= ?", (now,))
        conn.execute("DELETE FROM feed WHERE created < ?", (now - self._feed_retention,))

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file, tables and this store's thread and connection. Idempotent."""
        await self._thread.open()

    async def close(self) -> None:
        """Close the connection and stop the thread."""
        await self._thread.close(wait=False)

    async def ping(self) -> bool:
        """True when a trivial query answers."""
        try:
            return await self._run(lambda c: c.execute("SELECT 1").fetchone() == (1,))
        except StateUnavailable:
            return False

    # -- values -----------------------------------------------------------------------------

    async def put(self, ns: str, key: str, value: bytes, ttl: float) -> None:
        """Store (overwrite) a value that expires after `ttl` seconds."""
        check_namespace(ns)
        check_ttl(ttl)
        await self._put(ns, key, value, ttl)

    async def _put(self, ns: str, key: str, value: bytes, ttl: float) -> None:
        def job(c: sqlite3.Connection) -> None:
            now = time.time()
            c.execute(
                "INSERT INTO kv (ns, key, value, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
                "expires = excluded.expires",
                (ns, key, bytes(value), now + ttl),
            )
            self._after_write(c, now)

        await self._run(job)

    async def put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool:
        """Store only if absent or expired, in one statement (atomic across processes)."""
        check_namespace(ns)
        check_ttl(ttl)
        return await self._put_new(ns, key, value, ttl)

    async def _put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool:
        def job(c: sqlite3.Connection) -> bool:
            now = time.time()
            # The upsert overwrites only an expired row; RETURNING yields a row only when the
            # statement inserted or overwrote, so "did we win" is answered by the same statement.
            won = c.execute(
                "INSERT INTO kv (ns, key, value, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
                "expires = excluded.expires WHERE kv.expires <= ? RETURNING 1",
                (ns, key, bytes(value), now + ttl, now),
            ).fetchall()
            self._after_write(c, now)
            return bool(won)

        return await self._run(job)

    async def get(self, ns: str, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        check_namespace(ns)

        def job(c: sqlite3.Connection) -> bytes | None:
            row = c.execute(
                "SELECT value FROM kv WHERE ns = ? AND key = ? AND expires > ?",
                (ns, key, time.time()),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(job)

    async def take(self, ns: str, key: str) -> bytes | None:
        """Get and delete in one statement: of racing takers (any process) only one gets it."""
        check_namespace(ns)

        def job(c: sqlite3.Connection) -> bytes | None:
            # DELETE … RETURNING (SQLite ≥ 3.35) is one write transaction: SQLite's single
            # writer lock makes it atomic across connections and processes.
            row = c.execute(
                "DELETE FROM kv WHERE ns = ? AND key = ? AND expires > ? RETURNING value",
                (ns, key, time.time()),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(job)

    async def delete(self, ns: str, key: str) -> None:
        """Remove a value (absent is fine)."""
        check_namespace(ns)
        await self._run(lambda c: c.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, key)))

    async def scan(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every live (key, value) of a namespace, in key order, fetched in batches."""
        check_namespace(ns)
        after: str | None = None
        while True:
            rows = await self._run(_scan_job(ns, after))
            for key, value in rows:
                yield key, value
            if len(rows) < _SCAN_BATCH:
                return
            after = rows[-1][0]

    # -- index sets -------------------------------------------------------------------------

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        """Add a member; the whole set then lives at least `ttl` more (like Redis PEXPIRE)."""
        check_ttl(ttl)

        def job(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")  # outside the try: a failed BEGIN has nothing to undo
            now = time.time()  # after waiting for the write lock
            try:
                # An expired set is gone: its old members must not come back with the new one.
                c.execute("DELETE FROM idx WHERE name = ? AND expires <= ?", (index, now))
                c.execute(
                    "INSERT OR IGNORE INTO idx (name, member, expires) VALUES (?, ?, ?)",
                    (index, member, now + ttl),
                )
                c.execute(  # every member carries the set's expiry: the latest one wins
                    "UPDATE idx SET expires = "
                    "max(?, (SELECT max(expires) FROM idx WHERE name = ?)) WHERE name = ?",
                    (now + ttl, index, index),
                )
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            self._after_write(c, now)

        await self._run(job)

    async def index_members(self, index: str) -> list[str]:
        """The members of a set (empty when absent or expired)."""

        def job(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "SELECT member FROM idx WHERE name = ? AND expires > ? ORDER BY member",
                (index, time.time()),
            ).fetchall()
            return [str(r[0]) for r in rows]

        return await self._run(job)

    async def index_remove(self, index: str, member: str) -> None:
        """Remove one member of a set."""
        await self._run(
            lambda c: c.execute("DELETE FROM idx WHERE name = ? AND member = ?", (index, member))
        )

    # -- feed -------------------------------------------------------------------------------

    async def publish(self, channel: str, message: str) -> None:
        """Append a message; its AUTOINCREMENT id is the cursor (ids are never reused)."""

        def job(c: sqlite3.Connection) -> None:
            now = time.time()
            c.execute(
                "INSERT INTO feed (channel, message, created) VALUES (?, ?, ?)",
                (channel, message, now),
            )
            self._after_write(c, now)

        await self._run(job)

    async def read_since(self, channel: str, cursor: str | None) -> tuple[list[str], str]:
        """Messages with an id above the cursor; None → no messages and the newest id."""
        if cursor is None:
            row = await self._run(lambda c: c.execute("SELECT max(id) FROM feed").fetchone())
            return [], str(row[0] if row and row[0] is not None else 0)
        if not cursor.isdigit() or not cursor.isascii():
            raise ValueError(f"not a SQLite feed cursor: {cursor!r}")
        after = int(cursor)
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id, message FROM feed WHERE channel = ? AND id > ? ORDER BY id LIMIT ?",
                (channel, after, _FEED_BATCH),
            ).fetchall()
        )
        if not rows:
            return [], cursor
        return [str(r[1]) for r in rows], str(rows[-1][0])

    # -- lock -------------------------------------------------------------------------------

    def lock(self, name: str, ttl: float) -> AbstractAsyncContextManager[bool]:
        """A lock row with a random owner token; released only while the token is still ours."""
        token = secrets.token_bytes(16)

        async def acquire() -> bool:
            return await self._put_new(_LOCK_NS, name, token, ttl)

        async def release() -> None:
            await self._run(
                lambda c: c.execute(
                    "DELETE FROM kv WHERE ns = ? AND key = ? AND value = ?",
                    (_LOCK_NS, name, token),
                )
            )

        return polled_lock(acquire, release, ttl)


def _scan_job(
    ns: str, after: str | None
) -> Callable[[sqlite3.Connection], list[tuple[str, bytes]]]:
    """One batch of a namespace's live rows after key `after`."""

    def job(c: sqlite3.Connection) -> list[tuple[str, bytes]]:
        rows = c.execute(
            "SELECT key, value FROM kv WHERE ns = :ns AND (:after IS NULL OR key > :after) "
            "AND expires > :now ORDER BY key LIMIT :limit",
            {"ns": ns, "after": after, "now": time.time(), "limit": _SCAN_BATCH},
        ).fetchall()
        return [(str(k), bytes(v)) for k, v in rows]

    return job
