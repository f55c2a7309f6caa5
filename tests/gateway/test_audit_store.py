"""The AuditStore contract, run against SQLite and the real PostgreSQL (a fresh schema per test,
dropped afterwards): append, read back, filter, stats, checkpoints, append-only, retention."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from audit_helpers import POSTGRES_URL, T0, deny_event, dispose, error_event, make_event, new_store

from gateway.audit.chain import Chain
from gateway.audit.checkpoint import Checkpoint, load_private_key
from gateway.audit.query import AuditFilter
from gateway.audit.record import AuditRecord
from gateway.audit.store import AuditStore, AuditStoreUnavailable, open_audit_store
from gateway.audit.store_postgres import PostgresAuditStore
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import verify


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditStore]:
    """An opened store of each kind; PostgreSQL's schema is dropped afterwards."""
    s = new_store(request.param, tmp_path)
    await s.open()
    yield s
    await dispose(s)


def sample() -> list[AuditRecord]:
    """Two chains: A with allow/deny/error by two users, B with one admin action."""
    a, b = Chain("a:1:1"), Chain("b:2:2")
    return [
        a.seal(make_event(time_us=T0, request_id="r1")),
        a.seal(
            deny_event(
                time_us=T0 + 61_000_000,
                request_id="r2",
                user_email="ito@town.example",
                user_subject="u-9",
                device_id="dev-7",
            )
        ),
        a.seal(error_event(time_us=T0 + 62_000_000, request_id="r3", path="/reports/2026")),
        b.seal(
            make_event(
                kind="admin",
                time_us=T0 + 1,
                decision="info",
                action="session.revoke",
                actor="admin@town.example",
                route="",
                status=0,
            )
        ),
        a.seal(
            deny_event(
                time_us=T0 + 125_000_000,
                request_id="r4",
                reasons=("device-posture-stale", "mfa-required"),
            )
        ),
    ]


@pytest.mark.anyio
async def test_audit_store_roundtrips_records(store: AuditStore) -> None:
    """Appended records come back identical, per chain in seq order, by key, with their heads."""
    recs = sample()
    await store.append_batch(recs)
    assert await store.chains() == ["a:1:1", "b:2:2"]
    assert [r async for r in store.iter_chain("a:1:1")] == [
        r for r in recs if r.chain_id == "a:1:1"
    ]
    assert await store.get("a:1:1", 2) == recs[1]
    assert await store.get("a:1:1", 99) is None
    assert await store.head("a:1:1") == (4, recs[4].hash)
    assert await store.head("nope") is None


@pytest.mark.anyio
async def test_audit_store_batch_is_all_or_nothing(store: AuditStore) -> None:
    """A batch with a duplicate (chain, seq) stores nothing; ignore_existing skips duplicates."""
    recs = sample()
    await store.append_batch(recs[:2])
    with pytest.raises(Exception):  # noqa: B017, PT011  # sqlite3 / psycopg integrity errors
        await store.append_batch([recs[2], recs[1]])
    assert await store.get("a:1:1", 3) is None
    await store.append_batch(recs, ignore_existing=True)
    assert await store.count(AuditFilter()) == 5


@pytest.mark.anyio
async def test_audit_store_filters(store: AuditStore) -> None:
    """Each filter field narrows the result; results are newest first and paged."""
    await store.append_batch(sample())
    ids = lambda rs: [r.event.request_id for r in rs]  # noqa: E731  # a one-line projection

    assert ids(await store.query(AuditFilter(kind="request"), 10)) == ["r4", "r3", "r2", "r1"]
    assert ids(await store.query(AuditFilter(kind="request"), 2, 1)) == ["r3", "r2"]
    assert ids(await store.query(AuditFilter(decision="deny"), 10)) == ["r4", "r2"]
    assert ids(await store.query(AuditFilter(user="ito@town.example"), 10)) == ["r2"]
    assert ids(await store.query(AuditFilter(user="u-9"), 10)) == ["r2"]
    assert ids(await store.query(AuditFilter(device="dev-7"), 10)) == ["r2"]
    assert ids(await store.query(AuditFilter(reason="mfa-required"), 10)) == ["r4"]
    assert ids(await store.query(AuditFilter(reason="mfa"), 10)) == []  # whole codes only
    assert ids(await store.query(AuditFilter(text="reports/20"), 10)) == ["r3"]
    assert ids(await store.query(AuditFilter(text="%"), 10)) == []  # wildcards are literal
    flt = AuditFilter(since_us=T0 + 60_000_000, until_us=T0 + 125_000_000)
    assert ids(await store.query(flt, 10)) == ["r3", "r2"]
    assert await store.count(AuditFilter(route="wiki")) == 4
    assert await store.count(AuditFilter(kind="admin")) == 1
    [admin] = await store.query(AuditFilter(text="session.revoke"), 10)
    assert admin.event.actor == "admin@town.example"


@pytest.mark.anyio
async def test_audit_store_stats(store: AuditStore) -> None:
    """Per-minute totals and refusals, and the top refused users, devices and reasons."""
    await store.append_batch(sample())
    st = await store.stats(AuditFilter(kind="request"), 60)
    base = (T0 // 60_000_000) * 60_000_000
    assert st.series == ((base, 1, 0), (base + 60_000_000, 2, 2), (base + 120_000_000, 1, 1))
    assert (st.total, st.denied) == (4, 3)
    assert st.top_users == (("sato@town.example", 2), ("ito@town.example", 1))
    assert st.top_devices == (("dev-42", 2), ("dev-7", 1))
    narrowed = await store.stats(AuditFilter(text="/pages", reason="mfa-required"), 60)
    assert (narrowed.total, narrowed.top_reasons) == (
        1,
        (("device-posture-stale", 1), ("mfa-required", 1)),
    )
    assert st.top_reasons == (
        ("device-posture-stale", 2),
        ("mfa-required", 1),
        ("upstream-unreachable", 1),
    )


@pytest.mark.anyio
async def test_audit_store_checkpoints_and_retention(store: AuditStore, tmp_path: Path) -> None:
    """Checkpoints are stored; retention deletes only up to a checkpoint, records itself as a
    signed retention checkpoint, and verify still passes."""
    key = load_private_key(tmp_path / "k.pem", create=True)
    recs = sample()
    await store.append_batch(recs)
    cp = Checkpoint("a:1:1", 2, recs[1].hash, 1000, 2, "periodic").signed(key)
    await store.add_checkpoint(cp)
    await store.add_checkpoint(cp)  # idempotent
    assert await store.checkpoints() == [cp]

    def sign(chain: str, seq: int, head: str, n: int) -> Checkpoint:
        return Checkpoint(chain, seq, head, 2000, n, "retention").signed(key)

    assert await store.delete_before(500, sign) == {}  # no checkpoint that old
    assert await store.delete_before(1001, sign) == {"a:1:1": 2}
    assert await store.delete_before(1001, sign) == {}  # already done
    assert [r.seq async for r in store.iter_chain("a:1:1")] == [3, 4]
    assert [c.kind for c in await store.checkpoints()] == ["periodic", "retention"]
    report = await verify(store, key.public_key())
    assert report.ok, report.first_bad
    assert report.records_checked == 3


@pytest.mark.anyio
async def test_audit_store_refuses_update_and_delete(store: AuditStore, tmp_path: Path) -> None:
    """The append-only triggers refuse UPDATE and DELETE of records and checkpoints, even to a
    direct SQL client (only a retention transaction may delete records)."""
    await store.append_batch(sample())
    assert await store.chains()  # a read: SQLite indexes its log into audit_records first
    key = load_private_key(tmp_path / "k.pem", create=True)
    await store.add_checkpoint(Checkpoint("a:1:1", 1, "00", 1, 1, "periodic").signed(key))
    statements = [
        "UPDATE audit_records SET decision = 'allow' WHERE seq = 2",
        "DELETE FROM audit_records WHERE seq = 2",
        "UPDATE audit_checkpoints SET head_hash = 'x'",
        "DELETE FROM audit_checkpoints",
    ]
    if isinstance(store, SqliteAuditStore):
        log_statements = ["UPDATE audit_log SET body = x'00'", "DELETE FROM audit_log"]
        for sql in [*statements, *log_statements]:
            conn = sqlite3.connect(store.path)
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
            conn.close()
    else:
        assert isinstance(store, PostgresAuditStore)
        schema = store._schema
        for sql in [*statements, "TRUNCATE audit_records"]:
            with (
                psycopg.connect(POSTGRES_URL, options=f"-c search_path={schema}") as conn,
                pytest.raises(psycopg.errors.RaiseException, match="append-only"),
            ):
                conn.execute(sql)
        with psycopg.connect(POSTGRES_URL, options=f"-c search_path={schema}") as conn:
            conn.execute("SET tabiji.retention = 'on'")  # a session-wide setting still can't UPDATE
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("UPDATE audit_records SET decision = 'allow'")
    assert await store.count(AuditFilter(decision="deny")) == 2
    assert len(await store.checkpoints()) == 1


@pytest.mark.anyio
async def test_audit_store_unreachable_raises_unavailable(tmp_path: Path) -> None:
    """A PostgreSQL that does not answer, or a locked SQLite file, raise AuditStoreUnavailable."""
    pg = PostgresAuditStore("postgresql://postgres@127.0.0.1:1/test", timeout=1.0)
    with pytest.raises(AuditStoreUnavailable):
        await pg.open()
    s = SqliteAuditStore(tmp_path / "a.db", busy_timeout_ms=50)
    await s.open()
    blocker = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(AuditStoreUnavailable):
        await s.append_batch(sample())
    blocker.execute("ROLLBACK")
    blocker.close()
    await s.append_batch(sample())
    assert await s.count(AuditFilter()) == 5
    await s.close()


def test_audit_store_url_factory(tmp_path: Path) -> None:
    """sqlite:/// paths are relative to the base dir (four slashes: absolute); others refused."""
    rel = open_audit_store("sqlite:///var/audit.db", tmp_path)
    assert isinstance(rel, SqliteAuditStore)
    assert rel.path == tmp_path / "var/audit.db"
    absolute = open_audit_store("sqlite:////srv/audit.db", tmp_path)
    assert isinstance(absolute, SqliteAuditStore)
    assert absolute.path == Path("/srv/audit.db")
    assert isinstance(open_audit_store("postgresql://u@h/db", tmp_path), PostgresAuditStore)
    with pytest.raises(ValueError, match="sqlite"):
        open_audit_store("mysql://x", tmp_path)
