"""verify: an attacker with root edits the SQLite file directly (triggers dropped); every kind of
tampering is caught and the first bad record is named. Signed checkpoints and the export too."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from audit_helpers import Filled, fill, make_event
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.batch import batches_of
from gateway.audit.checkpoint import Checkpoint, append_export, read_export
from gateway.audit.query import BadRecord
from gateway.audit.record import AuditRecord, chain_hash, record_from_dict
from gateway.audit.store import COLUMNS, record_row, row_record
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import PROBLEMS, verify

CHAIN = "h:1:1"
INSERT = f"INSERT INTO audit_records VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608  # constants
SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_records ORDER BY seq"  # noqa: S608  # constants


@pytest.fixture
async def filled(tmp_path: Path) -> Filled:
    """20 records in one chain, checkpoints after seq 7, 14 and the closing one at 20."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    await store.open()
    f = await fill(store, tmp_path, 20)
    await store.close()
    return f


def attack(db: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """Root on the host: drop the append-only triggers and run SQL against the file."""
    conn = sqlite3.connect(db)
    for name in [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]:
        conn.execute(f"DROP TRIGGER {name}")
    for sql in statements:
        conn.execute(sql, params if "?" in sql else ())
    conn.commit()
    conn.close()


def relog(db: Path) -> None:
    """A careful attacker rewrites the append-only log too, to match the edited records (one
    log row per record, every row marked indexed)."""
    records = read_all(db)
    attack(db, "DELETE FROM audit_log")
    conn = sqlite3.connect(db)
    for b in batches_of(records):
        for seq, prev, h, data in b.links():
            conn.execute(
                "INSERT INTO audit_log (chain_id, first_seq, last_seq, count, prev_hash, hashes,"
                " body) VALUES (?, ?, ?, 1, ?, ?, ?)",
                (b.chain_id, seq, seq, prev, bytes.fromhex(h), data),
            )
    conn.execute("UPDATE audit_log_indexed SET log_id = (SELECT MAX(id) FROM audit_log)")
    conn.commit()
    conn.close()


def read_all(db: Path) -> list[AuditRecord]:
    conn = sqlite3.connect(db)
    rows = conn.execute(SELECT).fetchall()
    conn.close()
    return [row_record(r) for r in rows]


def rehash_from(db: Path, records: list[AuditRecord], start: int) -> None:
    """Recompute every hash from index `start` on and write the rows back (a careful attacker)."""
    prev = records[start - 1].hash
    fixed = []
    for r in records[start:]:
        h = chain_hash(prev, r.chain_id, r.seq, r.event)
        fixed.append(replace(r, prev_hash=prev, hash=h))
        prev = h
    attack(db, f"DELETE FROM audit_records WHERE seq > {records[start - 1].seq}")  # noqa: S608  # test SQL
    conn = sqlite3.connect(db)
    conn.executemany(
        INSERT,
        [record_row(r) for r in fixed],
    )
    conn.commit()
    conn.close()


async def check(f: Filled, db: Path, export: bool = True) -> BadRecord | None:
    store = SqliteAuditStore(db)
    try:
        report = await verify(store, f.key.public_key(), f.export if export else None)
    finally:
        await store.close()
    assert report.ok is (report.first_bad is None)
    return report.first_bad


@pytest.mark.anyio
async def test_audit_untouched_trail_verifies(filled: Filled, tmp_path: Path) -> None:
    """An untouched trail passes: every record and checkpoint (DB and export) checked."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    report = await verify(store, filled.key.public_key(), filled.export)
    await store.close()
    assert report.ok
    assert report.records_checked == 20
    assert report.chains_checked == 1
    assert report.checkpoints_checked == 8  # seq 7, 14, 20 and the close at 20; DB + export
    assert report.last_checkpoint_us is not None


@pytest.mark.anyio
async def test_audit_verify_catches_an_edit(filled: Filled, tmp_path: Path) -> None:
    """Changing a refusal into an allow is caught at that record."""
    db = tmp_path / "audit.db"
    attack(db, "UPDATE audit_records SET decision = 'allow', reasons = '[]' WHERE seq = 4")
    assert await check(filled, db) == BadRecord(CHAIN, 4, "edited", PROBLEMS["edited"])


@pytest.mark.anyio
async def test_audit_verify_catches_an_edit_of_a_filter_column(
    filled: Filled, tmp_path: Path
) -> None:
    """Every column is covered by the hash: changing only the user e-mail is caught too."""
    db = tmp_path / "audit.db"
    attack(db, "UPDATE audit_records SET user_email = 'someone@else' WHERE seq = 11")
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (11, "edited")


@pytest.mark.anyio
async def test_audit_verify_catches_a_deletion(filled: Filled, tmp_path: Path) -> None:
    """A deleted record leaves a gap: the missing seq is named."""
    db = tmp_path / "audit.db"
    attack(db, "DELETE FROM audit_records WHERE seq = 5")
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.chain_id, bad.seq, bad.what) == (CHAIN, 5, "missing")


@pytest.mark.anyio
async def test_audit_verify_catches_reordering(filled: Filled, tmp_path: Path) -> None:
    """Two records swapped in the sequence: the first position that no longer links is named."""
    db = tmp_path / "audit.db"
    attack(
        db,
        "UPDATE audit_records SET seq = -5 WHERE seq = 5",
        "UPDATE audit_records SET seq = 5 WHERE seq = 6",
        "UPDATE audit_records SET seq = 6 WHERE seq = -5",
    )
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (5, "out-of-order")


@pytest.mark.anyio
async def test_audit_verify_catches_an_insertion(filled: Filled, tmp_path: Path) -> None:
    """A forged record slipped in at seq 5 — correctly hashed onto seq 4 — is named."""
    db = tmp_path / "audit.db"
    records = read_all(db)
    attack(
        db,
        "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 5",
        "UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1000",
    )
    four = records[3]
    forged_event = make_event(request_id="forged", user_email="alibi@town.example")
    forged = AuditRecord(
        forged_event, CHAIN, 5, four.hash, chain_hash(four.hash, CHAIN, 5, forged_event)
    )
    conn = sqlite3.connect(db)
    conn.execute(INSERT, record_row(forged))
    conn.commit()
    conn.close()
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (5, "inserted")


@pytest.mark.anyio
async def test_audit_verify_catches_a_rehashed_history(filled: Filled, tmp_path: Path) -> None:
    """An edit with every later hash recomputed links up, but the signed checkpoint differs."""
    db = tmp_path / "audit.db"
    records = read_all(db)
    records[9] = replace(records[9], event=replace(records[9].event, user_email="x@y"))
    rehash_from(db, records, 9)
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (14, "rewritten")


@pytest.mark.anyio
async def test_audit_export_catches_resigned_history(filled: Filled, tmp_path: Path) -> None:
    """Root with the private key re-hashes AND re-signs the DB checkpoints: the auditors'
    exported copy still names the old head, so verify fails; without the export it cannot."""
    db = tmp_path / "audit.db"
    records = read_all(db)
    records[9] = replace(records[9], event=replace(records[9].event, user_email="x@y"))
    rehash_from(db, records, 9)
    new = {r.seq: r.hash for r in read_all(db)}
    old_cps = [cp for cp in read_export(filled.export) if cp is not None]
    attack(db, "DELETE FROM audit_checkpoints")
    conn = sqlite3.connect(db)
    for cp in old_cps:
        forged = replace(cp, head_hash=new[cp.seq]).signed(filled.key)
        conn.execute(
            "INSERT INTO audit_checkpoints VALUES (?,?,?,?,?,?,?,?,?)",
            tuple(forged.to_dict().values()),
        )
    conn.commit()
    conn.close()
    relog(db)
    assert await check(filled, db, export=False) is None  # the DB alone is consistent again
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (14, "rewritten")
    assert "export" in bad.detail


@pytest.mark.anyio
async def test_audit_verify_catches_truncation(filled: Filled, tmp_path: Path) -> None:
    """The last records deleted (and their DB checkpoints): the exported closing checkpoint
    names a seq that no longer exists."""
    db = tmp_path / "audit.db"
    attack(
        db,
        "DELETE FROM audit_records WHERE seq > 15",
        "DELETE FROM audit_checkpoints WHERE seq > 15",
    )
    relog(db)
    assert await check(filled, db, export=False) is None
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (20, "truncated")


@pytest.mark.anyio
async def test_audit_verify_catches_records_after_close(filled: Filled, tmp_path: Path) -> None:
    """A well-hashed record appended after the signed closing checkpoint is an insertion."""
    db = tmp_path / "audit.db"
    last = read_all(db)[-1]
    ev = make_event(request_id="late")
    extra = AuditRecord(ev, CHAIN, 21, last.hash, chain_hash(last.hash, CHAIN, 21, ev))
    conn = sqlite3.connect(db)
    conn.execute(INSERT, record_row(extra))
    conn.commit()
    conn.close()
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (21, "after-close")


@pytest.mark.anyio
async def test_audit_verify_catches_altered_or_forged_checkpoints(
    filled: Filled, tmp_path: Path
) -> None:
    """A checkpoint whose head was changed, or one signed with another key, fails its signature."""
    db = tmp_path / "audit.db"
    attack(db, "UPDATE audit_checkpoints SET head_hash = 'ab' WHERE seq = 7")
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (7, "bad-signature")

    other = Ed25519PrivateKey.generate()
    cps = [cp for cp in read_export(filled.export) if cp is not None]
    forged = replace(cps[0], seq=3).signed(other)
    append_export(filled.export, forged)
    attack(
        db, "UPDATE audit_checkpoints SET head_hash = ? WHERE seq = 7", params=(cps[0].head_hash,)
    )
    bad = await check(filled, db)
    assert bad is not None
    assert (bad.seq, bad.what) == (3, "bad-signature")


@pytest.mark.anyio
async def test_audit_retention_keeps_verify_passing(filled: Filled, tmp_path: Path) -> None:
    """Deleting records up to a checkpoint (with a signed retention checkpoint) verifies; a
    further deletion past the retention point is still caught."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    cps = await store.checkpoints()
    at14 = next(cp for cp in cps if cp.seq == 14)

    def sign(chain: str, seq: int, head: str, n: int) -> Checkpoint:
        cp = Checkpoint(chain, seq, head, at14.time_us + 1, n, "retention").signed(filled.key)
        append_export(filled.export, cp)
        return cp

    deleted = await store.delete_before(at14.time_us + 1, sign)
    assert deleted == {CHAIN: 14}
    assert [r.seq async for r in store.iter_chain(CHAIN)] == [15, 16, 17, 18, 19, 20]
    report = await verify(store, filled.key.public_key(), filled.export)
    assert report.ok, report.first_bad
    assert report.records_checked == 6
    await store.close()

    attack(tmp_path / "audit.db", "DELETE FROM audit_records WHERE seq = 15")
    bad = await check(filled, tmp_path / "audit.db")
    assert bad is not None
    assert (bad.seq, bad.what) == (15, "bad-start")


@pytest.mark.anyio
async def test_audit_export_garbage_is_reported(filled: Filled) -> None:
    """A line in the export that does not parse is reported, not skipped."""
    with filled.export.open("a") as f:
        f.write("not json\n")
    report = await verify(filled.store, filled.key.public_key(), filled.export)
    assert report.first_bad is not None
    assert report.first_bad.what == "unreadable-export"


@pytest.mark.anyio
async def test_audit_spool_lines_roundtrip_records(filled: Filled, tmp_path: Path) -> None:
    """Records survive the dict form used by spools and JSONL exports, hash intact."""
    for r in read_all(tmp_path / "audit.db"):
        again = record_from_dict(r.to_dict())
        assert again == r
        assert again.computed_hash() == r.hash
