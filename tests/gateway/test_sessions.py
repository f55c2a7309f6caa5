"""Sessions on the real stores: creation, lookup, expiry, host binding, revocation, refresh.

Each "worker" is its own SessionManager on its own store instance sharing one SQLite file (or one
Redis key prefix), as the processes and replicas of one gateway do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from gateway.identity.sessions import (
    SEEN_NS,
    SESSION_NS,
    LoginFacts,
    MainSession,
    SessionManager,
    session_hash,
)
from gateway.state.base import StateStore, StateUnavailable
from gateway.state.redis import RedisStateStore
from gateway.state.sqlite import SqliteStateStore

REDIS_URL = os.environ.get("TABIJI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
P = "login.example.test"  # the public URL's authority
APP = "app.example.test"
OTHER = "other.example.test"
T0 = 1_800_000_000.0
LIFETIME = 12 * 3600.0
IDLE = 3600.0


@dataclass(frozen=True, slots=True)
class Login:
    """A completed OIDC login, as the OIDC client reports it."""

    issuer: str = "https://idp.example.test"
    subject: str = "user-1"
    email: str | None = "Hanako@Town.example"
    email_verified: bool = True
    name: str | None = "山田 花子"
    groups: frozenset[str] = frozenset({"staff"})
    groups_overage: bool = False
    amr: frozenset[str] = frozenset({"pwd", "otp"})
    acr: str | None = "mfa"
    sid: str | None = "idp-session-1"
    id_token: str | None = "id.token.1"
    refresh_token: str | None = "refresh-1"
    claims: dict[str, Any] = field(
        default_factory=lambda: {"department": "住民課", "nonce": "n-1", "roles": ["clerk"]}
    )


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


NewStore = Callable[[], Awaitable[StateStore]]


async def _stores(kind: str, tmp_path: Path) -> AsyncIterator[NewStore]:
    opened: list[StateStore] = []
    prefix = f"tabiji-test-{secrets.token_hex(8)}:"
    if kind == "redis":
        require_redis(REDIS_URL)

    async def new() -> StateStore:
        store: StateStore
        if kind == "sqlite":
            store = SqliteStateStore(tmp_path / "state.db")
        else:
            store = RedisStateStore(REDIS_URL, prefix=prefix)
        await store.open()
        opened.append(store)
        return store

    yield new
    for store in opened:
        await store.close()
    if kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def new_store(tmp_path: Path) -> AsyncIterator[NewStore]:
    """Store instances sharing one SQLite file."""
    async for new in _stores("sqlite", tmp_path):
        yield new


@pytest.fixture(params=["sqlite", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewStore]:
    """Store instances sharing one SQLite file, or one Redis key prefix."""
    async for new in _stores(request.param, tmp_path):
        yield new


def manager(store: StateStore, **changes: Any) -> SessionManager:
    """A SessionManager with the test defaults."""
    options: dict[str, Any] = {
        "public_host": P,
        "lifetime": LIFETIME,
        "idle_timeout": IDLE,
        "touch_interval": 60.0,
        "recheck_interval": 30.0,
        "refresh_interval": 900.0,
    }
    options.update(changes)
    return SessionManager(store, **options)


class CountingRefresher:
    """A refresher that counts its calls, takes a moment, and answers with new groups."""

    def __init__(self, result: LoginFacts | Exception | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.result = result
        self.during: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, main: MainSession) -> LoginFacts:
        assert main.refresh_token is not None
        self.calls.append((main.provider, main.refresh_token))
        await asyncio.sleep(0.05)
        if self.during is not None:
            await self.during()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result or Login(groups=frozenset({"staff", "new"}), refresh_token="refresh-2")


class RefreshError(Exception):
    """Like oidc.OidcError: a code says what went wrong."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# -- creating and finding ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_login_makes_a_session_found_at_the_public_url(any_store: NewStore) -> None:
    """create_main gives a cookie whose lookup at the public URL is the login's identity."""
    sessions = manager(await any_store())
    cookie, main = await sessions.create_main(Login(), "town", T0)
    identity = await sessions.lookup(cookie, P, T0 + 1)
    assert identity is not None
    assert (identity.issuer, identity.subject, identity.provider) == (
        "https://idp.example.test",
        "user-1",
        "town",
    )
    assert identity.method == "session"
    assert identity.groups == frozenset({"staff"})
    assert identity.amr == frozenset({"pwd", "otp"})
    assert identity.acr == "mfa"
    assert identity.email_verified
    assert identity.session_hash == main == session_hash(cookie)
    assert identity.idp_sid == "idp-session-1"
    assert identity.expires_at == T0 + LIFETIME
    # The ID token's other claims are kept for the policy; JWT plumbing is not.
    assert dict(identity.claims) == {"department": "住民課", "roles": ["clerk"]}


@pytest.mark.anyio
async def test_oversized_claims_keep_only_short_scalars(new_store: NewStore) -> None:
    """A login with huge claims keeps only its short scalar ones in the session."""
    store = await new_store()
    claims = {"big": ["x" * 100] * 500, "dept": "soumu", "long": "y" * 1000, "n": 3}
    cookie, _ = await manager(store).create_main(Login(claims=claims), "town", T0)
    identity = await manager(store).lookup(cookie, P, T0)  # read back from the store
    assert identity is not None
    assert dict(identity.claims) == {"dept": "soumu", "n": 3}


@pytest.mark.anyio
async def test_another_worker_finds_the_session_in_the_store(any_store: NewStore) -> None:
    """A session created by one worker is found by another (shared store, cold cache)."""
    first, second = manager(await any_store()), manager(await any_store())
    cookie, _ = await first.create_main(Login(), "town", T0)
    identity = await second.lookup(cookie, P, T0 + 1)
    assert identity is not None
    assert identity.subject == "user-1"


@pytest.mark.anyio
async def test_every_login_gets_a_new_id(new_store: NewStore) -> None:
    """Two logins of the same user get different cookie ids and records (no fixation)."""
    sessions = manager(await new_store())
    first = await sessions.create_main(Login(), "town", T0)
    second = await sessions.create_main(Login(), "town", T0)
    assert first[0] != second[0]
    assert first[1] != second[1]
    assert len(first[0]) >= 43  # 256 bits in URL-safe base64


@pytest.mark.anyio
async def test_the_store_never_holds_a_usable_cookie(new_store: NewStore) -> None:
    """Records are keyed by sha256(cookie id); the cookie id itself appears nowhere in the store."""
    store = await new_store()
    sessions = manager(store)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    host_cookie = await sessions.create_host(main, APP, T0)
    assert host_cookie is not None
    rows = [(k, v) async for k, v in store.scan(SESSION_NS)]
    assert {k for k, _ in rows} == {
        hashlib.sha256(cookie.encode()).hexdigest(),
        hashlib.sha256(host_cookie.encode()).hexdigest(),
    }
    for key, value in rows:
        for secret in (cookie, host_cookie):
            assert secret not in key
            assert secret.encode() not in value


@pytest.mark.anyio
@pytest.mark.parametrize("cookie", ["", "x", "A" * 43, "A" * 500])
async def test_unknown_cookies_find_nothing(new_store: NewStore, cookie: str) -> None:
    """An empty, unknown or overlong cookie value is no session."""
    sessions = manager(await new_store())
    await sessions.create_main(Login(), "town", T0)
    assert await sessions.lookup(cookie, P, T0) is None


@pytest.mark.anyio
async def test_a_malformed_record_is_no_session(new_store: NewStore) -> None:
    """A record that is not one we wrote (bad JSON, wrong types) is treated as absent."""
    store = await new_store()
    sessions = manager(store)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    await store.put(SESSION_NS, main, b'{"kind":"main","issuer":1}', 60)
    assert await manager(store).lookup(cookie, P, T0) is None
    await store.put(SESSION_NS, main, b"\xff not json", 60)
    assert await manager(store).lookup(cookie, P, T0) is None


# -- lifetime -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_absolute_lifetime_ends_a_busy_session(new_store: NewStore) -> None:
    """Even with activity all along, the session ends at created + lifetime, in the store too."""
    sessions = manager(await new_store(), idle_timeout=LIFETIME)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    assert await sessions.lookup(cookie, P, T0 + LIFETIME - 1) is not None
    assert await sessions.lookup(cookie, P, T0 + LIFETIME) is None
    assert await sessions.get_main(main) is None


@pytest.mark.anyio
async def test_the_idle_timeout_ends_a_quiet_session(new_store: NewStore) -> None:
    """A session nobody used for longer than idle_timeout ends; activity keeps it alive."""
    sessions = manager(await new_store())
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    assert await sessions.lookup(cookie, P, T0 + IDLE - 10) is not None  # activity
    assert await sessions.lookup(cookie, P, T0 + 2 * IDLE - 20) is not None  # still in time
    await sessions.drain()
    assert await sessions.lookup(cookie, P, T0 + 3 * IDLE) is None  # quiet too long


@pytest.mark.anyio
async def test_idle_expiry_rereads_activity_seen_by_another_worker(new_store: NewStore) -> None:
    """Before ending an apparently idle session a worker re-reads the store, where another
    worker recorded recent activity: the session lives on."""
    first = manager(await new_store(), recheck_interval=10 * LIFETIME)
    second = manager(await new_store(), recheck_interval=10 * LIFETIME)
    cookie, _ = await first.create_main(Login(), "town", T0)
    assert await first.lookup(cookie, P, T0) is not None  # cached by the first worker
    assert await second.lookup(cookie, P, T0 + 0.6 * IDLE) is not None
    await second.drain()  # its activity reaches the store off the request path
    assert await first.lookup(cookie, P, T0 + 1.2 * IDLE) is not None
    await first.drain()
    # And after a quiet idle_timeout since that last use, it does end.
    assert await first.lookup(cookie, P, T0 + 2.3 * IDLE) is None


@pytest.mark.anyio
async def test_activity_is_written_at_most_every_touch_interval(new_store: NewStore) -> None:
    """Lookups within touch_interval write nothing; the next one writes the activity time."""
    store = await new_store()
    sessions = manager(store, touch_interval=60.0)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    await sessions.lookup(cookie, P, T0 + 30)
    await sessions.drain()
    assert float(await store.get(SEEN_NS, main) or b"0") == T0
    await sessions.lookup(cookie, P, T0 + 61)
    await sessions.drain()
    assert float(await store.get(SEEN_NS, main) or b"0") == T0 + 61


# -- host binding -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_host_sessions_work_only_on_their_own_host(any_store: NewStore) -> None:
    """A host session is found on its host only; the main cookie only on the public URL."""
    sessions = manager(await any_store())
    cookie, main = await sessions.create_main(Login(), "town", T0)
    host_cookie = await sessions.create_host(main, APP, T0)
    assert host_cookie is not None
    identity = await sessions.lookup(host_cookie, APP, T0)
    assert identity is not None
    assert identity.session_hash == main  # the main hash: one `sid` across hosts
    assert await sessions.lookup(host_cookie, OTHER, T0) is None  # replayed on another host
    assert await sessions.lookup(host_cookie, P, T0) is None  # a host cookie at the public URL
    assert await sessions.lookup(cookie, APP, T0) is None  # the main cookie on a route host
    assert await sessions.lookup(cookie, P, T0) is not None


@pytest.mark.anyio
async def test_host_activity_keeps_the_main_session_alive(new_store: NewStore) -> None:
    """Working only on a route host counts as activity for the whole session."""
    sessions = manager(await new_store())
    cookie, main = await sessions.create_main(Login(), "town", T0)
    host_cookie = await sessions.create_host(main, APP, T0)
    assert host_cookie is not None
    for step in range(1, 4):
        assert await sessions.lookup(host_cookie, APP, T0 + step * 0.9 * IDLE) is not None
    await sessions.drain()
    assert await manager(await new_store()).lookup(cookie, P, T0 + 3.5 * IDLE) is not None


@pytest.mark.anyio
async def test_no_host_session_for_an_ended_main_session(new_store: NewStore) -> None:
    """create_host refuses when the main session is gone."""
    sessions = manager(await new_store())
    _, main = await sessions.create_main(Login(), "town", T0)
    await sessions.revoke(main, "test")
    assert await sessions.create_host(main, APP, T0) is None


@pytest.mark.anyio
async def test_end_host_forgets_only_that_host(new_store: NewStore) -> None:
    """end_host removes one host session; the main session and other hosts live on."""
    sessions = manager(await new_store())
    cookie, main = await sessions.create_main(Login(), "town", T0)
    app_cookie = await sessions.create_host(main, APP, T0)
    other_cookie = await sessions.create_host(main, OTHER, T0)
    assert app_cookie is not None
    assert other_cookie is not None
    await sessions.end_host(app_cookie)
    assert await sessions.lookup(app_cookie, APP, T0) is None
    assert await sessions.lookup(other_cookie, OTHER, T0) is not None
    assert await sessions.lookup(cookie, P, T0) is not None


# -- revocation ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_revoke_ends_the_main_session_and_every_host_session(any_store: NewStore) -> None:
    """After revoke, neither the main cookie nor any host cookie is a session, in any worker."""
    sessions = manager(await any_store())
    cookie, main = await sessions.create_main(Login(), "town", T0)
    host_cookie = await sessions.create_host(main, APP, T0)
    assert host_cookie is not None
    assert await sessions.lookup(host_cookie, APP, T0) is not None
    assert await sessions.revoke(main, "test")
    assert await sessions.lookup(cookie, P, T0) is None
    assert await sessions.lookup(host_cookie, APP, T0) is None
    other_worker = manager(await any_store())
    assert await other_worker.lookup(host_cookie, APP, T0) is None
    assert not await sessions.revoke(main, "again")  # already gone


@pytest.mark.anyio
async def test_the_feed_drops_a_revoked_session_from_another_workers_cache(
    any_store: NewStore,
) -> None:
    """A worker holding a session in its cache drops it when the feed reports the revocation,
    and tells its listeners (which close that user's WebSockets)."""
    first = manager(await any_store())
    second = manager(await any_store(), recheck_interval=10 * LIFETIME)
    _, main = await first.create_main(Login(), "town", T0)
    host_cookie = await first.create_host(main, APP, T0)
    assert host_cookie is not None
    assert await second.lookup(host_cookie, APP, T0) is not None  # now cached there
    heard: list[frozenset[str]] = []
    told = asyncio.Event()

    def listener(hashes: frozenset[str]) -> None:
        heard.append(hashes)
        told.set()

    second.on_revoked(listener)
    stop = asyncio.Event()
    feed = asyncio.create_task(second.run_feed(stop, poll_interval=0.02))
    try:
        await asyncio.sleep(0.1)  # the feed has taken its starting cursor
        await first.revoke(main, "test")
        async with asyncio.timeout(5):
            await told.wait()
    finally:
        stop.set()
        await feed
    assert heard == [frozenset({main})]
    assert await second.lookup(host_cookie, APP, T0 + 1) is None


@pytest.mark.anyio
async def test_without_the_feed_the_recheck_interval_still_ends_it(new_store: NewStore) -> None:
    """A worker that missed the feed message finds out at its next re-check of the store."""
    first = manager(await new_store())
    second = manager(await new_store(), recheck_interval=30.0)
    cookie, main = await first.create_main(Login(), "town", T0)
    assert await second.lookup(cookie, P, T0) is not None
    await first.revoke(main, "test")
    assert await second.lookup(cookie, P, T0 + 10) is not None  # cached, not yet re-checked
    assert await second.lookup(cookie, P, T0 + 31) is None


class OutageStore(SqliteStateStore):
    """A SQLite store that can be taken down: every read and write fails as Redis does."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StateUnavailable("the test store is down")

    async def get(self, ns: str, key: str) -> bytes | None:
        self._check()
        return await super().get(ns, key)

    async def put(self, ns: str, key: str, value: bytes, ttl: float) -> None:
        self._check()
        await super().put(ns, key, value, ttl)

    async def read_since(self, channel: str, cursor: str | None) -> tuple[list[str], str]:
        self._check()
        return await super().read_since(channel, cursor)


@pytest.mark.anyio
async def test_without_the_store_a_cached_session_lasts_until_its_recheck(
    tmp_path: Path,
) -> None:
    """With the store down, a session this worker checked is honoured until its recheck is due,
    then refused (StateUnavailable: 503), never answered from the cache again; with the store
    back it is found again."""
    store = OutageStore(tmp_path / "state.db")
    await store.open()
    try:
        sessions = manager(store, recheck_interval=30.0)
        cookie, _ = await sessions.create_main(Login(), "town", T0)
        assert await sessions.lookup(cookie, P, T0 + 1) is not None
        store.down = True
        assert await sessions.lookup(cookie, P, T0 + 29) is not None  # cached, checked at T0
        for later in (T0 + 30, T0 + 31, T0 + 600):
            with pytest.raises(StateUnavailable):
                await sessions.lookup(cookie, P, later)
        with pytest.raises(StateUnavailable):  # a cookie this worker never saw
            await sessions.lookup("x" * 43, P, T0 + 5)
        store.down = False
        assert await sessions.lookup(cookie, P, T0 + 601) is not None
    finally:
        await sessions.drain()
        await store.close()


@pytest.mark.anyio
async def test_a_feed_outage_is_logged_once_and_its_end_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The feed follower says once that it cannot read the feed (not at every poll) and says
    when it can again."""
    store = OutageStore(tmp_path / "state.db")
    await store.open()
    sessions = manager(store)
    stop = asyncio.Event()
    feed = asyncio.create_task(sessions.run_feed(stop, poll_interval=0.01))
    try:
        await asyncio.sleep(0.05)
        store.down = True
        await asyncio.sleep(0.2)  # about 20 failed polls
        store.down = False
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await feed
        await store.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "tabiji.sessions"]
    assert sum("could not read the revocation feed" in m for m in messages) == 1
    assert sum("can be read again" in m for m in messages) == 1


@pytest.mark.anyio
async def test_revoke_user_ends_every_session_of_that_user_only(any_store: NewStore) -> None:
    """revoke_user ends all sessions of (issuer, subject), not another user's or issuer's."""
    sessions = manager(await any_store())
    a1, _ = await sessions.create_main(Login(), "town", T0)
    a2, _ = await sessions.create_main(Login(sid="idp-session-2"), "town", T0)
    other_user, _ = await sessions.create_main(Login(subject="user-2"), "town", T0)
    other_issuer, _ = await sessions.create_main(
        Login(issuer="https://other-idp.example.test"), "contractors", T0
    )
    assert await sessions.revoke_user("https://idp.example.test", "user-1") == 2
    assert await sessions.lookup(a1, P, T0) is None
    assert await sessions.lookup(a2, P, T0) is None
    assert await sessions.lookup(other_user, P, T0) is not None
    assert await sessions.lookup(other_issuer, P, T0) is not None


@pytest.mark.anyio
async def test_revoke_email_is_case_insensitive(new_store: NewStore) -> None:
    """revoke_email ends sessions whose login carried the address, in any letter case."""
    sessions = manager(await new_store())
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    other, _ = await sessions.create_main(Login(subject="u2", email="other@town.example"), "t", T0)
    assert await sessions.revoke_email("hanako@town.EXAMPLE") == 1
    assert await sessions.lookup(cookie, P, T0) is None
    assert await sessions.lookup(other, P, T0) is not None


@pytest.mark.anyio
async def test_revoke_idp_sid_ends_only_that_idp_session(new_store: NewStore) -> None:
    """Back-channel logout by sid ends the sessions of that IdP session only."""
    sessions = manager(await new_store())
    first, _ = await sessions.create_main(Login(sid="s1"), "town", T0)
    second, _ = await sessions.create_main(Login(sid="s2"), "town", T0)
    assert await sessions.revoke_idp_sid("https://idp.example.test", "s1") == 1
    assert await sessions.revoke_idp_sid("https://other.example.test", "s2") == 0
    assert await sessions.lookup(first, P, T0) is None
    assert await sessions.lookup(second, P, T0) is not None


@pytest.mark.anyio
async def test_list_sessions_shows_users_and_their_hosts(new_store: NewStore) -> None:
    """list_sessions gives each live main session with the hosts it was handed to, no tokens."""
    sessions = manager(await new_store())
    _, main = await sessions.create_main(Login(), "town", T0)
    await sessions.create_host(main, APP, T0)
    await sessions.create_host(main, OTHER, T0)
    _, ended = await sessions.create_main(Login(subject="gone"), "town", T0)
    await sessions.revoke(ended, "test")
    listed = await sessions.list_sessions()
    assert [(s.hash, s.subject, s.hosts) for s in listed] == [(main, "user-1", (APP, OTHER))]
    assert not hasattr(listed[0], "refresh_token")


# -- IdP token refresh --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_parallel_requests_at_refresh_time_refresh_once(any_store: NewStore) -> None:
    """20 concurrent lookups when the refresh is due: one refresher call, no lookup fails, and
    afterwards the session carries the refreshed groups and refresh token."""
    refresher = CountingRefresher()
    store = await any_store()
    sessions = manager(store, refresher=refresher)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    due = T0 + 901
    results = await asyncio.gather(*(sessions.lookup(cookie, P, due) for _ in range(20)))
    assert all(r is not None and r.subject == "user-1" for r in results)
    await sessions.drain()
    assert refresher.calls == [("town", "refresh-1")]
    identity = await sessions.lookup(cookie, P, due + 1)
    assert identity is not None
    assert identity.groups == frozenset({"staff", "new"})
    record = await sessions.get_main(main)
    assert record is not None
    assert record.refresh_token == "refresh-2"
    assert record.refresh_at == due + 900


class LockCountingStore:
    """A store that counts how often the refresh lock is asked for (delegates the rest)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self.locks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def lock(self, name: str, ttl: float) -> Any:
        self.locks += 1
        return self._store.lock(name, ttl)


@pytest.mark.anyio
async def test_one_process_asks_for_the_refresh_lock_once(new_store: NewStore) -> None:
    """Within one worker, concurrent lookups start one refresh: the store lock is asked once."""
    store = LockCountingStore(await new_store())
    sessions = manager(store, refresher=CountingRefresher())  # type: ignore[arg-type]
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    await asyncio.gather(*(sessions.lookup(cookie, P, T0 + 901) for _ in range(20)))
    await sessions.drain()
    assert store.locks == 1


@pytest.mark.anyio
async def test_no_refresh_without_winning_the_lock(new_store: NewStore) -> None:
    """While another worker holds the refresh lock past the TTL, this one does not refresh."""
    refresher = CountingRefresher()
    store = await new_store()
    sessions = manager(store, refresher=refresher, refresh_lock_ttl=0.2)
    cookie, main = await sessions.create_main(Login(), "town", T0)
    other = await new_store()
    async with other.lock(f"refresh:{main}", 5.0) as held:
        assert held
        assert await sessions.lookup(cookie, P, T0 + 901) is not None
        await sessions.drain()
    assert refresher.calls == []


@pytest.mark.anyio
async def test_two_workers_at_refresh_time_refresh_once(any_store: NewStore) -> None:
    """Two workers noticing the due refresh together call the IdP once (the store lock, then a
    re-read shows the other already refreshed)."""
    refresher = CountingRefresher()
    first = manager(await any_store(), refresher=refresher)
    second = manager(await any_store(), refresher=refresher)
    cookie, _ = await first.create_main(Login(), "town", T0)
    assert await second.lookup(cookie, P, T0) is not None
    due = T0 + 901
    results = await asyncio.gather(
        *(worker.lookup(cookie, P, due) for worker in (first, second) for _ in range(5))
    )
    assert all(results)
    await asyncio.gather(first.drain(), second.drain())
    assert len(refresher.calls) == 1


@pytest.mark.anyio
async def test_a_rejected_refresh_ends_the_session(new_store: NewStore) -> None:
    """The IdP rejecting the refresh token (oidc-refresh-rejected) ends the session."""
    refresher = CountingRefresher(RefreshError("oidc-refresh-rejected"))
    sessions = manager(await new_store(), refresher=refresher)
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    assert await sessions.lookup(cookie, P, T0 + 901) is not None  # this request goes on
    await sessions.drain()
    assert await sessions.lookup(cookie, P, T0 + 902) is None


@pytest.mark.anyio
async def test_a_failed_refresh_keeps_the_session_and_retries_later(new_store: NewStore) -> None:
    """A transient failure (oidc-refresh-failed) keeps the session; the retry waits a while."""
    refresher = CountingRefresher(RefreshError("oidc-refresh-failed"))
    sessions = manager(await new_store(), refresher=refresher)
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    assert await sessions.lookup(cookie, P, T0 + 901) is not None
    await sessions.drain()
    assert await sessions.lookup(cookie, P, T0 + 902) is not None
    await sessions.drain()
    assert len(refresher.calls) == 1  # backing off, not hammering the IdP
    assert await sessions.lookup(cookie, P, T0 + 901 + 61) is not None
    await sessions.drain()
    assert len(refresher.calls) == 2


@pytest.mark.anyio
async def test_a_refresh_for_another_subject_ends_the_session(new_store: NewStore) -> None:
    """A refresh answering for another user never changes whose session this is."""
    refresher = CountingRefresher(Login(subject="someone-else"))
    sessions = manager(await new_store(), refresher=refresher)
    cookie, _ = await sessions.create_main(Login(), "town", T0)
    await sessions.lookup(cookie, P, T0 + 901)
    await sessions.drain()
    assert await sessions.lookup(cookie, P, T0 + 902) is None


@pytest.mark.anyio
async def test_a_refresh_does_not_bring_back_a_session_revoked_meanwhile(
    new_store: NewStore,
) -> None:
    """A session revoked while its refresh was in flight stays revoked (the tombstone)."""
    refresher = CountingRefresher()
    sessions = manager(await new_store(), refresher=refresher)
    cookie, main = await sessions.create_main(Login(), "town", T0)

    async def revoke_meanwhile() -> None:
        await manager(await new_store()).revoke(main, "admin")

    refresher.during = revoke_meanwhile
    await sessions.lookup(cookie, P, T0 + 901)
    await sessions.drain()
    assert await sessions.get_main(main) is None
    assert await manager(await new_store()).lookup(cookie, P, T0 + 902) is None


@pytest.mark.anyio
async def test_no_refresh_without_a_refresh_token(new_store: NewStore) -> None:
    """A login without a refresh token is never refreshed; it lasts its lifetime."""
    refresher = CountingRefresher()
    sessions = manager(await new_store(), refresher=refresher)
    cookie, _ = await sessions.create_main(replace(Login(), refresh_token=None), "town", T0)
    assert await sessions.lookup(cookie, P, T0 + 901) is not None
    await sessions.drain()
    assert refresher.calls == []
