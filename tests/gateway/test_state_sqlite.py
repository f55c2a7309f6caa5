"""SqliteStateStore beyond the contract: the file, WAL, purging, and take() across processes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from gateway.state.base import StateUnavailable
from gateway.state.sqlite import SqliteStateStore

REPO = Path(__file__).resolve().parents[2]


def count(path: Path, sql: str) -> int:
    """One integer from the database, read with a separate connection."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute(sql).fetchone()[0])


@pytest.mark.anyio
async def test_file_is_private_and_its_directory_is_created(tmp_path: Path) -> None:
    """open creates missing parent directories and the file with mode 0600, in WAL mode."""
    path = tmp_path / "deep" / "er" / "state.db"
    store = SqliteStateStore(path)
    await store.open()
    try:
        await store.put("sess", "k", b"v", 60)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for sidecar in (path.with_name("state.db-wal"), path.with_name("state.db-shm")):
            assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


@pytest.mark.anyio
async def test_open_is_idempotent_and_reopen_keeps_data(tmp_path: Path) -> None:
    """A second open is harmless; a new instance on the same file sees earlier values."""
    first = SqliteStateStore(tmp_path / "s.db")
    await first.open()
    await first.open()
    await first.put("sess", "k", b"kept", 60)
    await first.close()
    second = SqliteStateStore(tmp_path / "s.db")
    await second.open()
    assert await second.get("sess", "k") == b"kept"
    await second.close()


@pytest.mark.anyio
async def test_not_open_or_closed_store_is_unavailable(tmp_path: Path) -> None:
    """Before open and after close every call raises StateUnavailable and ping is False."""
    store = SqliteStateStore(tmp_path / "s.db")
    with pytest.raises(StateUnavailable):
        await store.get("sess", "k")
    await store.open()
    await store.close()
    with pytest.raises(StateUnavailable):
        await store.put("sess", "k", b"v", 60)
    assert await store.ping() is False


@pytest.mark.anyio
async def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    """A corrupt state file makes open raise StateUnavailable with the sqlite3 error chained."""
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database file, just text " * 100)
    store = SqliteStateStore(path)
    with pytest.raises(StateUnavailable) as raised:
        await store.open()
    assert isinstance(raised.value.__cause__, sqlite3.Error)
    await store.close()


@pytest.mark.anyio
async def test_expired_rows_and_old_feed_messages_are_purged(tmp_path: Path) -> None:
    """A write after the purge interval deletes expired values, sets and old feed rows."""
    path = tmp_path / "s.db"
    store = SqliteStateStore(path, purge_interval=0.0, feed_retention=0.2)
    await store.open()
    try:
        await store.put("sess", "gone", b"x", 0.1)
        await store.index_add("ix", "gone", 0.1)
        await store.publish("revoke", "old")
        await store.put("sess", "kept", b"y", 60)
        await asyncio.sleep(0.3)
        await store.publish("revoke", "new")  # a write: purges
        assert count(path, "SELECT count(*) FROM kv WHERE key = 'gone'") == 0
        assert count(path, "SELECT count(*) FROM idx") == 0
        assert count(path, "SELECT count(*) FROM feed WHERE message = 'old'") == 0
        assert await store.get("sess", "kept") == b"y"
        assert (await store.read_since("revoke", "0"))[0] == ["new"]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_purge_waits_for_its_interval(tmp_path: Path) -> None:
    """Within the purge interval an expired row stays on disk (unreadable) until the next purge."""
    path = tmp_path / "s.db"
    store = SqliteStateStore(path, purge_interval=3600.0)
    await store.open()
    try:
        await store.put("sess", "first", b"x", 60)  # the first write purges; the next hour none
        await store.put("sess", "gone", b"x", 0.1)
        await asyncio.sleep(0.2)
        await store.put("sess", "other", b"y", 60)
        assert count(path, "SELECT count(*) FROM kv WHERE key = 'gone'") == 1
        assert await store.get("sess", "gone") is None
    finally:
        await store.close()


@pytest.mark.anyio
async def test_feed_ids_are_never_reused_after_pruning(tmp_path: Path) -> None:
    """After every feed row was pruned, cursor None still lies below the next message's id."""
    store = SqliteStateStore(tmp_path / "s.db", purge_interval=0.0, feed_retention=0.1)
    await store.open()
    try:
        await store.publish("revoke", "a")
        _, seen = await store.read_since("revoke", None)
        await asyncio.sleep(0.2)
        await store.put("sess", "k", b"v", 60)  # prunes "a": the table is empty now
        _, cursor = await store.read_since("revoke", None)
        await store.publish("revoke", "b")
        assert await store.read_since("revoke", seen) == ((["b"], str(int(seen) + 1)))
        assert (await store.read_since("revoke", cursor))[0] == ["b"]
    finally:
        await store.close()


CHILD = """
import asyncio, os, sys, time
from pathlib import Path
from gateway.state.sqlite import SqliteStateStore

async def main(path: str, go: str, n: int) -> None:
    store = SqliteStateStore(Path(path))
    await store.open()
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.002)
    got = [k for k in range(n) if await store.take("race", str(k)) is not None]
    await store.close()
    print(" ".join(map(str, got)), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.anyio
async def test_take_is_atomic_across_processes(tmp_path: Path) -> None:
    """Four processes racing take() over the same keys never both get one value."""
    n = 1000
    path, go = tmp_path / "s.db", tmp_path / "go"
    store = SqliteStateStore(path)
    await store.open()
    for k in range(n):
        await store.put("race", str(k), b"v", 60)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(path),
            str(go),
            str(n),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"ready"
        go.touch()
        outputs = [
            (await asyncio.wait_for(child.communicate(), 60))[0].split() for child in children
        ]
        assert [child.returncode for child in children] == [0] * len(children)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        await store.close()
    taken = [int(k) for out in outputs for k in out]
    assert sorted(taken) == list(range(n))  # every key taken, and none twice


@pytest.mark.anyio
async def test_busy_writers_wait_rather_than_fail(tmp_path: Path) -> None:
    """A write while another connection holds the write lock briefly waits (busy_timeout)."""
    path = tmp_path / "s.db"
    store = SqliteStateStore(path)
    await store.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.put("sess", "k", b"v", 60))
        await asyncio.sleep(0.2)
        assert not write.done()
        holder.execute("COMMIT")
        await write
        assert await store.get("sess", "k") == b"v"
    finally:
        holder.close()
        await store.close()


@pytest.mark.anyio
async def test_a_lock_held_too_long_is_unavailable(tmp_path: Path) -> None:
    """A write lock held past busy_timeout turns into StateUnavailable, not a hang."""
    path = tmp_path / "s.db"
    store = SqliteStateStore(path, busy_timeout=0.2)
    await store.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StateUnavailable) as raised:
            await store.put("sess", "k", b"v", 60)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
        await store.close()


@pytest.mark.anyio
async def test_takes_queued_behind_a_writer_still_yield_the_value_once(tmp_path: Path) -> None:
    """Takes from two instances that all wait on another connection's write lock: one wins.

    Readers never block in WAL mode, so a read-then-delete take would hand the value to both
    waiting instances; the single-statement DELETE … RETURNING cannot.
    """
    path = tmp_path / "s.db"
    a, b = SqliteStateStore(path), SqliteStateStore(path)
    await a.open()
    await b.open()
    await a.put("code", "c", b"secret", 60)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        takes = asyncio.gather(*(s.take("code", "c") for s in [a, b] * 10))
        await asyncio.sleep(0.2)
        holder.execute("COMMIT")
        assert [got for got in await takes if got is not None] == [b"secret"]
    finally:
        holder.close()
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_put_new_queued_behind_a_writer_has_one_winner(tmp_path: Path) -> None:
    """put_new calls from two instances waiting on a write lock: exactly one reports a win."""
    path = tmp_path / "s.db"
    a, b = SqliteStateStore(path), SqliteStateStore(path)
    await a.open()
    await b.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        calls = asyncio.gather(*(s.put_new("jti", "j", b"seen", 60) for s in [a, b] * 10))
        await asyncio.sleep(0.2)
        holder.execute("COMMIT")
        assert (await calls).count(True) == 1
    finally:
        holder.close()
        await a.close()
        await b.close()
