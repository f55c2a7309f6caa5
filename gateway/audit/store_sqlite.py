"""The embedded audit store: SQLite in WAL mode, append-only enforced by triggers.

Writes run on one thread (one connection), reads on another, so the writer's commits never wait
for a long auditor query. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

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

T = TypeVar("T")
PAGE: Final = 1000
# A batch's INSERTs run on the event loop's thread, this many rows between yields; only
# BEGIN IMMEDIATE (which may wait for another process's write lock) and COMMIT (the fsync) go to
# the writer thread. Why: pysqlite releases and re-takes the GIL around every sqlite3_step, so an
# executemany on another thread took the GIL back from the busy event loop once per row (a
# handoff each, and the loop's own work kept being preempted). Measured with `python -m bench
# proxy` (audit on vs off). 64 rows is about a millisecond of the loop's time per chunk.
INSERT_CHUNK: Final = 64
# A batch this small (durable mode's one-request commits) goes to the writer thread whole, as
# one call: three thread round trips would cost more than its few handoffs.
SMALL_BATCH: Final = 4
# The writer's WAL checkpoints every 10,000 pages (about 40 MiB) instead of SQLite's 1,000: the
# indexes' hot pages are copied into the database once per checkpoint, so checkpointing less
# often copies each of them fewer times. Measured: about a fifth less CPU per appended record
# (bench/audit.py). Durability is unchanged: every commit is still fsynced to the WAL.
WAL_AUTOCHECKPOINT_PAGES: Final = 10_000


def _coldef(name: str) -> str:
    kind = "INTEGER" if name in INTEGER_COLUMNS else "TEXT"
    return f"{name} {kind}" + ("" if name in NULLABLE_COLUMNS else " NOT NULL")


# A rowid table with UNIQUE (chain_id, seq), not WITHOUT ROWID keyed on (chain_id, seq): every
# secondary index entry then ends in an 8-byte rowid instead of repeating the long chain_id text,
# and rows are appended at the table's end. Measured: about a third less CPU per inserted row
# (six indexes). Files made by the earlier WITHOUT ROWID layout keep it (CREATE ... IF NOT
# EXISTS) and stay readable and writable: same columns, same uniqueness.
_RECORDS_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_records ("
    + ", ".join(_coldef(c) for c in COLUMNS)
    + ", UNIQUE (chain_id, seq))"
)
_CHECKPOINTS_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_checkpoints (chain_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " head_hash TEXT NOT NULL, time_us INTEGER NOT NULL, count INTEGER NOT NULL,"
    " kind TEXT NOT NULL, key_id TEXT NOT NULL, signature TEXT NOT NULL, tsa_token TEXT,"
    " PRIMARY KEY (chain_id, seq, kind))"
)
_NO_DELETE: Final = (
    "CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END"
)
_TRIGGERS: Final = (
    "CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records"
    " BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    _NO_DELETE,
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints"
    " BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints"
    " BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END",
)
_SELECT: Final = "SELECT " + ", ".join(COLUMNS) + " FROM audit_records"  # noqa: S608  # constant column names
_INSERT: Final = (
    f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608  # constant SQL pieces; values are bound
)


class SqliteAuditStore:
    """AuditStore on one SQLite file (WAL, synchronous=FULL: a commit is on disk)."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_ms = int(busy_timeout_ms)
        self._wpool: ThreadPoolExecutor | None = None
        self._rpool: ThreadPoolExecutor | None = None
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        # Serialises every use of the write connection: a batch holds it from BEGIN to COMMIT
        # while its INSERTs run on the loop thread between awaits.
        self._wlock = asyncio.Lock()

    # ---------------------------------------------------------------- plumbing

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        # 64 MiB page cache (default 2 MiB): the six indexes' hot pages stay in memory; measured
        # about a quarter less CPU per inserted record (bench/audit.py).
        conn.execute("PRAGMA cache_size = -65536")
        return conn

    async def _run(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not write:
            return await self._call(False, fn)
        async with self._wlock:
            return await self._call(True, fn)

    async def _call(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._wpool is None or self._rpool is None:
            await self.open()
        pool = self._wpool if write else self._rpool
        loop = asyncio.get_running_loop()

        def call() -> T:
            conn = self._w if write else self._r
            if conn is None:
                conn = self._connect()
                if write:
                    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
                    self._w = conn
                else:
                    self._r = conn
            return fn(conn)

        try:
            return await loop.run_in_executor(pool, call)
        except sqlite3.OperationalError as exc:
            # Lost file, read-only directory, disk full, locked: the writer spools and retries.
            # Drop the connection so the next attempt starts afresh.
            await loop.run_in_executor(pool, self._drop, write)
            raise AuditStoreUnavailable(f"audit store {self.path}: {exc}") from exc

    def _drop(self, write: bool) -> None:
        conn = self._w if write else self._r
        if conn is not None:
            conn.close()
        if write:
            self._w = None
        else:
            self._r = None

    async def open(self) -> None:
        if self._wpool is None:
            self._wpool = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-w")
            self._rpool = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-r")

        def setup(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(_RECORDS_DDL)
            conn.execute(_CHECKPOINTS_DDL)
            for index in INDEXES:
                conn.execute(index_ddl(*index))
            for ddl in _TRIGGERS:
                conn.execute(ddl)

        await self._call(True, setup)

    async def close(self) -> None:
        for write, pool in ((True, self._wpool), (False, self._rpool)):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._drop, write)
                pool.shutdown(wait=True)
        self._wpool = self._rpool = None

    # ---------------------------------------------------------------- writes

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        if not records:
            return
        rows = [record_row(r) for r in records]
        sql = _INSERT.replace("INSERT", "INSERT OR IGNORE", 1) if ignore_existing else _INSERT
        if len(rows) <= SMALL_BATCH:

            def write(conn: sqlite3.Connection) -> None:
                _begin(conn)
                try:
                    conn.executemany(sql, rows)
                except BaseException:
                    _rollback(conn)
                    raise
                _commit(conn)

            await self._run(True, write)
            return
        async with self._wlock:
            conn = await self._call(True, _begin)
            try:
                for i in range(0, len(rows), INSERT_CHUNK):
                    if i:
                        await asyncio.sleep(0)  # let requests run between chunks
                    try:
                        conn.executemany(sql, rows[i : i + INSERT_CHUNK])
                    except sqlite3.OperationalError as exc:  # disk full, I/O error: spool
                        raise AuditStoreUnavailable(f"audit store {self.path}: {exc}") from exc
            except BaseException as exc:
                # A failed rollback drops the connection itself (nothing was committed).
                with contextlib.suppress(AuditStoreUnavailable):
                    await asyncio.shield(self._call(True, _rollback))
                if isinstance(exc, AuditStoreUnavailable) and self._wpool is not None:
                    # As in _call: after an I/O error the next attempt starts afresh.
                    pool = self._wpool
                    await asyncio.get_running_loop().run_in_executor(pool, self._drop, True)
                raise
            await self._call(True, _commit)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        row = checkpoint_row(checkpoint)
        sql = (
            f"INSERT OR IGNORE INTO audit_checkpoints ({', '.join(CHECKPOINT_COLUMNS)})"  # noqa: S608  # constant SQL pieces; values are bound
            f" VALUES ({', '.join('?' * len(CHECKPOINT_COLUMNS))})"
        )
        await self._run(True, lambda c: c.execute(sql, row))

    async def delete_before(self, time_us: int, sign: RetentionSigner) -> dict[str, int]:
        def trim(conn: sqlite3.Connection) -> list[Checkpoint]:
            made: list[Checkpoint] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                # The trigger is dropped and re-created inside this one transaction: no other
                # connection ever sees the table without it (DDL is transactional in SQLite).
                conn.execute("DROP TRIGGER audit_records_no_delete")
                for chain_id, boundary in _boundaries(conn, time_us):
                    head = conn.execute(
                        "SELECT hash FROM audit_records WHERE chain_id = ? AND seq = ?",
                        (chain_id, boundary),
                    ).fetchone()
                    if head is None:
                        continue
                    n = conn.execute(
                        "DELETE FROM audit_records WHERE chain_id = ? AND seq <= ?",
                        (chain_id, boundary),
                    ).rowcount
                    cp = sign(chain_id, boundary, head[0], n)
                    conn.execute(
                        f"INSERT INTO audit_checkpoints ({', '.join(CHECKPOINT_COLUMNS)})"  # noqa: S608  # constant SQL pieces; values are bound
                        f" VALUES ({', '.join('?' * len(CHECKPOINT_COLUMNS))})",
                        checkpoint_row(cp),
                    )
                    made.append(cp)
                conn.execute(_NO_DELETE)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return made

        made = await self._run(True, trim)
        return {cp.chain_id: cp.count for cp in made}

    # ---------------------------------------------------------------- reads

    async def chains(self) -> list[str]:
        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT DISTINCT chain_id FROM audit_records ORDER BY 1")
            return [r[0] for r in rows]

        return await self._run(False, q)

    async def iter_chain(self, chain_id: str) -> AsyncIterator[AuditRecord]:
        after = -1
        while True:

            def page(conn: sqlite3.Connection, after: int = after) -> list[Any]:
                return conn.execute(
                    f"{_SELECT} WHERE chain_id = ? AND seq > ? ORDER BY seq LIMIT {PAGE}",
                    (chain_id, after),
                ).fetchall()

            rows = await self._run(False, page)
            for row in rows:
                yield row_record(row)
            if len(rows) < PAGE:
                return
            after = int(rows[-1][1])

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        def q(conn: sqlite3.Connection) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT seq, hash FROM audit_records WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
                (chain_id,),
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return await self._run(False, q)

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        where, args = filter_sql(filter, "?")
        sql = f"{_SELECT}{where} ORDER BY time_us DESC, chain_id, seq DESC LIMIT ? OFFSET ?"

        def q(conn: sqlite3.Connection) -> list[AuditRecord]:
            return [row_record(r) for r in conn.execute(sql, [*args, limit, offset])]

        return await self._run(False, q)

    async def count(self, filter: AuditFilter) -> int:
        where, args = filter_sql(filter, "?")

        def q(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(f"SELECT COUNT(*) FROM audit_records{where}", args).fetchone()[0]  # noqa: S608  # constant SQL pieces; values are bound
            )

        return await self._run(False, q)

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        def q(conn: sqlite3.Connection) -> AuditRecord | None:
            row = conn.execute(
                f"{_SELECT} WHERE chain_id = ? AND seq = ?", (chain_id, seq)
            ).fetchone()
            return None if row is None else row_record(row)

        return await self._run(False, q)

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        where, args = filter_sql(filter, "?")
        bucket = max(1, int(bucket_seconds)) * 1_000_000
        refused_where = (where + " AND " if where else " WHERE ") + REFUSED_SQL

        def q(conn: sqlite3.Connection) -> AuditStats:
            series = tuple(
                (int(b), int(t), int(d))
                for b, t, d in conn.execute(
                    f"SELECT (time_us / {bucket}) * {bucket} AS b, COUNT(*),"  # noqa: S608  # constant SQL pieces; values are bound
                    f" SUM(CASE WHEN {REFUSED_SQL} THEN 1 ELSE 0 END)"
                    f" FROM audit_records{where} GROUP BY b ORDER BY b",
                    args,
                )
            )

            def top(expr: str, unnest: str = "") -> tuple[tuple[str, int], ...]:
                rows = conn.execute(
                    f"SELECT {expr} AS v, COUNT(*) AS n"  # noqa: S608  # constant SQL pieces; values are bound
                    f" FROM (SELECT * FROM audit_records{refused_where}) AS r{unnest}"
                    f" WHERE {expr} IS NOT NULL GROUP BY v ORDER BY n DESC, v LIMIT 10",
                    args,
                )
                return tuple((str(v), int(n)) for v, n in rows)

            return AuditStats(
                bucket_seconds=bucket // 1_000_000,
                series=series,
                top_users=top(USER_SQL),
                top_devices=top("r.device_id"),
                top_reasons=top("j.value", ", json_each(r.reasons) AS j"),
                total=sum(s[1] for s in series),
                denied=sum(s[2] for s in series),
            )

        return await self._run(False, q)

    async def checkpoints(self) -> list[Checkpoint]:
        def q(conn: sqlite3.Connection) -> list[Checkpoint]:
            rows = conn.execute(
                f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM audit_checkpoints"  # noqa: S608  # constant SQL pieces; values are bound
                " ORDER BY chain_id, seq, time_us"
            )
            return [row_checkpoint(r) for r in rows]

        return await self._run(False, q)


def _begin(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute("BEGIN IMMEDIATE")
    return conn


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (I/O error) may leave the transaction open: never let the next batch
        # start inside it.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _boundaries(conn: sqlite3.Connection, time_us: int) -> list[tuple[str, int]]:
    """Per chain, the newest non-retention checkpoint made before `time_us`, if it is past the
    chain's current retention point."""
    rows = conn.execute(
        "SELECT chain_id, MAX(seq) FROM audit_checkpoints"
        " WHERE time_us < ? AND kind != 'retention' GROUP BY chain_id",
        (time_us,),
    ).fetchall()
    out = []
    for chain_id, seq in rows:
        done = conn.execute(
            "SELECT MAX(seq) FROM audit_checkpoints WHERE chain_id = ? AND kind = 'retention'",
            (chain_id,),
        ).fetchone()[0]
        if done is None or int(seq) > int(done):
            out.append((str(chain_id), int(seq)))
    return out
