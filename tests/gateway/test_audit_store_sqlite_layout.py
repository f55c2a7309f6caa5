"""The SQLite audit store's layout and write path: batches inserted in chunks on the event loop
stay all-or-nothing, files of the earlier WITHOUT ROWID layout stay usable, and the partial user
and device indexes still serve their filters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from audit_helpers import T0, make_event

from gateway.audit.chain import Chain
from gateway.audit.query import AuditFilter
from gateway.audit.record import AuditRecord
from gateway.audit.store import COLUMNS, filter_sql
from gateway.audit.store_sqlite import _SELECT, INSERT_CHUNK, SqliteAuditStore, _coldef
from gateway.audit.verify import verify


def chain_records(n: int, chain_id: str = "c:1:1") -> list[AuditRecord]:
    """`n` sealed records of one chain, every other one with a user and a device."""
    chain = Chain(chain_id)
    return [
        chain.seal(
            make_event(
                time_us=T0 + i,
                request_id=f"r{i}",
                user_email="ito@town.example" if i % 2 else None,
                user_subject="u-9" if i % 2 else None,
                device_id="dev-7" if i % 2 else None,
            )
        )
        for i in range(n)
    ]


@pytest.mark.anyio
async def test_audit_sqlite_chunked_batch_is_all_or_nothing(tmp_path: Path) -> None:
    """A batch spanning several insert chunks with a duplicate in its last chunk stores nothing,
    and the next batch commits normally."""
    store = SqliteAuditStore(tmp_path / "a.db")
    await store.open()
    recs = chain_records(3 * INSERT_CHUNK + 5)
    await store.append_batch(recs[:1])
    with pytest.raises(sqlite3.IntegrityError):
        await store.append_batch([*recs[1:], recs[0]])
    assert await store.count(AuditFilter()) == 1
    await store.append_batch(recs[1:])
    assert await store.count(AuditFilter()) == len(recs)
    assert [r async for r in store.iter_chain("c:1:1")] == recs
    await store.close()


@pytest.mark.anyio
async def test_audit_sqlite_reads_and_appends_old_layout(tmp_path: Path) -> None:
    """A file made by the earlier WITHOUT ROWID layout opens, takes new records and verifies."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE audit_records ("
        + ", ".join(_coldef(c) for c in COLUMNS)
        + ", PRIMARY KEY (chain_id, seq)) WITHOUT ROWID"
    )
    conn.close()
    recs = chain_records(10)
    store = SqliteAuditStore(path)
    await store.open()
    await store.append_batch(recs[:4])
    await store.append_batch(recs[4:])
    assert [r async for r in store.iter_chain("c:1:1")] == recs
    assert (await verify(store, None)).ok
    await store.close()
    conn = sqlite3.connect(path)
    ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit_records'").fetchone()[0]
    conn.close()
    assert "WITHOUT ROWID" in ddl


@pytest.mark.anyio
async def test_audit_sqlite_user_and_device_filters_use_partial_indexes(tmp_path: Path) -> None:
    """Filtering by user or device searches their (partial) indexes and finds only their rows."""
    store = SqliteAuditStore(tmp_path / "a.db")
    await store.open()
    await store.append_batch(chain_records(20))
    assert await store.count(AuditFilter(user="ito@town.example")) == 10
    assert await store.count(AuditFilter(user="u-9")) == 10
    assert await store.count(AuditFilter(device="dev-7", since_us=T0 + 10)) == 5
    await store.close()
    conn = sqlite3.connect(tmp_path / "a.db")
    for flt, index in (
        (AuditFilter(user="ito@town.example"), "audit_records_email"),
        (AuditFilter(user="ito@town.example"), "audit_records_subject"),
        (AuditFilter(device="dev-7", since_us=T0), "audit_records_device"),
    ):
        where, args = filter_sql(flt, "?")
        plan = " ".join(
            str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {_SELECT}{where}", args)
        )
        assert f"USING INDEX {index}" in plan
    assert conn.execute(
        "SELECT COUNT(*) FROM audit_records INDEXED BY audit_records_device"
        " WHERE device_id IS NOT NULL"
    ).fetchone() == (10,)
    conn.close()
