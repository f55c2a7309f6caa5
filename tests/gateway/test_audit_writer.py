"""AuditWriter: batched and durable modes, the spool while the store is down and its drain, and a
writer killed with SIGKILL mid-burst leaving a trail that still verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import T0, audit_key, dispose, make_event, new_store

from gateway.audit import writer as writer_module
from gateway.audit.checkpoint import Checkpointer, read_export
from gateway.audit.query import AuditFilter
from gateway.audit.record import AuditRecord
from gateway.audit.spool import Spool, spool_path
from gateway.audit.store import AuditStoreUnavailable
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import verify
from gateway.audit.writer import AuditWriter

REPO = Path(__file__).resolve().parents[2]


class CountingStore(SqliteAuditStore):
    """The real SQLite store, counting its commits (to see group commit happen)."""

    commits = 0

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        await super().append_batch(records, ignore_existing=ignore_existing)
        self.commits += 1


class Outage:
    """The store's file held by another process's exclusive transaction: writes fail."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


async def seqs(store: SqliteAuditStore, chain: str) -> list[int]:
    return [r.seq async for r in store.iter_chain(chain)]


@pytest.mark.anyio
async def test_audit_batched_writer_commits_everything_on_close(tmp_path: Path) -> None:
    """Events submitted in batched mode are all committed in order by close(), with a closing
    checkpoint in the DB and the export, and the trail verifies."""
    store = SqliteAuditStore(tmp_path / "a.db")
    key = audit_key(tmp_path)
    cp = Checkpointer(key, export_path=tmp_path / "cp.jsonl", interval=3600)
    w = AuditWriter(store, chain_id="c:1:1", checkpointer=cp, flush_interval=0.01)
    await w.start()
    for i in range(1200):
        w.submit(make_event(time_us=T0 + i, request_id=f"r{i}"))
        if i % 100 == 0:
            await asyncio.sleep(0)
    await w.close()
    assert await seqs(store, "c:1:1") == list(range(1, 1201))
    [oldest] = await store.query(AuditFilter(), 1, 1199)
    assert (oldest.seq, oldest.event.request_id) == (1, "r0")
    kinds = [c.kind for c in await store.checkpoints()]
    assert kinds[-1] == "close"
    exported = read_export(tmp_path / "cp.jsonl")
    assert exported[-1] is not None
    assert exported[-1].seq == 1200
    report = await verify(store, key.public_key(), tmp_path / "cp.jsonl")
    assert report.ok, report.first_bad
    await store.close()


@pytest.mark.anyio
async def test_audit_durable_mode_waits_for_commit_and_groups(tmp_path: Path) -> None:
    """submit_durable returns only once the record is in the store; concurrent requests share
    commits (group commit)."""
    store = CountingStore(tmp_path / "a.db")
    w = AuditWriter(store, chain_id="c:1:1", mode="durable", flush_interval=5)
    await w.start()
    results = await asyncio.gather(*(w.record(make_event(request_id=f"r{i}")) for i in range(64)))
    assert all(results)
    assert await store.count(AuditFilter()) == 64  # committed before close()
    assert store.commits < 64
    await w.close()
    await store.close()


@pytest.mark.anyio
async def test_audit_outage_spools_and_drains_nothing_lost(tmp_path: Path) -> None:
    """While the store is locked the records go to the fsynced spool (durable requests still
    succeed); when it returns the spool drains in order: nothing lost, the chain intact."""
    db = tmp_path / "a.db"
    store = SqliteAuditStore(db, busy_timeout_ms=20)
    key = audit_key(tmp_path)
    cp = Checkpointer(key, export_path=tmp_path / "cp.jsonl", interval=0)
    w = AuditWriter(
        store,
        chain_id="c:1:1",
        spool_dir=tmp_path / "spool",
        checkpointer=cp,
        flush_interval=3600,
        fail_closed=True,
        store_retry_interval=0,  # the store is tried again at every flush
    )
    await w.start()
    for i in range(10):
        w.submit(make_event(request_id=f"before-{i}"))
    await w.flush()

    outage = Outage(db)
    for i in range(25):
        w.submit(make_event(request_id=f"during-{i}"))
    await w.flush()
    assert w.store_ok is False
    assert w.healthy is True  # durable on local disk: fail_closed does not refuse
    assert await w.submit_durable(make_event(request_id="durable-during")) is True
    spool = spool_path(tmp_path / "spool", "c:1:1")
    assert len(spool.read_text().splitlines()) == 26
    outage.end()

    for i in range(5):
        w.submit(make_event(request_id=f"after-{i}"))
    await w.flush()
    assert w.store_ok is True
    assert spool.stat().st_size == 0
    await w.close()
    assert not spool.exists()  # an empty spool is removed on close
    records = [r async for r in store.iter_chain("c:1:1")]
    assert [r.seq for r in records] == list(range(1, 42))
    assert [r.event.request_id for r in records][9:12] == ["before-9", "during-0", "during-1"]
    report = await verify(store, key.public_key(), tmp_path / "cp.jsonl")
    assert report.ok, report.first_bad
    await store.close()


@pytest.mark.anyio
async def test_audit_unhealthy_without_spool_then_recovers(tmp_path: Path) -> None:
    """With no spool, a store outage makes the writer unhealthy (fail_closed refuses) and durable
    submits return False without raising; the kept records are written once it returns."""
    db = tmp_path / "a.db"
    store = SqliteAuditStore(db, busy_timeout_ms=20)
    w = AuditWriter(store, chain_id="c:1:1", fail_closed=True)
    w.submit(make_event(request_id="one"))
    await w.flush()
    assert w.healthy
    outage = Outage(db)
    w.submit(make_event(request_id="two"))
    await w.flush()
    assert w.healthy is False
    assert await w.submit_durable(make_event(request_id="three")) is False
    outage.end()
    await w.flush()
    assert w.healthy
    await w.close()
    assert [r.event.request_id async for r in store.iter_chain("c:1:1")] == ["one", "two", "three"]
    await store.close()


@pytest.mark.anyio
async def test_audit_orphan_spool_is_drained_by_the_next_writer(tmp_path: Path) -> None:
    """A writer that died with records in its spool: the next writer on the host drains them,
    and a spool still locked by a live writer is left alone."""
    db = tmp_path / "a.db"
    store = SqliteAuditStore(db, busy_timeout_ms=20)
    await store.open()
    dead = AuditWriter(store, chain_id="dead:1:1", spool_dir=tmp_path / "spool")
    await dead.start()
    live = Spool(spool_path(tmp_path / "spool", "live:2:2"))
    live.open()
    outage = Outage(db)
    for i in range(7):
        dead.submit(make_event(request_id=f"d{i}"))
    await dead.flush()
    outage.end()
    assert dead._task is not None
    dead._task.cancel()  # the process "dies": no close, its spool stays behind
    assert dead._spool is not None
    dead._spool.close(remove_if_empty=False)

    heir = AuditWriter(store, chain_id="heir:3:3", spool_dir=tmp_path / "spool")
    await heir.start()
    assert await seqs(store, "dead:1:1") == list(range(1, 8))
    assert not spool_path(tmp_path / "spool", "dead:1:1").exists()
    assert live.path.exists()
    await heir.close()
    live.close()
    report = await verify(store, None)
    assert report.ok, report.first_bad
    await store.close()


KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from gateway.audit.checkpoint import Checkpointer, load_private_key
    from gateway.audit.record import AuditEvent
    from gateway.audit.store_sqlite import SqliteAuditStore
    from gateway.audit.writer import AuditWriter

    async def main() -> None:
        d = Path(sys.argv[1])
        store = SqliteAuditStore(d / "a.db")
        cp = Checkpointer(load_private_key(d / "k.pem"), export_path=d / "cp.jsonl",
                          interval=0.02)
        w = AuditWriter(store, checkpointer=cp, spool_dir=d / "spool", flush_interval=0.01)
        await w.start()
        i = 0
        while True:
            for _ in range(100):
                w.submit(AuditEvent(kind="request", time_us=time.time_ns() // 1000,
                                    request_id=f"r{i}", decision="allow", status=200))
                i += 1
            await asyncio.sleep(0.002)  # a busy gateway, not an unbounded flood

    asyncio.run(main())
    """
)


@pytest.mark.anyio
async def test_audit_sigkill_during_burst_leaves_a_verifiable_trail(tmp_path: Path) -> None:
    """A writer process killed with SIGKILL mid-burst: what was committed verifies, including
    against the exported checkpoints."""
    key = audit_key(tmp_path)
    key_file = tmp_path / "audit-key.pem"
    os.link(key_file, tmp_path / "k.pem")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILL_SCRIPT,
        str(tmp_path),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            exported = read_export(tmp_path / "cp.jsonl")
            if len(exported) >= 3:
                break
        assert proc.returncode is None, "the writer process exited early"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = SqliteAuditStore(tmp_path / "a.db")
    report = await verify(store, key.public_key(), tmp_path / "cp.jsonl")
    assert report.ok, report.first_bad
    assert report.records_checked > 0
    assert report.checkpoints_checked >= 6
    await store.close()


@pytest.mark.anyio
async def test_audit_writer_unhealthy_when_it_cannot_keep_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PENDING queued events the writer reports unhealthy (fail_closed refuses) and
    keeps every event; once flushed it is healthy again."""
    monkeypatch.setattr(writer_module, "MAX_PENDING", 10)
    store = SqliteAuditStore(tmp_path / "a.db")
    w = AuditWriter(store, chain_id="c:1:1", fail_closed=True)
    for i in range(10):
        w.submit(make_event(request_id=str(i)))
    assert w.healthy is False
    await w.flush()
    assert w.healthy is True
    await w.close()
    assert await store.count(AuditFilter()) == 10
    await store.close()


@pytest.mark.anyio
async def test_audit_writer_into_postgres_verifies(tmp_path: Path) -> None:
    """The same writer into the real PostgreSQL: everything committed, the trail verifies."""
    store = new_store("postgres", tmp_path)
    key = audit_key(tmp_path)
    cp = Checkpointer(key, export_path=tmp_path / "cp.jsonl", interval=0)
    w = AuditWriter(store, chain_id="pg:1:1", checkpointer=cp, flush_interval=0.01)
    try:
        await w.start()
        for i in range(300):
            w.submit(make_event(request_id=f"r{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await w.close()
        report = await verify(store, key.public_key(), tmp_path / "cp.jsonl")
        assert report.ok, report.first_bad
        assert report.records_checked == 300
    finally:
        await dispose(store)


class UnansweringStore(SqliteAuditStore):
    """The real SQLite store behind a failing network: "refuse" fails every write at once (a
    refused connection); "hang" makes every write wait for an answer that never comes (a server
    that vanished, a pool waiting out its connect timeout)."""

    failure: str | None = None
    writes_tried = 0

    async def _fail(self) -> None:
        if self.failure is None:
            return
        self.writes_tried += 1
        if self.failure == "refuse":
            raise AuditStoreUnavailable("audit store: refused")
        await asyncio.Event().wait()

    async def append_batch(
        self, records: Sequence[AuditRecord], *, ignore_existing: bool = False
    ) -> None:
        await self._fail()
        await super().append_batch(records, ignore_existing=ignore_existing)

    async def append_log(self, batches: Sequence[Any], **kwargs: Any) -> int:
        await self._fail()
        return await super().append_log(batches, **kwargs)


@pytest.mark.anyio
async def test_audit_store_known_down_spools_at_once_and_retries_bounded(tmp_path: Path) -> None:
    """Once the store is known down, durable requests are released by the fsynced spool without
    touching the store; it is tried again only when the retry interval has passed, and then for
    a bounded probe, so a store that stopped answering never holds records or requests; when it
    answers again the spool drains in order with nothing lost."""
    store = UnansweringStore(tmp_path / "a.db")
    w = AuditWriter(
        store,
        chain_id="c:1:1",
        spool_dir=tmp_path / "spool",
        flush_interval=3600,
        mode="durable",
        store_retry_interval=3600,
    )
    await w.start()
    assert await w.submit_durable(make_event(request_id="before")) is True
    store.failure = "refuse"
    assert await w.submit_durable(make_event(request_id="refused")) is True  # spooled
    assert w.store_ok is False
    store.failure = "hang"
    tried = store.writes_tried
    for i in range(10):
        assert await asyncio.wait_for(w.submit_durable(make_event(request_id=f"d{i}")), 10)
    assert store.writes_tried == tried  # the retry interval has not passed: no store call at all
    w._next_store_try = 0.0  # it has now: one probe, cut off by its budget, then the spool
    assert await asyncio.wait_for(w.submit_durable(make_event(request_id="d10")), 10)
    assert store.writes_tried == tried + 1
    assert w.store_ok is False
    spool = spool_path(tmp_path / "spool", "c:1:1")
    assert len(spool.read_text().splitlines()) == 12
    store.failure = None
    w._next_store_try = 0.0
    assert await w.submit_durable(make_event(request_id="after")) is True
    assert w.store_ok is True
    await w.close()
    ids = [r.event.request_id async for r in store.iter_chain("c:1:1")]
    assert ids == ["before", "refused", *(f"d{i}" for i in range(11)), "after"]
    await store.close()
