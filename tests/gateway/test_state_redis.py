"""RedisStateStore beyond the contract: key layout and TTLs, prefixes, outages and silent servers.

Uses TABIJI_TEST_REDIS_URL (skip when unreachable, fail when CI=true) and, for the outage test,
a private redis-server started on a free loopback port and stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from test_state_contract import REDIS_URL, closed_port, require_redis

from gateway.state.base import StateUnavailable
from gateway.state.redis import RedisStateStore


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test Redis, to look at what the store wrote."""
    require_redis(REDIS_URL)
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def prefixes(raw: aioredis.Redis) -> AsyncIterator[list[str]]:
    """Prefixes a test uses; every key under them is deleted afterwards."""
    used: list[str] = []
    yield used
    for prefix in used:
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix)
        keys = [k async for k in raw.scan_iter(match=f"{escaped}*")]
        if keys:
            await raw.delete(*keys)


def unique(prefixes: list[str], shape: str = "tabiji-test-{}:") -> str:
    """A fresh random prefix, registered for cleanup."""
    prefix = shape.format(secrets.token_hex(6))
    prefixes.append(prefix)
    return prefix


@pytest.mark.anyio
async def test_keys_live_under_the_prefix_with_their_ttls(
    raw: aioredis.Redis, prefixes: list[str]
) -> None:
    """Values, sets, feeds and locks are keys under the prefix, each with the TTL asked for."""
    prefix = unique(prefixes)
    store = RedisStateStore(REDIS_URL, prefix=prefix)
    await store.open()
    try:
        await store.put("sess", "k", b"v", 60)
        await store.index_add("user:alice", "s1", 100)
        await store.index_add("user:alice", "s2", 1)  # must not shorten the set's life
        await store.publish("revoke", "m")
        async with store.lock("refresh:s1", 30) as won:
            assert won
            assert 0 < await raw.pttl(f"{prefix}lock:refresh:s1") <= 30_000
        assert 0 < await raw.pttl(f"{prefix}kv:sess:k") <= 60_000
        assert 50_000 < await raw.pttl(f"{prefix}ix:user:alice") <= 100_000
        assert await raw.type(f"{prefix}feed:revoke") == b"stream"
        keys = sorted([k.decode() async for k in raw.scan_iter(match=f"{prefix}*")])
        assert keys == [f"{prefix}{k}" for k in ["feed:revoke", "ix:user:alice", "kv:sess:k"]]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_prefixes_keep_deployments_apart(prefixes: list[str]) -> None:
    """Two prefixes (one full of glob characters) never see each other's values in scan or get."""
    odd = unique(prefixes, "t[{}]*?:")
    plain = unique(prefixes, "t{}x:")
    a, b = RedisStateStore(REDIS_URL, prefix=odd), RedisStateStore(REDIS_URL, prefix=plain)
    await a.open()
    await b.open()
    try:
        await a.put("sess", "mine", b"a", 60)
        await b.put("sess", "theirs", b"b", 60)
        assert [kv async for kv in a.scan("sess")] == [("mine", b"a")]
        assert [kv async for kv in b.scan("sess")] == [("theirs", b"b")]
        assert await a.get("sess", "theirs") is None
    finally:
        await a.close()
        await b.close()


@pytest.mark.anyio
async def test_open_fails_fast_on_a_closed_port() -> None:
    """open against a port nobody listens on raises StateUnavailable (ConnectionError chained)."""
    store = RedisStateStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)
    with pytest.raises(StateUnavailable) as raised:
        await asyncio.wait_for(store.open(), 10)
    assert "ConnectionError" in str(raised.value)
    await store.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections (kernel backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


@pytest.mark.anyio
async def test_a_silent_server_times_out_instead_of_hanging(silent_server: int) -> None:
    """A server that never replies turns into StateUnavailable after the socket timeout."""
    store = RedisStateStore(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2)
    with pytest.raises(StateUnavailable) as raised:
        await asyncio.wait_for(store.open(), 10)
    assert "Timeout" in str(raised.value)
    with pytest.raises(StateUnavailable):
        await asyncio.wait_for(store.get("sess", "k"), 10)
    assert await asyncio.wait_for(store.ping(), 10) is False
    await store.close()


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A private redis-server on 127.0.0.1:port without persistence, ready to answer."""
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.02)
    server.kill()
    server.wait()
    raise AssertionError(f"redis-server did not listen on {port}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """Stop a server started by the test, by its PID."""
    if server.poll() is None:
        server.kill()
        server.wait()


@pytest.mark.anyio
async def test_an_outage_after_open_fails_closed_and_recovers(tmp_path: Path) -> None:
    """Redis going away makes calls raise StateUnavailable; when it is back the store works."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = closed_port()
    server = start_redis(port, tmp_path)
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        await store.open()
        await store.put("sess", "k", b"before", 60)
        stop(server)
        with pytest.raises(StateUnavailable):
            await asyncio.wait_for(store.get("sess", "k"), 10)
        with pytest.raises(StateUnavailable):
            await asyncio.wait_for(store.take("sess", "k"), 10)
        assert await store.ping() is False
        server = start_redis(port, tmp_path)  # empty: the store must reconnect on its own
        assert await store.ping() is True
        await store.put("sess", "k", b"after", 60)
        assert await store.take("sess", "k") == b"after"
    finally:
        await store.close()
        stop(server)


@pytest.mark.anyio
async def test_ci_env_makes_missing_redis_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CI=true an unreachable test Redis fails the test instead of skipping it."""
    monkeypatch.setitem(os.environ, "CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unreachable"):
        require_redis(f"redis://127.0.0.1:{closed_port()}/0")
