"""Which credential a request presents: bearer token first, else exactly one session cookie."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_sessions import Login

from gateway.identity.model import Identity
from gateway.identity.resolve import (
    IdentityRejected,
    IdentityResolver,
    cookie_values,
    single_cookie,
)
from gateway.identity.sessions import SessionManager
from gateway.jose import TokenInvalid
from gateway.state.sqlite import SqliteStateStore

P = "login.example.test"
APP = "app.example.test"
NOW = 1_800_000_000.0
GOOD_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2ln"


class FakeBearer:
    """A bearer verifier that knows one good token; counts full verifications."""

    def __init__(self) -> None:
        self.verified = 0
        self.identity = Identity(
            issuer="https://idp.example.test",
            subject="bot",
            method="bearer",
            provider="ci",
            expires_at=NOW + 300,
        )
        self.warm = False

    def cached(self, token: str, now: float) -> Identity | None:
        return self.identity if self.warm and token == GOOD_TOKEN else None

    async def verify(self, token: str, now: float) -> Identity:
        self.verified += 1
        if token != GOOD_TOKEN:
            raise TokenInvalid("token-bad-signature", "signature does not verify")
        self.warm = True
        return self.identity


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[SessionManager]:
    """A session manager on a fresh SQLite store."""
    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    yield SessionManager(store, public_host=P, lifetime=3600, idle_timeout=3600)
    await store.close()


def cookie(value: str, name: str = "__Host-tabiji-session") -> tuple[bytes, bytes]:
    """A Cookie header carrying one cookie."""
    return (b"cookie", f"{name}={value}".encode())


@pytest.mark.anyio
async def test_a_session_cookie_gives_the_session_identity(sessions: SessionManager) -> None:
    """The HTTPS session cookie, looked up for this host, is the request's identity."""
    cookie_id, _ = await sessions.create_main(Login(), "town", NOW)
    resolver = IdentityResolver(sessions, FakeBearer())
    identity = await resolver.resolve([cookie(cookie_id)], P, True, NOW)
    assert identity is not None
    assert identity.subject == "user-1"
    assert await resolver.resolve([cookie(cookie_id)], APP, True, NOW) is None  # another host


@pytest.mark.anyio
async def test_the_cookie_name_follows_the_scheme(sessions: SessionManager) -> None:
    """Over HTTPS only `__Host-tabiji-session` counts; over HTTP only `tabiji-session`."""
    cookie_id, _ = await sessions.create_main(Login(), "town", NOW)
    resolver = IdentityResolver(sessions, None)
    plain = cookie(cookie_id, "tabiji-session")
    assert await resolver.resolve([plain], P, True, NOW) is None
    assert await resolver.resolve([plain], P, False, NOW) is not None
    assert await resolver.resolve([cookie(cookie_id)], P, False, NOW) is None
    assert await resolver.resolve([cookie(cookie_id, "_session")], P, True, NOW) is None


@pytest.mark.anyio
async def test_two_session_cookies_are_none(sessions: SessionManager) -> None:
    """Two cookies of our name (one planted by someone else) mean no session at all."""
    mine, _ = await sessions.create_main(Login(), "town", NOW)
    theirs, _ = await sessions.create_main(Login(subject="attacker"), "town", NOW)
    resolver = IdentityResolver(sessions, None)
    one_header = (
        b"cookie",
        f"__Host-tabiji-session={theirs}; __Host-tabiji-session={mine}".encode(),
    )
    assert await resolver.resolve([one_header], P, True, NOW) is None
    assert await resolver.resolve([cookie(theirs), cookie(mine)], P, True, NOW) is None


@pytest.mark.anyio
async def test_a_valid_bearer_token_is_the_identity(sessions: SessionManager) -> None:
    """A good bearer token gives its identity; the second time from the cache, unverified."""
    bearer = FakeBearer()
    resolver = IdentityResolver(sessions, bearer)
    headers = [(b"authorization", f"Bearer {GOOD_TOKEN}".encode())]
    first = await resolver.resolve(headers, APP, True, NOW)
    second = await resolver.resolve(
        [(b"authorization", f"bearer {GOOD_TOKEN}".encode())], APP, True, NOW
    )
    assert first is second is bearer.identity
    assert bearer.verified == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("Bearer wrong.token.here", "token-bad-signature"),
        ("Bearer", "token-malformed"),
        ("Bearer ", "token-malformed"),
        ("Bearer a b", "token-malformed"),
        ("Bearer <script>", "token-malformed"),
        ("Bearer " + "a" * 20_000, "token-malformed"),
    ],
)
async def test_an_invalid_bearer_token_is_refused(
    sessions: SessionManager, value: str, code: str
) -> None:
    """A bad bearer token raises IdentityRejected with the verifier's code (401), even with a
    valid session cookie beside it."""
    cookie_id, _ = await sessions.create_main(Login(), "town", NOW)
    resolver = IdentityResolver(sessions, FakeBearer())
    with pytest.raises(IdentityRejected) as caught:
        await resolver.resolve(
            [(b"authorization", value.encode()), cookie(cookie_id)], P, True, NOW
        )
    assert caught.value.code == code
    assert caught.value.status == 401
    assert caught.value.www_authenticate == 'Bearer error="invalid_token"'


@pytest.mark.anyio
async def test_bearer_tokens_without_configured_issuers_are_refused(
    sessions: SessionManager,
) -> None:
    """With no bearer issuers configured, a bearer token is refused, not ignored."""
    resolver = IdentityResolver(sessions, None)
    with pytest.raises(IdentityRejected) as caught:
        await resolver.resolve([(b"authorization", f"Bearer {GOOD_TOKEN}".encode())], P, True, NOW)
    assert caught.value.code == "token-wrong-issuer"


@pytest.mark.anyio
async def test_two_authorization_headers_are_refused(sessions: SessionManager) -> None:
    """Several Authorization headers are ambiguous: refused."""
    resolver = IdentityResolver(sessions, FakeBearer())
    header = (b"authorization", f"Bearer {GOOD_TOKEN}".encode())
    with pytest.raises(IdentityRejected):
        await resolver.resolve([header, header], P, True, NOW)


@pytest.mark.anyio
async def test_other_authorization_schemes_are_left_to_the_upstream(
    sessions: SessionManager,
) -> None:
    """Basic (or any non-Bearer scheme) is ignored: the session cookie decides, or nobody."""
    cookie_id, _ = await sessions.create_main(Login(), "town", NOW)
    bearer = FakeBearer()
    resolver = IdentityResolver(sessions, bearer)
    basic = (b"authorization", b"Basic dXNlcjpwYXNz")
    identity = await resolver.resolve([basic, cookie(cookie_id)], P, True, NOW)
    assert identity is not None
    assert identity.method == "session"
    assert await resolver.resolve([basic], P, True, NOW) is None
    assert bearer.verified == 0


def test_cookie_values_reads_every_cookie_header() -> None:
    """Cookies are read from every Cookie header and every pair, by exact name."""
    headers = [
        (b"cookie", b"a=1; tabiji-session=x; b=2"),
        (b"cookie", b"tabiji-session=y"),
        (b"cookie", b"xtabiji-session=z; tabiji-sessionx=w"),
    ]
    assert cookie_values(headers, "tabiji-session") == ["x", "y"]


@pytest.mark.parametrize(
    "value", ["", "short", "has space aaaaaaaaaaaaaa", '"quoted-aaaaaaaaaaaaaaaaaa"']
)
def test_malformed_cookie_values_are_not_ours(value: str) -> None:
    """A value that cannot be one of our ids is treated as absent."""
    assert (
        single_cookie([(b"cookie", f"tabiji-session={value}".encode())], "tabiji-session") is None
    )
