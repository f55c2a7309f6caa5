"""The StateStore contract, run against both stores: SQLite in tmp_path and the real Redis.

Redis comes from TABIJI_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); each test uses its own
random key prefix and deletes its keys afterwards. Unreachable Redis skips, or fails when CI=true.
Also the URL factory (open_state_store, describe_store).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway.state.base import StateStore, StateUnavailable
from gateway.state.factory import describe_store, open_state_store
from gateway.state.redis import RedisStateStore
from gateway.state.sqlite import SqliteStateStore

REDIS_URL = os.environ.get("TABIJI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

NewStore = Callable[[], Awaitable[StateStore]]


def require_redis(url: str) -> None:
    """Skip when the test Redis does not answer; fail instead when CI=true (CI provides one)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        reason = f"Redis at {url} is unreachable ({exc}); set TABIJI_TEST_REDIS_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["sqlite", "redis"])
async def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewStore]:
    """Opens store instances that share one backing (a file, or a Redis key prefix), like
    the workers and replicas of one gateway; closes them and removes test keys afterwards."""
    opened: list[StateStore] = []
    prefix = f"tabiji-test-{secrets.token_hex(8)}:"
    if request.param == "redis":
        require_redis(REDIS_URL)

    async def new() -> StateStore:
        store: StateStore
        if request.param == "sqlite":
            store = SqliteStateStore(tmp_path / "state.db")
        else:
            store = RedisStateStore(REDIS_URL, prefix=prefix)
        await store.open()
        opened.append(store)
        return store

    yield new
    for store in opened:
        await store.close()
    if request.param == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def store(new_store: NewStore) -> StateStore:
    """One opened store."""
    return await new_store()


# -- values -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_put_then_get_returns_the_value(store: StateStore) -> None:
    """A stored value is read back; another key or namespace is absent."""
    await store.put("sess", "a", b"one", 60)
    assert await store.get("sess", "a") == b"one"
    assert await store.get("sess", "b") is None
    assert await store.get("other", "a") is None


@pytest.mark.anyio
async def test_put_overwrites(store: StateStore) -> None:
    """A second put replaces the value."""
    await store.put("sess", "a", b"one", 60)
    await store.put("sess", "a", b"two", 60)
    assert await store.get("sess", "a") == b"two"


@pytest.mark.anyio
async def test_values_are_bytes_roundtrip(store: StateStore) -> None:
    """Every byte value (non-UTF-8, NUL, empty) comes back identical, under odd keys too."""
    values = {"bin": bytes(range(256)), "ff": b"\xff\xfe\x00", "empty": b"", "k:with*[x]?": b"x"}
    for key, value in values.items():
        await store.put("vals", key, value, 60)
    for key, value in values.items():
        assert await store.get("vals", key) == value
    assert await store.take("vals", "ff") == b"\xff\xfe\x00"


@pytest.mark.anyio
async def test_values_expire_after_their_ttl(store: StateStore) -> None:
    """After its TTL a value is gone for get, take, scan and put_new."""
    await store.put("ttl", "short", b"x", 0.2)
    await store.put("ttl", "long", b"y", 60)
    await asyncio.sleep(0.3)
    assert await store.get("ttl", "short") is None
    assert await store.take("ttl", "short") is None
    assert [k async for k, _ in store.scan("ttl")] == ["long"]
    assert await store.get("ttl", "long") == b"y"


@pytest.mark.anyio
async def test_put_new_stores_only_when_absent_or_expired(store: StateStore) -> None:
    """put_new wins once, loses while the value lives (keeping it), and wins after expiry."""
    assert await store.put_new("jti", "t1", b"first", 0.2) is True
    assert await store.put_new("jti", "t1", b"second", 0.2) is False
    assert await store.get("jti", "t1") == b"first"
    await asyncio.sleep(0.3)
    assert await store.put_new("jti", "t1", b"third", 60) is True
    assert await store.get("jti", "t1") == b"third"


@pytest.mark.anyio
async def test_put_new_races_have_one_winner(new_store: NewStore) -> None:
    """Of 20 concurrent put_new calls on two instances exactly one wins (a replay cache)."""
    a, b = await new_store(), await new_store()
    results = await asyncio.gather(
        *(s.put_new("jti", "same", str(i).encode(), 60) for i, s in enumerate([a, b] * 10))
    )
    assert results.count(True) == 1


@pytest.mark.anyio
async def test_take_is_single_use(store: StateStore) -> None:
    """take returns the value once and then None; the value is gone for get too."""
    await store.put("code", "c1", b"v", 60)
    assert await store.take("code", "c1") == b"v"
    assert await store.take("code", "c1") is None
    assert await store.get("code", "c1") is None


@pytest.mark.anyio
async def test_concurrent_takes_across_instances_yield_the_value_once(new_store: NewStore) -> None:
    """20 concurrent takes spread over two instances (two workers): exactly one gets the value."""
    a, b = await new_store(), await new_store()
    for round_ in range(5):
        await a.put("code", f"c{round_}", b"secret", 60)
        got = await asyncio.gather(*(s.take("code", f"c{round_}") for s in [a, b] * 10))
        assert [g for g in got if g is not None] == [b"secret"]


@pytest.mark.anyio
async def test_delete_removes_and_tolerates_absent(store: StateStore) -> None:
    """delete removes a value; deleting an absent key is fine."""
    await store.put("sess", "a", b"x", 60)
    await store.delete("sess", "a")
    await store.delete("sess", "never")
    assert await store.get("sess", "a") is None


@pytest.mark.anyio
async def test_scan_lists_one_namespace_only(store: StateStore) -> None:
    """scan yields every live key of its namespace and none of a namespace sharing its prefix."""
    await store.put("sess", "a", b"1", 60)
    await store.put("sess", "b:c", b"2", 60)
    await store.put("sess2", "z", b"3", 60)
    await store.put("ses", "y", b"4", 60)
    assert sorted([kv async for kv in store.scan("sess")]) == [("a", b"1"), ("b:c", b"2")]
    assert [kv async for kv in store.scan("empty")] == []


@pytest.mark.anyio
async def test_scan_returns_every_key_across_batches(store: StateStore) -> None:
    """A namespace larger than one scan batch is listed completely, each key once."""
    keys = [f"k{i:04d}" for i in range(1100)]
    for key in keys:
        await store.put("many", key, key.encode(), 60)
    listed = [kv async for kv in store.scan("many")]
    assert sorted(listed) == [(k, k.encode()) for k in keys]


@pytest.mark.anyio
@pytest.mark.parametrize("ns", ["a:b", "a*", "", "ns with space", "x" * 65])
async def test_namespaces_that_could_overlap_are_refused(store: StateStore, ns: str) -> None:
    """A namespace with ':' or glob characters (or empty/too long) is a ValueError."""
    with pytest.raises(ValueError, match="namespace"):
        await store.put(ns, "k", b"v", 60)
    with pytest.raises(ValueError, match="namespace"):
        [kv async for kv in store.scan(ns)]


@pytest.mark.anyio
@pytest.mark.parametrize("ttl", [0, -1, math.nan])
async def test_non_positive_ttls_are_refused(store: StateStore, ttl: float) -> None:
    """Every value expires: a TTL of zero, below zero or NaN is a ValueError."""
    with pytest.raises(ValueError, match="TTL"):
        await store.put("sess", "k", b"v", ttl)
    with pytest.raises(ValueError, match="TTL"):
        await store.put_new("sess", "k", b"v", ttl)
    with pytest.raises(ValueError, match="TTL"):
        await store.index_add("ix", "m", ttl)


# -- index sets ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_index_add_members_remove(store: StateStore) -> None:
    """Members added once each are listed; removal drops one; an unknown set is empty."""
    await store.index_add("user:alice", "s1", 60)
    await store.index_add("user:alice", "s2", 60)
    await store.index_add("user:alice", "s1", 60)
    await store.index_add("user:bob", "s3", 60)
    assert sorted(await store.index_members("user:alice")) == ["s1", "s2"]
    await store.index_remove("user:alice", "s1")
    await store.index_remove("user:alice", "absent")
    assert await store.index_members("user:alice") == ["s2"]
    assert await store.index_members("user:nobody") == []


@pytest.mark.anyio
async def test_index_lives_at_least_the_longest_ttl(store: StateStore) -> None:
    """A later add with a longer TTL keeps the whole set, earlier members included, alive."""
    await store.index_add("ix", "early", 0.2)
    await store.index_add("ix", "late", 60)
    await store.index_add("ix", "short-again", 0.1)  # never shortens the set's life
    await asyncio.sleep(0.3)
    assert sorted(await store.index_members("ix")) == ["early", "late", "short-again"]


@pytest.mark.anyio
async def test_an_expired_index_does_not_come_back(store: StateStore) -> None:
    """After a set expired, adding to it starts a new set without the old members."""
    await store.index_add("ix", "old", 0.2)
    await asyncio.sleep(0.3)
    assert await store.index_members("ix") == []
    await store.index_add("ix", "new", 60)
    assert await store.index_members("ix") == ["new"]


# -- feed ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_feed_from_now_on_in_order(new_store: NewStore) -> None:
    """Cursor None skips older messages; later ones arrive in publish order, once, per channel."""
    writer, reader = await new_store(), await new_store()
    await writer.publish("revoke", "before")
    messages, cursor = await reader.read_since("revoke", None)
    assert messages == []
    for m in ["m1", "m2", "m3"]:
        await writer.publish("revoke", m)
    await writer.publish("other", "elsewhere")
    messages, cursor = await reader.read_since("revoke", cursor)
    assert messages == ["m1", "m2", "m3"]
    assert await reader.read_since("revoke", cursor) == ([], cursor)
    await writer.publish("revoke", "m4")
    assert (await reader.read_since("revoke", cursor))[0] == ["m4"]


@pytest.mark.anyio
async def test_feed_cursor_none_on_an_empty_feed(store: StateStore) -> None:
    """On a feed never written, cursor None still gives a cursor that sees the first message."""
    messages, cursor = await store.read_since("fresh", None)
    assert messages == []
    await store.publish("fresh", "first")
    assert (await store.read_since("fresh", cursor))[0] == ["first"]


@pytest.mark.anyio
async def test_feed_reads_in_batches_until_caught_up(store: StateStore) -> None:
    """More messages than one read returns are all delivered, in order, over several reads."""
    _, cursor = await store.read_since("bulk", None)
    sent = [f"m{i}" for i in range(1005)]
    for m in sent:
        await store.publish("bulk", m)
    received: list[str] = []
    while True:
        batch, cursor = await store.read_since("bulk", cursor)
        if not batch:
            break
        assert len(batch) <= 1000
        received += batch
    assert received == sent


@pytest.mark.anyio
async def test_malformed_feed_cursor_is_refused(store: StateStore) -> None:
    """A cursor the store never issued is a ValueError, not a silent full replay."""
    with pytest.raises(ValueError, match="cursor"):
        await store.read_since("revoke", "nonsense")


# -- lock ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lock_excludes_a_second_holder_until_released(new_store: NewStore) -> None:
    """Two contenders on two instances: the second waits until the first leaves, then wins."""
    a, b = await new_store(), await new_store()
    events: list[str] = []
    first_in = asyncio.Event()

    async def first() -> None:
        async with a.lock("refresh:s1", 5) as won:
            assert won
            events.append("a-in")
            first_in.set()
            await asyncio.sleep(0.2)
            events.append("a-out")

    async def second() -> None:
        await first_in.wait()
        async with b.lock("refresh:s1", 5) as won:
            assert won
            events.append("b-in")

    await asyncio.gather(first(), second())
    assert events == ["a-in", "a-out", "b-in"]


@pytest.mark.anyio
async def test_lock_not_won_within_ttl_yields_false(new_store: NewStore) -> None:
    """A contender whose TTL passes while the lock is held gets False; other names are free."""
    a, b = await new_store(), await new_store()
    async with a.lock("refresh:s1", 5) as won:
        assert won
        async with b.lock("refresh:s1", 0.2) as lost:
            assert lost is False
        async with b.lock("refresh:s2", 0.2) as other:
            assert other is True


@pytest.mark.anyio
async def test_an_expired_holder_does_not_release_the_next_holders_lock(
    new_store: NewStore,
) -> None:
    """A holder outliving its TTL loses the lock; its release leaves the new holder's lock."""
    a, b, c = await new_store(), await new_store(), await new_store()
    a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_holder() -> None:
        async with a.lock("job", 0.2) as won:
            assert won
            a_in.set()
            await b_in.wait()  # held past its TTL
        a_out.set()

    async def next_holder() -> None:
        await a_in.wait()
        async with b.lock("job", 5) as won:
            assert won
            b_in.set()
            await a_out.wait()
            async with c.lock("job", 0.2) as third:
                assert third is False  # still b's, although a has "released"

    await asyncio.gather(slow_holder(), next_holder())


# -- availability -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ping_answers_true(store: StateStore) -> None:
    """An open store answers ping."""
    assert await store.ping() is True


@pytest.fixture(params=["sqlite-unwritable", "redis-closed-port"])
def broken_store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    """A store whose backing cannot be reached: a path below a regular file, a closed port."""
    if request.param == "sqlite-unwritable":
        (tmp_path / "a-file").write_bytes(b"")
        return SqliteStateStore(tmp_path / "a-file" / "state.db")  # even root cannot mkdir here
    return RedisStateStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5)


@pytest.mark.anyio
async def test_unreachable_store_raises_state_unavailable(broken_store: StateStore) -> None:
    """open and every operation raise StateUnavailable (cause chained); ping says False."""
    with pytest.raises(StateUnavailable) as opened:
        await broken_store.open()
    assert opened.value.__cause__ is not None
    assert opened.value.code == "state-unavailable"
    assert await broken_store.ping() is False
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: broken_store.put("ns", "k", b"v", 60),
        lambda: broken_store.put_new("ns", "k", b"v", 60),
        lambda: broken_store.get("ns", "k"),
        lambda: broken_store.take("ns", "k"),
        lambda: broken_store.delete("ns", "k"),
        lambda: broken_store.index_add("ix", "m", 60),
        lambda: broken_store.index_members("ix"),
        lambda: broken_store.index_remove("ix", "m"),
        lambda: broken_store.publish("ch", "m"),
        lambda: broken_store.read_since("ch", None),
    ]
    for call in calls:
        with pytest.raises(StateUnavailable):
            await asyncio.wait_for(call(), 10)
    with pytest.raises(StateUnavailable):
        [kv async for kv in broken_store.scan("ns")]
    with pytest.raises(StateUnavailable):
        async with broken_store.lock("l", 0.1):
            pass
    await broken_store.close()


# -- factory ------------------------------------------------------------------------------------


def test_factory_builds_sqlite_stores_relative_and_absolute(tmp_path: Path) -> None:
    """sqlite:///rel.db resolves against base_dir; sqlite:////abs.db is absolute."""
    rel = open_state_store("sqlite:///data/state.db", base_dir=tmp_path)
    assert isinstance(rel, SqliteStateStore)
    assert rel.path == tmp_path / "data" / "state.db"
    absolute = open_state_store("sqlite:////var/lib/tabiji/state.db", base_dir=tmp_path)
    assert isinstance(absolute, SqliteStateStore)
    assert absolute.path == Path("/var/lib/tabiji/state.db")


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/1", "unix:///run/r.sock"]
)
def test_factory_builds_redis_stores(url: str) -> None:
    """redis://, rediss:// and unix:// URLs give a Redis store."""
    assert isinstance(open_state_store(url), RedisStateStore)


@pytest.mark.parametrize(
    ("url", "base_dir", "message"),
    [
        ("postgresql://db/state", None, "accepted: sqlite:///relative"),
        ("memory://", None, "accepted: sqlite:///relative"),
        ("state.db", None, "accepted: sqlite:///relative"),
        ("sqlite://state.db", None, "is not one of: sqlite:///relative"),
        ("sqlite:///state.db?mode=ro", None, "is not one of"),
        ("sqlite:///", None, "names no file"),
        ("sqlite:///dir/", None, "names no file"),
        ("sqlite:///state.db", None, "relative but no base directory"),
        ("redis://:6379/0", None, "needs a host"),
        ("redis://host:notaport/0", None, "malformed"),
        ("unix://relative.sock", None, "absolute socket path"),
    ],
)
def test_factory_refuses_other_urls(url: str, base_dir: Path | None, message: str) -> None:
    """Anything but the accepted forms is a ValueError that says what is accepted or wrong."""
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        open_state_store(url, base_dir=base_dir)


def test_factory_error_does_not_echo_a_password() -> None:
    """The error for an unsupported URL names it without its password."""
    with pytest.raises(ValueError, match="unsupported") as refused:
        open_state_store("memcache://user:hunter2@host:11211")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("rediss://app:hunter2@[::1]:6380/2", "rediss://***@[::1]:6380/2"),
        ("redis://hunter2@cache/0", "redis://***@cache/0"),
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("sqlite:////var/lib/tabiji/state.db", "sqlite:////var/lib/tabiji/state.db"),
        ("redis://:hun?ter2@cache/0", "redis://***@cache/0"),
        ("redis://:hunter2@cache/0#frag", "redis://***@cache/0"),
    ],
)
def test_describe_store_hides_credentials(url: str, shown: str) -> None:
    """describe_store shows where the store is but never a password (user info, query)."""
    assert describe_store(url) == shown
