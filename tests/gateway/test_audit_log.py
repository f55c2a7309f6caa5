"""The SQLite audit log and its deferred indexing: log rows are append-only, indexing is
idempotent and crash-safe, every read (in this or another process) indexes first, verify walks
the log, retention trims it with a checkpoint, and the unindexed backlog is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from audit_helpers import T0, make_event

from gateway.audit.batch import SEP
from gateway.audit.chain import Chain
from gateway.audit.checkpoint import Checkpoint, load_private_key
from gateway.audit.query import AuditFilter, BadRecord
from gateway.audit.record import AuditRecord, canonical
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import verify
from gateway.audit.writer import AuditWriter

CHAIN = "log:1:1"
REPO = Path(__file__).resolve().parents[2]


def records(n: int, chain_id: str = CHAIN, start: int = 0) -> list[AuditRecord]:
    """`n` sealed records of one chain (times T0 + i)."""
    chain = Chain(chain_id)
    out = [chain.seal(make_event(time_us=T0 + i, request_id=f"r{i}")) for i in range(start + n)]
    return out[start:]


def raw(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """A direct SQL client (no store: nothing is indexed by it)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def attack(db: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Root on the host: drop every trigger, then run SQL against the file."""
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    for sql in statements:
        conn.execute(sql, params if "?" in sql else ())
    conn.commit()
    conn.close()


async def logged(db: Path, batches: list[list[AuditRecord]]) -> SqliteAuditStore:
    """A store whose log holds `batches` (one row each), none of them indexed yet."""
    store = SqliteAuditStore(db)
    await store.open()
    for batch in batches:
        await store.append_batch(batch)
    return store


def indexed_count(db: Path) -> int:
    return int(raw(db, "SELECT COUNT(*) FROM audit_records")[0][0])


@pytest.mark.anyio
async def test_audit_flush_writes_one_log_row_and_no_indexed_row(tmp_path: Path) -> None:
    """A batch is one log row holding its records; audit_records stays empty until a read."""
    db = tmp_path / "audit.db"
    recs = records(50)
    store = await logged(db, [recs[:30], recs[30:]])
    assert raw(db, "SELECT first_seq, last_seq, count FROM audit_log ORDER BY id") == [
        (1, 30, 30),
        (31, 50, 20),
    ]
    assert indexed_count(db) == 0
    assert await store.unindexed() == 50
    assert [r async for r in store.iter_chain(CHAIN)] == recs  # a read indexes first
    assert indexed_count(db) == 50
    assert await store.unindexed() == 0
    await store.close()


@pytest.mark.anyio
async def test_audit_log_rows_refuse_update_and_delete(tmp_path: Path) -> None:
    """A direct SQL client can neither change nor remove a log row."""
    db = tmp_path / "audit.db"
    store = await logged(db, [records(5)])
    await store.close()
    conn = sqlite3.connect(db)
    for sql in (
        "UPDATE audit_log SET body = x'00'",
        "UPDATE audit_log SET first_seq = 7",
        "DELETE FROM audit_log",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert raw(db, "SELECT COUNT(*) FROM audit_log") == [(1,)]


@pytest.mark.anyio
async def test_audit_indexing_is_idempotent(tmp_path: Path) -> None:
    """Indexing again, even after the progress mark was lost, never indexes a record twice."""
    db = tmp_path / "audit.db"
    recs = records(40)
    store = await logged(db, [recs[:10], recs[10:25], recs[25:]])
    assert await store.index_pending() == 40
    assert await store.index_pending() == 0
    raw_conn = sqlite3.connect(db)
    raw_conn.execute("UPDATE audit_log_indexed SET log_id = 0")  # as if the mark were lost
    raw_conn.commit()
    raw_conn.close()
    await store.index_pending()
    assert indexed_count(db) == 40
    assert raw(db, "SELECT seq FROM audit_records GROUP BY chain_id, seq HAVING COUNT(*) > 1") == []
    assert [r async for r in store.iter_chain(CHAIN)] == recs
    assert (await verify(store, None)).ok
    await store.close()


@pytest.mark.anyio
async def test_audit_duplicate_records_are_refused_or_skipped(tmp_path: Path) -> None:
    """A record already logged raises IntegrityError (nothing of its batch is stored), or is
    skipped when a partly committed spool is drained (`ignore_existing`)."""
    db = tmp_path / "audit.db"
    recs = records(10)
    store = await logged(db, [recs[:6]])
    with pytest.raises(sqlite3.IntegrityError):
        await store.append_batch(recs[4:])
    assert raw(db, "SELECT COUNT(*) FROM audit_log") == [(1,)]
    await store.append_batch(recs[3:], ignore_existing=True)
    assert [r async for r in store.iter_chain(CHAIN)] == recs
    assert raw(db, "SELECT first_seq, last_seq FROM audit_log ORDER BY id") == [(1, 6), (7, 10)]
    await store.close()


_INDEXER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.audit.store_sqlite import SqliteAuditStore

    async def main() -> None:
        store = SqliteAuditStore(__import__("pathlib").Path(sys.argv[1]))
        await store.open()
        while await store.index_pending(200):
            print("step", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.anyio
async def test_audit_kill_9_while_indexing_loses_nothing(tmp_path: Path) -> None:
    """A process killed with SIGKILL in the middle of indexing leaves log and index consistent:
    the next reader finishes the job, every record is indexed exactly once and verify passes."""
    db = tmp_path / "audit.db"
    recs = records(6000)
    store = await logged(db, [recs[i : i + 100] for i in range(0, len(recs), 100)])
    await store.close()
    # close() indexes: start again from a file whose log is wholly unindexed.
    attack(db, "DELETE FROM audit_records", "UPDATE audit_log_indexed SET log_id = 0")
    # (the indexer's store.open() re-creates the triggers)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _INDEXER,
        str(db),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    for _ in range(3):  # some steps committed, many more to go
        assert await proc.stdout.readline(), "the indexer ended early"
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = indexed_count(db)
    assert 0 < done < len(recs)
    store = SqliteAuditStore(db)
    report = await verify(store, None)  # reads index first: the rest is indexed now
    assert report.ok, report.first_bad
    assert report.records_checked == len(recs)
    assert indexed_count(db) == len(recs)
    assert raw(db, "SELECT seq FROM audit_records GROUP BY chain_id, seq HAVING COUNT(*) > 1") == []
    await store.close()


_CLI_QUERY = textwrap.dedent(
    """
    import argparse, sys
    from pathlib import Path
    from gateway.audit.cli import AuditCliConfig, add_audit_parser, run_audit

    base = Path(sys.argv[1])
    parser = argparse.ArgumentParser(prog="tabiji")
    add_audit_parser(parser.add_subparsers(dest="command"))
    config = AuditCliConfig(
        store_url="sqlite:///audit.db",
        base_dir=base,
        key_file=base / "audit-key.pem",
        checkpoint_export=None,
        actor="auditor@town.example",
    )
    sys.exit(run_audit(parser.parse_args(["audit", *sys.argv[2:]]), config))
    """
)


@pytest.mark.anyio
async def test_audit_cli_in_another_process_sees_unindexed_records(tmp_path: Path) -> None:
    """Records a gateway committed to the log but did not index yet are found by `tabiji audit
    query` run in another process, while the gateway's store is still open."""
    db = tmp_path / "audit.db"
    store = await logged(db, [records(7)])
    assert indexed_count(db) == 0
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _CLI_QUERY, str(tmp_path), "query", "--json", "--limit", "100"],
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]
    found = lines[0] if len(lines) == 1 and isinstance(lines[0], list) else lines
    assert sorted(r["request_id"] for r in found) == sorted(f"r{i}" for i in range(7))
    # The seven, and the auditor's own look at them (a view record, also through the log).
    assert await store.count(AuditFilter(kind="request")) == 7
    assert await store.count(AuditFilter(kind="view")) == 1
    await store.close()


async def _tampered(tmp_path: Path, *statements: str, index: bool = True) -> BadRecord | None:
    """Three log rows of 10 records (indexed or not), then `statements`; verify's first bad."""
    db = tmp_path / "audit.db"
    recs = records(30)
    store = await logged(db, [recs[:10], recs[10:20], recs[20:]])
    if index:
        await store.index_pending()
    await store.close()
    attack(db, *statements)
    store = SqliteAuditStore(db)
    report = await verify(store, None)
    await store.close()
    return report.first_bad


def _swap_two_records(db_row_body: bytes, hashes: bytes) -> tuple[bytes, bytes]:
    parts = db_row_body.split(SEP)
    parts[3], parts[4] = parts[4], parts[3]
    hs = [hashes[i : i + 32] for i in range(0, len(hashes), 32)]
    hs[3], hs[4] = hs[4], hs[3]
    return SEP.join(parts), b"".join(hs)


@pytest.mark.anyio
@pytest.mark.parametrize("index", [True, False], ids=["indexed", "unindexed"])
async def test_audit_verify_catches_an_edited_log_record(tmp_path: Path, index: bool) -> None:
    """A record's bytes changed in the log (indexed already or not) fail verify at that seq."""
    bad = await _tampered(
        tmp_path,
        "UPDATE audit_log SET body = CAST(replace(CAST(body AS TEXT), '\"r14\"', '\"rX4\"')"
        " AS BLOB) WHERE first_seq = 11",
        index=index,
    )
    assert bad is not None
    assert (bad.seq, bad.what) == (15, "edited")


@pytest.mark.anyio
async def test_audit_verify_catches_a_deleted_log_row(tmp_path: Path) -> None:
    """A log row removed after indexing: the log misses its records."""
    bad = await _tampered(tmp_path, "DELETE FROM audit_log WHERE first_seq = 11")
    assert bad is not None
    assert (bad.seq, bad.what) == (11, "missing")


@pytest.mark.anyio
async def test_audit_verify_catches_reordered_log_records(tmp_path: Path) -> None:
    """Two records swapped inside a log row break the chain there."""
    db = tmp_path / "audit.db"
    recs = records(30)
    store = await logged(db, [recs[:10], recs[10:20], recs[20:]])
    await store.index_pending()
    await store.close()
    body, hashes = raw(db, "SELECT body, hashes FROM audit_log WHERE first_seq = 11")[0]
    new_body, new_hashes = _swap_two_records(bytes(body), bytes(hashes))
    attack(
        db,
        "UPDATE audit_log SET body = ?, hashes = ? WHERE first_seq = 11",
        params=(new_body, new_hashes),
    )
    store = SqliteAuditStore(db)
    report = await verify(store, None)
    await store.close()
    assert report.first_bad is not None
    assert report.first_bad.seq == 14
    assert report.first_bad.what in ("out-of-order", "edited")


@pytest.mark.anyio
async def test_audit_verify_catches_a_record_inserted_into_the_log(tmp_path: Path) -> None:
    """A well-hashed forged record added to the log (linking to a real one) is found."""
    db = tmp_path / "audit.db"
    recs = records(30)
    store = await logged(db, [recs[:10], recs[10:20], recs[20:]])
    await store.index_pending()
    await store.close()
    forged = Chain(CHAIN, seq=30, head=recs[-1].hash).seal(make_event(request_id="forged"))
    data = canonical(CHAIN, forged.seq, forged.event)
    attack(
        db,
        "INSERT INTO audit_log (chain_id, first_seq, last_seq, count, prev_hash, hashes, body)"
        " VALUES (?, ?, ?, 1, ?, ?, ?)",
        params=(CHAIN, 31, 31, forged.prev_hash, bytes.fromhex(forged.hash), data),
    )
    # Marked indexed as root would, so nothing re-indexes it: the index lacks it.
    attack(db, "UPDATE audit_log_indexed SET log_id = (SELECT MAX(id) FROM audit_log)")
    store = SqliteAuditStore(db)
    report = await verify(store, None)
    await store.close()
    assert report.first_bad is not None
    assert (report.first_bad.seq, report.first_bad.what) == (31, "not-indexed")


@pytest.mark.anyio
async def test_audit_verify_catches_an_index_row_missing_from_the_log(tmp_path: Path) -> None:
    """A record added to the index alone (not through the log) is named."""
    db = tmp_path / "audit.db"
    recs = records(31)
    store = await logged(db, [recs[:30]])
    await store.index_pending()
    await store.close()
    from gateway.audit.store import COLUMNS, record_row

    marks = ", ".join("?" * len(COLUMNS))
    attack(db, f"INSERT INTO audit_records VALUES ({marks})", params=record_row(recs[30]))  # noqa: S608  # test SQL
    store = SqliteAuditStore(db)
    report = await verify(store, None)
    await store.close()
    assert report.first_bad is not None
    assert (report.first_bad.seq, report.first_bad.what) == (31, "not-in-log")


@pytest.mark.anyio
async def test_audit_backlog_is_bounded(tmp_path: Path) -> None:
    """Past the bound, a flush indexes the oldest log rows in its own commit, so the unindexed
    backlog never exceeds the bound and no read is needed for it."""
    db = tmp_path / "audit.db"
    store = SqliteAuditStore(db)
    await store.open()
    store.max_unindexed = 100
    recs = records(400)
    for i in range(0, 400, 60):
        await store.append_batch(recs[i : i + 60])
        assert store.backlog <= 100  # as the flush's own commit left it
        assert await store.unindexed() <= 100
    assert indexed_count(db) >= 300
    assert [r async for r in store.iter_chain(CHAIN)] == recs
    await store.close()


@pytest.mark.anyio
async def test_audit_writer_indexes_with_spare_cpu(tmp_path: Path) -> None:
    """An idle writer indexes its backlog without any read, and reports the backlog."""
    db = tmp_path / "audit.db"
    store = SqliteAuditStore(db)
    await store.open()
    seen: list[int] = []
    writer = AuditWriter(store, chain_id=CHAIN, flush_interval=0.02, on_backlog=seen.append)
    await writer.start()
    for i in range(50):
        writer.submit(make_event(request_id=f"idle-{i}"))
    deadline = time.monotonic() + 30
    # Polls the file: the indexing happens on the store's thread, with no event to wait on.
    while time.monotonic() < deadline and (indexed_count(db) < 50 or not seen or seen[-1]):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert indexed_count(db) == 50
    assert seen[-1] == 0
    await writer.close()
    await store.close()


@pytest.mark.anyio
async def test_audit_retention_trims_the_log_and_verify_passes(tmp_path: Path) -> None:
    """Retention deletes the log rows wholly before its checkpoint (a row across it stays), in
    the same transaction as the records and the signed retention checkpoint; verify passes and
    the log's triggers are back."""
    db = tmp_path / "audit.db"
    key = load_private_key(tmp_path / "k.pem", create=True)
    recs = records(25)
    store = await logged(db, [recs[:10], recs[10:20], recs[20:]])  # a row across seq 15
    await store.add_checkpoint(Checkpoint(CHAIN, 15, recs[14].hash, T0, 15, "periodic").signed(key))

    def sign(chain_id: str, seq: int, head: str, count: int) -> Checkpoint:
        return Checkpoint(chain_id, seq, head, T0 + 1, count, "retention").signed(key)

    deleted = await store.delete_before(T0 + 1, sign)
    assert deleted == {CHAIN: 15}
    assert raw(db, "SELECT first_seq FROM audit_log ORDER BY first_seq") == [(11,), (21,)]
    assert indexed_count(db) == 10
    report = await verify(store, key.public_key())
    assert report.ok, report.first_bad
    assert report.records_checked == 10
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw(db, "DELETE FROM audit_log")
    await store.close()
