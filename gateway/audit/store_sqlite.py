"""The embedded audit store: SQLite in WAL mode, append-only enforced by triggers.

Writes run on one thread (one connection), reads on another, so the writer's commits never wait
for a long auditor query. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.audit.batch import HASH_BYTES, SealedBatch, batches_of
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
    row_checkpoint,
    row_record,
)

T = TypeVar("T")
log = logging.getLogger("tabiji.audit")
PAGE: Final = 1000
LOG_PAGE: Final = 16  # log rows per read while walking the log (a row holds a whole flush)
# The bound on deferred indexing: past this many unindexed records a flush indexes inline the
# oldest rows beyond it, so a first query never waits more than about this many records'
# indexing (≈ 25 s at the measured ≈ 20 µs/record).
MAX_UNINDEXED: Final = 1_000_000
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
INDEX_STEP: Final = 2000  # records per indexing transaction (whole log rows): short lock holds


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
# The append-only log: one row per flush and chain, holding the batch's records as their
# canonical bytes (joined by SEP) and raw hashes. It is what a flush writes (one row instead of
# one indexed row per record); audit_records is filled from it later (deferred indexing) and
# the row id up to which that is done is kept in audit_log_indexed, in the same transaction.
_LOG_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " chain_id TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    " count INTEGER NOT NULL, prev_hash TEXT NOT NULL, hashes BLOB NOT NULL, body BLOB NOT NULL)"
)
_LOG_INDEX_DDL: Final = (
    "CREATE INDEX IF NOT EXISTS audit_log_chain ON audit_log (chain_id, first_seq)"
)
_INDEXED_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS audit_log_indexed (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " log_id INTEGER NOT NULL, appended INTEGER NOT NULL, indexed INTEGER NOT NULL)"
)
_LOG_NO_DELETE: Final = (
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
)
_INSERT_LOG: Final = (
    "INSERT INTO audit_log (chain_id, first_seq, last_seq, count, prev_hash, hashes, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Records appended to and indexed from the log, counted in the same transactions as the rows:
# the backlog in O(1), whichever process wrote or indexed.
_BACKLOG_SQL: Final = "SELECT MAX(0, appended - indexed) FROM audit_log_indexed WHERE id = 1"
_APPENDED_SQL: Final = (
    "UPDATE audit_log_indexed SET appended = appended + ? WHERE id = 1"
    " RETURNING MAX(0, appended - indexed)"
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
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    _LOG_NO_DELETE,
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
        self.max_unindexed = MAX_UNINDEXED
        self.backlog = 0  # unindexed records after this store's last write or index
        self.indexed_records = 0  # records this store indexed (the bench reports their CPU)
        self.index_cpu_s = 0.0  # thread CPU seconds those took
        self._written = False

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
            conn.execute(_LOG_DDL)
            conn.execute(_LOG_INDEX_DDL)
            conn.execute(_INDEXED_DDL)
            conn.execute(
                "INSERT OR IGNORE INTO audit_log_indexed (id, log_id, appended, indexed)"
                " VALUES (1, 0, 0, 0)"
            )
            for index in INDEXES:
                conn.execute(index_ddl(*index))
            for ddl in _TRIGGERS:
                conn.execute(ddl)

        await self._call(True, setup)

    async def close(self) -> None:
        if self._wpool is not None:
            # Shutdown: index what is left and fold the WAL into the database file.
            try:
                await self.index_pending()
                await self._run(True, lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            except (AuditStoreUnavailable, sqlite3.Error) as exc:
                log.warning("audit: indexing at close failed: %s", exc)
        for write, pool in ((True, self._wpool), (False, self._rpool)):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._drop, write)
                pool.shutdown(wait=True)
        self._wpool = self._rpool = None

    # ---------------------------------------------------------------- writes

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        """Records handed in whole (spool drains, tests): into the log like a flush's."""
        if records:
            await self.append_log(batches_of(records), ignore_existing=ignore_existing)

    async def append_log(
        self, batches: Sequence[SealedBatch], *, ignore_existing: bool = False, check: bool = True
    ) -> int:
        """One log row per batch, in one transaction (all or nothing); returns the unindexed
        backlog after it. A record whose (chain_id, seq) is already stored raises
        IntegrityError, or with `ignore_existing` is skipped (a partly committed spool).
        `check=False`: the caller (the chain's own writer) vouches the batches continue its
        chain, which saves two look-ups per flush (indexing still never duplicates a record).
        Past MAX_UNINDEXED unindexed records, the oldest are indexed in the same commit."""
        if not batches:
            return self.backlog
        limit = self.max_unindexed

        def write(conn: sqlite3.Connection) -> int:
            _begin(conn)
            try:
                added = 0
                for batch in batches:
                    b = _after_stored(conn, batch, ignore_existing) if check else batch
                    if b is None:
                        continue
                    added += len(b)
                    conn.execute(
                        _INSERT_LOG,
                        (
                            b.chain_id,
                            b.first_seq,
                            b.last_seq,
                            b.count,
                            b.prev_hash,
                            b.hashes,
                            b.body,
                        ),
                    )
                backlog = int(conn.execute(_APPENDED_SQL, (added,)).fetchone()[0])
                if backlog > limit:
                    # The bound: deferred work must not grow without limit (README).
                    cpu = time.thread_time()
                    n = _index(conn, backlog - limit)
                    self.index_cpu_s += time.thread_time() - cpu
                    self.indexed_records += n
                    backlog -= n
            except BaseException:
                _rollback(conn)
                raise
            _commit(conn)
            return backlog

        self.backlog = await self._run(True, write)
        return self.backlog

    async def index_pending(self, limit: int | None = None) -> int:
        """Index up to `limit` records of the log (all when None) into audit_records, in
        transactions of whole log rows; returns how many were indexed. Idempotent and safe to
        run from any process at once (each takes the database's write lock)."""
        done = 0
        while limit is None or done < limit:
            step = INDEX_STEP if limit is None else min(INDEX_STEP, limit - done)

            def run(conn: sqlite3.Connection, step: int = step) -> tuple[int, int]:
                cpu = time.thread_time()
                try:
                    _begin(conn)
                    try:
                        n = _index(conn, step)
                        backlog = int(conn.execute(_BACKLOG_SQL).fetchone()[0])
                    except BaseException:
                        _rollback(conn)
                        raise
                    _commit(conn)
                finally:
                    self.index_cpu_s += time.thread_time() - cpu
                return n, backlog

            n, self.backlog = await self._run(True, run)
            done += n
            if n == 0:
                break
        self.indexed_records += done
        return done

    async def _index_first(self) -> None:
        """Before any read: index what the log holds (this or another process's flushes), so
        every committed record is seen. A read-only copy cannot: it reads what is indexed
        (verify still walks the log)."""

        def pending(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM audit_log WHERE id >"
                    " (SELECT log_id FROM audit_log_indexed WHERE id = 1))"
                ).fetchone()[0]
            )

        try:
            if not await self._run(False, pending):
                return
            await self.index_pending()
        except (AuditStoreUnavailable, sqlite3.Error) as exc:
            log.warning("audit: could not index the log before reading: %s", exc)

    async def unindexed(self) -> int:
        """How many logged records are not indexed yet (all processes')."""
        self.backlog = int(await self._run(False, lambda c: c.execute(_BACKLOG_SQL).fetchone()[0]))
        return self.backlog

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        row = checkpoint_row(checkpoint)
        sql = (
            f"INSERT OR IGNORE INTO audit_checkpoints ({', '.join(CHECKPOINT_COLUMNS)})"  # noqa: S608  # constant SQL pieces; values are bound
            f" VALUES ({', '.join('?' * len(CHECKPOINT_COLUMNS))})"
        )
        await self._run(True, lambda c: c.execute(sql, row))

    async def delete_before(self, time_us: int, sign: RetentionSigner) -> dict[str, int]:
        await self.index_pending()  # retention counts and deletes indexed records only

        def trim(conn: sqlite3.Connection) -> list[Checkpoint]:
            made: list[Checkpoint] = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                # The trigger is dropped and re-created inside this one transaction: no other
                # connection ever sees the table without it (DDL is transactional in SQLite).
                conn.execute("DROP TRIGGER audit_records_no_delete")
                conn.execute("DROP TRIGGER audit_log_no_delete")
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
                    # Log rows wholly at or below the boundary go too; a row across it stays
                    # (verify skips its records up to the retention checkpoint).
                    conn.execute(
                        "DELETE FROM audit_log WHERE chain_id = ? AND last_seq <= ?",
                        (chain_id, boundary),
                    )
                    cp = sign(chain_id, boundary, head[0], n)
                    conn.execute(
                        f"INSERT INTO audit_checkpoints ({', '.join(CHECKPOINT_COLUMNS)})"  # noqa: S608  # constant SQL pieces; values are bound
                        f" VALUES ({', '.join('?' * len(CHECKPOINT_COLUMNS))})",
                        checkpoint_row(cp),
                    )
                    made.append(cp)
                conn.execute(_NO_DELETE)
                conn.execute(_LOG_NO_DELETE)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return made

        made = await self._run(True, trim)
        return {cp.chain_id: cp.count for cp in made}

    # ---------------------------------------------------------------- reads

    async def chains(self) -> list[str]:
        await self._index_first()

        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT chain_id FROM audit_records UNION SELECT chain_id FROM audit_log ORDER BY 1"
            )
            return [r[0] for r in rows]

        return await self._run(False, q)

    async def iter_chain(self, chain_id: str) -> AsyncIterator[AuditRecord]:
        await self._index_first()
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

    async def iter_log(self, chain_id: str) -> AsyncIterator[tuple[int, str, str, bytes, bool]]:
        """The chain's records as the log holds them, in seq order: (seq, prev_hash, hash,
        canonical bytes, indexed). Malformed rows raise ValueError (verify reports them)."""
        mark = int(
            await self._run(
                False,
                lambda c: c.execute("SELECT log_id FROM audit_log_indexed WHERE id = 1").fetchone()[
                    0
                ],
            )
        )
        after = (-1, -1)
        while True:

            def page(conn: sqlite3.Connection, after: tuple[int, int] = after) -> list[Any]:
                return conn.execute(
                    "SELECT first_seq, id, chain_id, prev_hash, hashes, body FROM audit_log"
                    " WHERE chain_id = ?1 AND (first_seq > ?2 OR (first_seq = ?2 AND id > ?3))"
                    " ORDER BY first_seq, id LIMIT ?4",
                    (chain_id, *after, LOG_PAGE),
                ).fetchall()

            rows = await self._run(False, page)
            for row in rows:
                batch = log_batch((row[2], row[0], row[3], row[4], row[5]))
                indexed = int(row[1]) <= mark
                for seq, prev, h, data in batch.links():
                    yield seq, prev, h, data, indexed
            if len(rows) < LOG_PAGE:
                return
            after = (int(rows[-1][0]), int(rows[-1][1]))

    async def head(self, chain_id: str) -> tuple[int, str] | None:
        await self._index_first()

        def q(conn: sqlite3.Connection) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT seq, hash FROM audit_records WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
                (chain_id,),
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return await self._run(False, q)

    async def query(self, filter: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
        await self._index_first()
        where, args = filter_sql(filter, "?")
        sql = f"{_SELECT}{where} ORDER BY time_us DESC, chain_id, seq DESC LIMIT ? OFFSET ?"

        def q(conn: sqlite3.Connection) -> list[AuditRecord]:
            return [row_record(r) for r in conn.execute(sql, [*args, limit, offset])]

        return await self._run(False, q)

    async def count(self, filter: AuditFilter) -> int:
        await self._index_first()
        where, args = filter_sql(filter, "?")

        def q(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(f"SELECT COUNT(*) FROM audit_records{where}", args).fetchone()[0]  # noqa: S608  # constant SQL pieces; values are bound
            )

        return await self._run(False, q)

    async def get(self, chain_id: str, seq: int) -> AuditRecord | None:
        await self._index_first()

        def q(conn: sqlite3.Connection) -> AuditRecord | None:
            row = conn.execute(
                f"{_SELECT} WHERE chain_id = ? AND seq = ?", (chain_id, seq)
            ).fetchone()
            return None if row is None else row_record(row)

        return await self._run(False, q)

    async def stats(self, filter: AuditFilter, bucket_seconds: int) -> AuditStats:
        await self._index_first()
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


_TOP_SQL: Final = (
    "SELECT MAX(m) FROM (SELECT (SELECT last_seq FROM audit_log WHERE chain_id = ?1"
    " ORDER BY first_seq DESC LIMIT 1) AS m"
    " UNION ALL SELECT (SELECT MAX(seq) FROM audit_records WHERE chain_id = ?1))"
)


def _after_stored(
    conn: sqlite3.Connection, batch: SealedBatch, ignore_existing: bool
) -> SealedBatch | None:
    """The batch without the records its chain already has (or IntegrityError)."""
    top = conn.execute(_TOP_SQL, (batch.chain_id,)).fetchone()[0]
    if top is None or batch.first_seq > int(top):
        return batch
    if not ignore_existing:
        raise sqlite3.IntegrityError(
            f"UNIQUE constraint failed: audit record {batch.chain_id} {batch.first_seq}"
            " is already stored"
        )
    return batch.tail(int(top) - batch.first_seq + 1)


def log_batch(row: Sequence[Any]) -> SealedBatch:
    """A log row (chain_id, first_seq, prev_hash, hashes, body) as its batch; ValueError when
    the row is malformed (its hashes and records do not pair up)."""
    chain_id, first_seq, prev_hash, hashes, body = row
    raw = bytes(hashes)
    if len(raw) % HASH_BYTES:
        raise ValueError("audit log row: hashes and records do not pair up")
    return SealedBatch(
        str(chain_id), int(first_seq), str(prev_hash), bytes(body), raw, len(raw) // HASH_BYTES
    )


def _index(conn: sqlite3.Connection, want: int) -> int:
    """Inside a write transaction: index whole log rows past the mark until `want` records are
    done; move the mark with them (same transaction: a crash leaves both or neither). INSERT OR
    IGNORE: a record already indexed (a mark lost, a legacy row) is never indexed twice.
    Returns the records of the rows consumed."""
    mark = int(conn.execute("SELECT log_id FROM audit_log_indexed WHERE id = 1").fetchone()[0])
    done = 0
    sql = _INSERT.replace("INSERT", "INSERT OR IGNORE", 1)
    while done < want:
        rows = conn.execute(
            "SELECT id, chain_id, first_seq, prev_hash, hashes, body, count FROM audit_log"
            " WHERE id > ? ORDER BY id LIMIT 8",
            (mark,),
        ).fetchall()
        if not rows:
            break
        for row in rows:
            mark = int(row[0])
            done += int(row[6])
            try:
                batch_rows = log_batch(row[1:6]).rows()
            # A damaged row: verify names it; the rows after it are still indexed.
            except (ValueError, IndexError, TypeError) as exc:
                log.error("audit log row %d cannot be indexed: %s", mark, exc)
            else:
                conn.executemany(sql, batch_rows)
            if done >= want:
                break
    conn.execute(
        "UPDATE audit_log_indexed SET log_id = ?, indexed = indexed + ? WHERE id = 1",
        (mark, done),
    )
    return done


def link_ok(prefix: bytes, prev_hash: str, data: bytes, hash_hex: str) -> bool:
    """The record's bytes name its own chain and seq (`prefix`) and hash to `hash_hex`."""
    if not data.startswith(prefix):
        return False
    h = hashlib.sha256(bytes.fromhex(prev_hash))
    h.update(data)
    return h.hexdigest() == hash_hex
