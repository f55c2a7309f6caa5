"""The login, hand-off and logout endpoints through httpx's ASGITransport over https://, with an
in-test OpenID Provider (the real one is exercised end-to-end in tests/integration)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from test_sessions import Login

from gateway.identity.csrf import Csrf
from gateway.identity.routes import (
    PendingLogin,
    identity_routes,
    login_url,
    wants_login_json,
)
from gateway.identity.sessions import SessionManager
from gateway.pages import Pages
from gateway.state.base import StateUnavailable
from gateway.state.ratelimit import RateLimiter
from gateway.state.sqlite import SqliteStateStore
from gateway.web.catalogue import load_catalogue
from gateway.web.endpoints import build_internal_app

P = "https://login.example.test"
H = "https://app.example.test"
H2 = "https://wiki.example.test"
UNKNOWN = "https://unknown.example.test"
SESSION_COOKIE = "__Host-tabiji-session"
LOGIN_COOKIE = "__Host-tabiji-login"


class FakeOidcError(Exception):
    """Like oidc.OidcError: a stable code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Start:
    provider: str
    authorization_url: str
    state: str
    nonce: str
    code_verifier: str
    created: float


@dataclass(frozen=True, slots=True)
class LogoutToken:
    issuer: str
    subject: str | None
    sid: str | None
    jti: str
    issued_at: float
    expires_at: float


@dataclass
class FakeProvider:
    """An OpenID Provider in the test's memory: it issues codes for logins started with it and
    checks state, code, nonce and PKCE verifier the way the real client does."""

    provider_name: str
    issuer: str
    end_session: bool = True
    codes: dict[str, tuple[str, str, str, Login]] = field(default_factory=dict)
    begun: dict[str, tuple[str, str]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    logout_tokens: dict[str, LogoutToken] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.provider_name

    async def begin(self, now: float) -> Start:
        state, nonce, verifier = (secrets.token_urlsafe(16) for _ in range(3))
        self.begun[state] = (nonce, verifier)
        query = urlencode({"state": state, "client_id": "tabiji"})
        return Start(
            self.name, f"https://idp.test/{self.name}/auth?{query}", state, nonce, verifier, now
        )

    def authenticate(self, authorization_url: str, login: Login | None = None) -> str:
        """The user signs in at the IdP: the callback URL the IdP redirects the browser to."""
        state = parse_qs(urlsplit(authorization_url).query)["state"][0]
        nonce, verifier = self.begun[state]
        code = secrets.token_urlsafe(16)
        self.codes[code] = (state, nonce, verifier, login or Login(issuer=self.issuer))
        query = urlencode({"code": code, "state": state, "iss": self.issuer})
        return f"{P}/.tabiji/oidc/callback?{query}"

    async def finish(self, params: Mapping[str, str], expected: PendingLogin) -> Login:
        self.finished.append(expected.state)
        if params.get("state") != expected.state:
            raise FakeOidcError("oidc-state-invalid")
        if params.get("iss") not in (None, self.issuer):
            raise FakeOidcError("oidc-iss-mismatch")
        issued = self.codes.pop(params.get("code", ""), None)  # a code works once
        if issued is None:
            raise FakeOidcError("oidc-code-exchange-failed")
        state, nonce, verifier, login = issued
        if (state, nonce, verifier) != (expected.state, expected.nonce, expected.code_verifier):
            raise FakeOidcError("oidc-id-token-invalid")
        return login

    def end_session_url(
        self, id_token: str | None, post_logout_redirect_uri: str, state: str | None = None
    ) -> str | None:
        if not self.end_session:
            return None
        query = urlencode(
            {"id_token_hint": id_token or "", "post_logout_redirect_uri": post_logout_redirect_uri}
        )
        return f"https://idp.test/{self.name}/logout?{query}"

    def logout_token(self, *, sub: str | None = None, sid: str | None = None) -> str:
        token = secrets.token_urlsafe(24)
        now = time.time()
        self.logout_tokens[token] = LogoutToken(
            self.issuer, sub, sid, secrets.token_hex(8), now, now + 120
        )
        return token

    async def verify_logout_token(self, token: str) -> LogoutToken:
        found = self.logout_tokens.get(token)
        if found is None:
            raise FakeOidcError("oidc-logout-token-invalid")
        return found


class Clock:
    """A clock the test can move; real time unless set."""

    def __init__(self) -> None:
        self.fixed: float | None = None

    def __call__(self) -> float:
        return time.time() if self.fixed is None else self.fixed


@dataclass
class Env:
    client: httpx.AsyncClient
    sessions: SessionManager
    providers: dict[str, FakeProvider]
    audit: list[tuple[str, dict[str, object]]]
    clock: Clock
    app: Any
    routes: dict[str, tuple[str, tuple[str, ...]]]
    store: SqliteStateStore

    def new_client(self) -> httpx.AsyncClient:
        """Another browser: its own cookie jar."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=P)


ROUTES = {
    "app.example.test": ("app", ("town",)),
    "wiki.example.test": ("wiki", ("town", "partners")),
    "partners.example.test": ("partners", ("partners",)),
}


@contextlib.asynccontextmanager
async def make_env(
    tmp_path: Path,
    *,
    routes: dict[str, tuple[str, tuple[str, ...]]] | None = None,
    limiter: RateLimiter | None = None,
    public: str = P,
    providers: dict[str, Any] | None = None,
) -> AsyncIterator[Env]:
    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    public_host = urlsplit(public).netloc
    sessions = SessionManager(store, public_host=public_host, lifetime=3600, idle_timeout=1800)
    providers = providers or {
        "town": FakeProvider("town", "https://idp.test/town"),
        "partners": FakeProvider("partners", "https://idp.test/partners"),
    }
    audit: list[tuple[str, dict[str, object]]] = []
    clock = Clock()
    table = dict(ROUTES if routes is None else routes)

    def route_for(authority: str, path: str) -> tuple[str, tuple[str, ...]] | None:
        return table.get(authority)

    pages = Pages(load_catalogue())

    async def readiness() -> dict[str, Any]:
        return {"ready": True, "checks": {}}

    app = build_internal_app(
        pages=pages,
        readiness=readiness,
        extra_routes=identity_routes(
            sessions=sessions,
            providers=providers,
            public_origin=public,
            route_for=route_for,
            store=store,
            pages=pages,
            csrf=Csrf(b"s" * 32),
            limiter=limiter if limiter is not None else RateLimiter(10_000, 10_000),
            audit=lambda action, fields: audit.append((action, dict(fields))),
            clock=clock,
        ),
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=public)
    try:
        yield Env(client, sessions, providers, audit, clock, app, table, store)
    finally:
        await client.aclose()
        await sessions.drain()
        await store.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """The identity endpoints on a fresh SQLite store, P = login.example.test."""
    async with make_env(tmp_path) as made:
        yield made


def location(response: httpx.Response) -> str:
    assert response.status_code in (302, 303), (response.status_code, response.text[:300])
    return response.headers["location"]


def absolute(base: str, target: str) -> str:
    return target if "://" in target else base + target


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Set-Cookie headers of a response by cookie name (the whole header value)."""
    return {v.split("=", 1)[0]: v for v in response.headers.get_list("set-cookie")}


async def start_at(client: httpx.AsyncClient, host: str, rd: str = "/page") -> str:
    """GET host/.tabiji/login and authorize: the IdP URL the browser is sent to."""
    to_authorize = location(await client.get(f"{host}/.tabiji/login", params={"rd": rd}))
    to_start = absolute(P, location(await client.get(to_authorize)))
    return location(await client.get(to_start))


async def sign_in(
    env: Env,
    client: httpx.AsyncClient,
    host: str = H,
    rd: str = "/page",
    login: Login | None = None,
) -> str:
    """A whole login started at `host`: returns the final Location (on `host`)."""
    provider = env.providers["town"]
    idp = await start_at(client, host, rd)
    callback = provider.authenticate(idp, login)
    to_handoff = location(await client.get(callback))
    if host == P:
        return to_handoff
    assert to_handoff.startswith(f"{host}/.tabiji/handoff?code=")
    return location(await client.get(to_handoff))


# -- the whole flow -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_login_at_a_route_host_ends_with_a_host_session(env: Env) -> None:
    """login at H → authorize at P → IdP → callback at P → hand-off at H → back to the page,
    with a host-only session at H and a main session at P."""
    client = env.client
    first = await client.get(f"{H}/.tabiji/login", params={"rd": "/docs/a?b=1"})
    to_authorize = location(first)
    assert to_authorize.startswith(f"{P}/.tabiji/authorize?req=")
    binding = set_cookies(first)[LOGIN_COOKIE]
    for attribute in ("Path=/", "HttpOnly", "SameSite=Lax", "Secure", "Max-Age=600"):
        assert attribute in binding
    assert "domain" not in binding.lower()
    to_start = location(await client.get(to_authorize))
    assert to_start.startswith("/.tabiji/oidc/start?")
    idp = location(await client.get(absolute(P, to_start)))
    assert idp.startswith("https://idp.test/town/auth?")
    callback = await client.get(env.providers["town"].authenticate(idp))
    to_handoff = location(callback)
    assert to_handoff.startswith(f"{H}/.tabiji/handoff?code=")
    main_cookie = set_cookies(callback)[SESSION_COOKIE]
    for attribute in ("Path=/", "HttpOnly", "SameSite=Lax", "Secure"):
        assert attribute in main_cookie
    assert "domain" not in main_cookie.lower()
    assert "max-age" not in main_cookie.lower()  # a browser-session cookie
    handoff = await client.get(to_handoff)
    assert location(handoff) == "/docs/a?b=1"
    host_cookie = set_cookies(handoff)[SESSION_COOKIE].split(";")[0].split("=", 1)[1]
    identity = await env.sessions.lookup(host_cookie, "app.example.test", time.time())
    assert identity is not None
    assert identity.subject == "user-1"
    assert identity.provider == "town"
    assert await env.sessions.lookup(host_cookie, "login.example.test", time.time()) is None
    assert [a for a, _ in env.audit] == ["login-ok"]
    assert env.audit[0][1]["subject"] == "user-1"


@pytest.mark.anyio
async def test_a_second_host_gets_its_session_without_the_idp(env: Env) -> None:
    """With a live session at P, another route host is handed a session without a new login."""
    await sign_in(env, env.client)
    to_authorize = location(await env.client.get(f"{H2}/.tabiji/login", params={"rd": "/w"}))
    to_handoff = location(await env.client.get(to_authorize))
    assert to_handoff.startswith(f"{H2}/.tabiji/handoff?code=")
    assert location(await env.client.get(to_handoff)) == "/w"
    assert len(env.providers["town"].finished) == 1  # one login at the IdP in all


@pytest.mark.anyio
async def test_login_when_the_public_url_is_the_route_host(tmp_path: Path) -> None:
    """With P == H, the login comes back to the page on P directly (no hand-off)."""
    async with make_env(tmp_path, routes={"login.example.test": ("portal", ("town",))}) as env:
        assert await sign_in(env, env.client, host=P, rd="/portal/x") == "/portal/x"
        response = await env.client.get(f"{P}/.tabiji/")
        assert response.status_code == 200
        assert "Hanako@Town.example" in response.text


@pytest.mark.anyio
async def test_an_already_signed_in_host_is_not_sent_round_again(env: Env) -> None:
    """/.tabiji/login on a host where the browser has a session goes straight to the page."""
    await sign_in(env, env.client)
    response = await env.client.get(f"{H}/.tabiji/login", params={"rd": "/again"})
    assert location(response) == "/again"


@pytest.mark.anyio
async def test_several_providers_show_the_chooser(env: Env) -> None:
    """A route allowing two providers gets the chooser page with one link per provider."""
    to_authorize = location(await env.client.get(f"{H2}/.tabiji/login", params={"rd": "/"}))
    page = await env.client.get(to_authorize)
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'data-provider="town"' in page.text
    assert 'data-provider="partners"' in page.text
    req = parse_qs(urlsplit(to_authorize).query)["req"][0]
    assert f"/.tabiji/oidc/start?provider=partners&amp;req={req}" in page.text


@pytest.mark.anyio
async def test_a_provider_the_route_does_not_allow_is_refused(env: Env) -> None:
    """Starting a login with a provider not allowed for the route is refused (400)."""
    to_authorize = location(await env.client.get(f"{H}/.tabiji/login", params={"rd": "/"}))
    req = parse_qs(urlsplit(to_authorize).query)["req"][0]
    response = await env.client.get(
        f"{P}/.tabiji/oidc/start", params={"provider": "partners", "req": req}
    )
    assert response.status_code == 400
    assert "login-provider-unknown" in response.text
    response = await env.client.get(
        f"{P}/.tabiji/oidc/start", params={"provider": "nope", "req": req}
    )
    assert response.status_code == 400


@pytest.mark.anyio
async def test_a_new_login_replaces_the_old_session(env: Env) -> None:
    """Each login makes a new session id (no fixation) and ends the one it replaces: here a
    route that allows only another provider makes a town user log in again."""
    await sign_in(env, env.client)
    old = env.client.cookies.get(SESSION_COOKIE, domain="login.example.test")
    assert old
    idp = await start_at(env.client, "https://partners.example.test")
    assert idp.startswith("https://idp.test/partners/")
    await env.client.get(env.providers["partners"].authenticate(idp))
    new = env.client.cookies.get(SESSION_COOKIE, domain="login.example.test")
    assert new
    assert new != old
    assert await env.sessions.lookup(old, "login.example.test", time.time()) is None
    identity = await env.sessions.lookup(new, "login.example.test", time.time())
    assert identity is not None
    assert identity.provider == "partners"


# -- the callback's defences ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [
        {},
        {"code": "x"},
        {"code": "x", "state": ""},
        {"code": "x", "state": "never-issued"},
    ],
)
async def test_a_callback_without_a_known_state_is_refused(env: Env, query: dict[str, str]) -> None:
    """No state, an empty or an unknown one: 400 login-state-invalid, audited, no session."""
    response = await env.client.get(f"{P}/.tabiji/oidc/callback", params=query)
    assert response.status_code == 400
    assert "login-state-invalid" in response.text
    assert SESSION_COOKIE not in set_cookies(response)
    assert env.audit[-1][0] == "login-failed"


@pytest.mark.anyio
async def test_a_replayed_callback_is_refused(env: Env) -> None:
    """The same callback URL a second time finds its state taken: 400."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    assert (await env.client.get(callback)).status_code == 302
    again = await env.client.get(callback)
    assert again.status_code == 400
    assert "login-state-invalid" in again.text


@pytest.mark.anyio
async def test_repeated_callback_parameters_are_refused(env: Env) -> None:
    """Two `state` parameters are ambiguous: refused."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    state = parse_qs(urlsplit(callback).query)["state"][0]
    response = await env.client.get(callback + "&" + urlencode({"state": state}))
    assert response.status_code == 400


@pytest.mark.anyio
async def test_a_callback_in_another_browser_is_refused(env: Env) -> None:
    """Login CSRF: a callback URL opened in a browser that did not start the login (no or
    another binding cookie) is refused, and the state is burnt for everyone."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    async with env.new_client() as victim:
        response = await victim.get(callback)
        assert response.status_code == 400
        assert "login-binding-invalid" in response.text
        assert SESSION_COOKIE not in set_cookies(response)
    # The rightful browser cannot use it afterwards either: the state was taken.
    assert (await env.client.get(callback)).status_code == 400


@pytest.mark.anyio
async def test_a_callback_with_a_wrong_binding_cookie_is_refused(env: Env) -> None:
    """A binding cookie of another value fails like a missing one."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    env.client.cookies.set(LOGIN_COOKIE, secrets.token_urlsafe(32), domain="login.example.test")
    response = await env.client.get(callback)
    assert response.status_code == 400
    assert "login-binding-invalid" in response.text


@pytest.mark.anyio
async def test_the_state_decides_which_provider_checks_the_response(env: Env) -> None:
    """Mix-up defence: a response claiming another provider's issuer is checked by the provider
    the state names (which refuses it); the other provider is never asked."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    mixed = callback.replace(
        urlencode({"iss": "https://idp.test/town"}), urlencode({"iss": "https://idp.test/partners"})
    )
    response = await env.client.get(mixed)
    assert response.status_code == 400
    assert len(env.providers["town"].finished) == 1
    assert env.providers["partners"].finished == []
    assert env.audit[-1] == ("login-failed", env.audit[-1][1])
    assert env.audit[-1][1]["reason"] == "oidc-iss-mismatch"


@pytest.mark.anyio
async def test_a_failed_provider_check_shows_a_page_and_no_session(env: Env) -> None:
    """When the provider refuses the response (a replayed code), the page says so; no cookie."""
    idp = await start_at(env.client, H)
    callback = env.providers["town"].authenticate(idp)
    env.providers["town"].codes.clear()  # the code was already redeemed
    response = await env.client.get(callback, headers={"accept": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] in ("login-failed", "oidc-code-exchange-failed")
    assert SESSION_COOKIE not in set_cookies(response)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "/.tabiji/authorize?req=x",
        "/.tabiji/oidc/start?provider=town&req=x",
        "/.tabiji/oidc/callback?state=x",
    ],
)
async def test_the_login_steps_at_p_are_not_served_on_route_hosts(env: Env, path: str) -> None:
    """authorize, start and callback exist only on the public URL: 404 elsewhere."""
    assert (await env.client.get(H + path)).status_code == 404


@pytest.mark.anyio
async def test_unknown_or_expired_login_requests_are_refused(env: Env) -> None:
    """authorize and start with a request id nobody stored: 400 login-request-invalid."""
    for path in (
        "/.tabiji/authorize?req=nope",
        "/.tabiji/oidc/start?provider=town&req=nope",
        "/.tabiji/authorize",
    ):
        response = await env.client.get(P + path)
        assert response.status_code == 400
        assert "login-request-invalid" in response.text


@pytest.mark.anyio
async def test_login_on_a_host_that_is_no_route_is_refused(env: Env) -> None:
    """/.tabiji/login on a host the gateway does not publish: 400, nothing stored."""
    response = await env.client.get(f"{UNKNOWN}/.tabiji/login", params={"rd": "/"})
    assert response.status_code == 400
    assert "login-host-unknown" in response.text
    assert LOGIN_COOKIE not in set_cookies(response)


# -- the hand-off's defences ----------------------------------------------------------------------


async def handoff_url(env: Env, client: httpx.AsyncClient, host: str = H) -> str:
    idp = await start_at(client, host)
    return location(await client.get(env.providers["town"].authenticate(idp)))


@pytest.mark.anyio
async def test_a_handoff_code_works_once(env: Env) -> None:
    """The second use of a hand-off code is refused (400 handoff-invalid)."""
    url = await handoff_url(env, env.client)
    binding = env.client.cookies.get(LOGIN_COOKIE, domain="app.example.test")
    assert binding
    assert (await env.client.get(url)).status_code == 302
    env.client.cookies.set(LOGIN_COOKIE, binding, domain="app.example.test")  # even with it
    again = await env.client.get(url)
    assert again.status_code == 400
    assert "handoff-invalid" in again.text


@pytest.mark.anyio
async def test_a_handoff_code_for_another_host_is_refused(env: Env) -> None:
    """A code minted for H presented at H2 is refused (even with H's binding value copied to
    H2), and burnt for H too."""
    url = await handoff_url(env, env.client)
    code = parse_qs(urlsplit(url).query)["code"][0]
    binding = env.client.cookies.get(LOGIN_COOKIE, domain="app.example.test")
    assert binding
    env.client.cookies.set(LOGIN_COOKIE, binding, domain="wiki.example.test")
    wrong = await env.client.get(f"{H2}/.tabiji/handoff", params={"code": code})
    assert wrong.status_code == 400
    assert "handoff-invalid" in wrong.text
    assert SESSION_COOKIE not in set_cookies(wrong)
    assert (await env.client.get(url)).status_code == 400


@pytest.mark.anyio
async def test_a_handoff_in_another_browser_is_refused(env: Env) -> None:
    """A hand-off link opened by another browser (no H binding cookie) gives it no session."""
    url = await handoff_url(env, env.client)
    async with env.new_client() as other:
        response = await other.get(url)
    assert response.status_code == 400
    assert "login-binding-invalid" in response.text
    assert SESSION_COOKIE not in set_cookies(response)


@pytest.mark.anyio
@pytest.mark.parametrize("code", ["", "x", "A" * 500])
async def test_made_up_handoff_codes_are_refused(env: Env, code: str) -> None:
    """Empty, guessed or overlong codes: 400."""
    response = await env.client.get(f"{H}/.tabiji/handoff", params={"code": code})
    assert response.status_code == 400


@pytest.mark.anyio
async def test_a_handoff_for_an_ended_session_is_refused(env: Env) -> None:
    """If the P session ended between mint and redemption, no host session is made."""
    url = await handoff_url(env, env.client)
    main = env.client.cookies.get(SESSION_COOKIE, domain="login.example.test")
    assert main
    identity = await env.sessions.lookup(main, "login.example.test", time.time())
    assert identity is not None
    assert identity.session_hash is not None
    await env.sessions.revoke(identity.session_hash, "test")
    response = await env.client.get(url)
    assert response.status_code == 400
    assert SESSION_COOKIE not in set_cookies(response)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "/%2F%2Fevil.example",
        "https:evil.example",
        "javascript:alert(1)",
    ],
)
async def test_open_redirects_end_on_the_hosts_home(env: Env, rd: str) -> None:
    """A return-to address that is not a plain path on the host ends at "/" on that host."""
    assert await sign_in(env, env.client, rd=rd) == "/"


# -- rate limits ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_login_endpoints_are_rate_limited_per_client(tmp_path: Path) -> None:
    """Past the burst, login answers 429 with Retry-After (JSON for programs)."""
    async with make_env(tmp_path, limiter=RateLimiter(rate_per_minute=6, burst=2)) as env:
        env.clock.fixed = 1_000.0
        for _ in range(2):
            assert (await env.client.get(f"{H}/.tabiji/login")).status_code == 302
        limited = await env.client.get(f"{H}/.tabiji/login", headers={"accept": "application/json"})
        assert limited.status_code == 429
        assert limited.json()["error"] == "rate-limited"
        assert int(limited.headers["retry-after"]) == 10
        env.clock.fixed = 1_010.0  # a token again after 10 s
        assert (await env.client.get(f"{H}/.tabiji/login")).status_code == 302


@pytest.mark.anyio
async def test_callback_and_logout_are_rate_limited(tmp_path: Path) -> None:
    """The callback and the logout POST have their own buckets and answer 429 past them."""
    async with make_env(tmp_path, limiter=RateLimiter(rate_per_minute=1, burst=1)) as env:
        env.clock.fixed = 1_000.0
        assert (await env.client.get(f"{P}/.tabiji/oidc/callback")).status_code == 400
        assert (await env.client.get(f"{P}/.tabiji/oidc/callback")).status_code == 429
        assert (await env.client.post(f"{H}/.tabiji/logout")).status_code != 429
        assert (await env.client.post(f"{H}/.tabiji/logout")).status_code == 429


# -- logout ---------------------------------------------------------------------------------------


async def logout_form(env: Env, host: str = H) -> str:
    page = await env.client.get(f"{host}/.tabiji/logout")
    assert page.status_code == 200
    assert page.headers["referrer-policy"] == "same-origin"  # so the POST carries its Origin
    assert 'action="/.tabiji/logout"' in page.text
    return page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def host_cookie(env: Env, host: str = "app.example.test") -> str:
    value = env.client.cookies.get(SESSION_COOKIE, domain=host)
    assert value
    return value


@pytest.mark.anyio
async def test_logout_ends_every_host_and_logs_out_at_the_provider(env: Env) -> None:
    """POST logout with the form's token: the session ends on P and every host, the cookie is
    cleared, and the browser goes to the provider's end-session URL coming back to P."""
    await sign_in(env, env.client)
    main = env.client.cookies.get(SESSION_COOKIE, domain="login.example.test")
    app = host_cookie(env)
    token = await logout_form(env)
    response = await env.client.post(
        f"{H}/.tabiji/logout", data={"csrf": token}, headers={"origin": H}
    )
    assert response.status_code == 303
    target = urlsplit(response.headers["location"])
    assert target.netloc == "idp.test"
    query = parse_qs(target.query)
    assert query["post_logout_redirect_uri"] == [f"{P}/.tabiji/logged-out"]
    assert query["id_token_hint"] == ["id.token.1"]
    assert "Max-Age=0" in set_cookies(response)[SESSION_COOKIE]
    now = time.time()
    assert main
    assert await env.sessions.lookup(main, "login.example.test", now) is None
    assert await env.sessions.lookup(app, "app.example.test", now) is None
    assert env.audit[-1][0] == "logout"


@pytest.mark.anyio
async def test_logout_without_provider_logout_goes_to_the_logged_out_page(env: Env) -> None:
    """A provider without end_session: the browser goes to /.tabiji/logged-out."""
    env.providers["town"].end_session = False
    await sign_in(env, env.client)
    token = await logout_form(env)
    response = await env.client.post(
        f"{H}/.tabiji/logout", data={"csrf": token}, headers={"origin": H}
    )
    assert location(response) == "/.tabiji/logged-out"
    page = await env.client.get(f"{H}/.tabiji/logged-out")
    assert page.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({}, {"origin": H}),  # no token
        ({"csrf": "forged"}, {"origin": H}),  # a wrong token
        ({"csrf": "TOKEN"}, {"origin": "https://evil.example"}),  # the right token, from elsewhere
        ({"csrf": "TOKEN"}, {"origin": "null"}),
        ({"csrf": "TOKEN"}, {}),  # no Origin, no Referer
        ({"csrf": "TOKEN"}, {"origin": H, "sec-fetch-site": "cross-site"}),
        ({"csrf": "TOKEN"}, {"referer": "https://evil.example/page"}),
    ],
)
async def test_logout_needs_the_token_and_the_same_origin(
    env: Env, data: dict[str, str], headers: dict[str, str]
) -> None:
    """Logout CSRF: without the session's token and same-origin headers the POST is refused
    (403) and the session lives on."""
    await sign_in(env, env.client)
    token = await logout_form(env)
    data = {k: (token if v == "TOKEN" else v) for k, v in data.items()}
    response = await env.client.post(f"{H}/.tabiji/logout", data=data, headers=headers)
    assert response.status_code == 403
    assert "csrf-invalid" in response.text
    assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time()) is not None


@pytest.mark.anyio
async def test_a_token_from_another_session_does_not_log_out(env: Env) -> None:
    """The CSRF token is bound to the session: another user's valid token is refused."""
    async with env.new_client() as other:
        await sign_in(env, other, login=Login(subject="other"))
        page = await other.get(f"{H}/.tabiji/logout")
        foreign = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    await sign_in(env, env.client)
    response = await env.client.post(
        f"{H}/.tabiji/logout", data={"csrf": foreign}, headers={"origin": H}
    )
    assert response.status_code == 403


@pytest.mark.anyio
async def test_a_get_never_logs_out(env: Env) -> None:
    """GET /.tabiji/logout shows a confirmation; GET logged-out keeps a live session."""
    await sign_in(env, env.client)
    page = await env.client.get(f"{H}/.tabiji/logout")
    assert page.status_code == 200
    logged_out = await env.client.get(f"{H}/.tabiji/logged-out")
    assert SESSION_COOKIE not in set_cookies(logged_out)
    assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time()) is not None


@pytest.mark.anyio
async def test_logout_without_a_session_just_clears_the_cookie(env: Env) -> None:
    """POST logout with no live session: 303 to the logged-out page, the cookie cleared."""
    env.client.cookies.set(SESSION_COOKIE, secrets.token_urlsafe(32), domain="app.example.test")
    response = await env.client.post(
        f"{H}/.tabiji/logout", data={"csrf": "x"}, headers={"origin": H}
    )
    assert location(response) == "/.tabiji/logged-out"
    assert "Max-Age=0" in set_cookies(response)[SESSION_COOKIE]


# -- back-channel logout --------------------------------------------------------------------------

BCL = f"{P}/.tabiji/oidc/backchannel-logout/town"


@pytest.mark.anyio
async def test_backchannel_logout_by_sid_ends_those_sessions(env: Env) -> None:
    """A valid logout token with `sid` ends the sessions of that IdP session: 200, no-store."""
    await sign_in(env, env.client, login=Login(issuer="https://idp.test/town", sid="S1"))
    token = env.providers["town"].logout_token(sid="S1")
    response = await env.client.post(BCL, data={"logout_token": token})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time()) is None
    assert env.audit[-1][0] == "backchannel-logout"
    assert env.audit[-1][1]["ended"] == 1


@pytest.mark.anyio
async def test_backchannel_logout_by_sub_ends_the_users_sessions(env: Env) -> None:
    """A logout token with only `sub` ends every session of that user at that provider."""
    await sign_in(env, env.client, login=Login(issuer="https://idp.test/town", sid=None))
    token = env.providers["town"].logout_token(sub="user-1")
    assert (await env.client.post(BCL, data={"logout_token": token})).status_code == 200
    assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time()) is None


@pytest.mark.anyio
async def test_a_replayed_logout_token_is_refused(env: Env) -> None:
    """The same logout token (jti) a second time: 400 invalid_request."""
    token = env.providers["town"].logout_token(sid="S1")
    assert (await env.client.post(BCL, data={"logout_token": token})).status_code == 200
    again = await env.client.post(BCL, data={"logout_token": token})
    assert again.status_code == 400
    assert again.json() == {"error": "invalid_request"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        (BCL, {"data": {"logout_token": "forged"}}),  # does not verify
        (BCL, {"data": {}}),  # no token
        (BCL, {"data": {"logout_token": ""}}),
        (BCL, {"content": b"logout_token=x", "headers": {"content-type": "text/plain"}}),
        (
            BCL,
            {
                "content": b"logout_token=a&logout_token=b",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
        ),
        (f"{P}/.tabiji/oidc/backchannel-logout/nobody", {"data": {"logout_token": "VALID"}}),
        (f"{H}/.tabiji/oidc/backchannel-logout/town", {"data": {"logout_token": "VALID"}}),
    ],
)
async def test_backchannel_logout_refuses_anything_invalid(
    env: Env, url: str, kwargs: dict[str, Any]
) -> None:
    """Bad token, no token, wrong content type, unknown provider, wrong host: 400 JSON, no-store,
    and no session ends."""
    await sign_in(env, env.client, login=Login(issuer="https://idp.test/town", sid="S1"))
    if kwargs.get("data", {}).get("logout_token") == "VALID":
        kwargs = {"data": {"logout_token": env.providers["town"].logout_token(sid="S1")}}
    response = await env.client.post(url, **kwargs)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request"}
    assert response.headers["cache-control"] == "no-store"
    assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time()) is not None


# -- the signed-in page and helpers ---------------------------------------------------------------


@pytest.mark.anyio
async def test_the_signed_in_page_shows_who_and_a_logout_form(env: Env) -> None:
    """/.tabiji/ shows the user, groups, MFA methods and expiry, with a CSRF-protected form."""
    await sign_in(env, env.client)
    page = await env.client.get(f"{H}/.tabiji/", headers={"accept-language": "en"})
    assert page.status_code == 200
    assert "You are signed in" in page.text
    assert "Hanako@Town.example" in page.text
    assert "<li>staff</li>" in page.text
    assert "<li>otp</li>" in page.text
    assert 'name="csrf"' in page.text
    assert "JST" in page.text


@pytest.mark.anyio
async def test_the_signed_in_page_sends_strangers_to_login(env: Env) -> None:
    """Without a session, /.tabiji/ redirects to this host's login, returning to /.tabiji/."""
    response = await env.client.get(f"{H}/.tabiji/")
    assert location(response) == login_url(H, "/.tabiji/")


@pytest.mark.anyio
async def test_plain_http_uses_the_unprefixed_cookie_names(tmp_path: Path) -> None:
    """On the loopback HTTP demo the cookies are `tabiji-session` / `tabiji-login`, not Secure."""
    public = "http://127.0.0.1:8000"
    routes = {"127.0.0.1:8000": ("demo", ("town",))}
    async with make_env(tmp_path, routes=routes, public=public) as env:
        first = await env.client.get(f"{public}/.tabiji/login", params={"rd": "/x"})
        binding = set_cookies(first)["tabiji-login"]
        assert "Secure" not in binding
        to_start = location(await env.client.get(location(first)))
        idp = location(await env.client.get(absolute(public, to_start)))
        callback = env.providers["town"].authenticate(idp).replace(P, public)
        done = await env.client.get(callback)
        assert location(done) == "/x"
        session = set_cookies(done)["tabiji-session"]
        assert "Secure" not in session
        assert "HttpOnly" in session


def test_login_url_encodes_the_return_path() -> None:
    """login_url puts the return path in `rd`, fully encoded."""
    assert login_url(H, "/a b?c=d&e") == f"{H}/.tabiji/login?rd=%2Fa%20b%3Fc%3Dd%26e"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"sec-fetch-mode", b"navigate"), (b"accept", b"text/html")], False),
        ([(b"sec-fetch-mode", b"cors")], True),
        ([(b"sec-fetch-mode", b"no-cors")], True),
        ([(b"accept", b"application/json")], True),
        ([(b"x-requested-with", b"XMLHttpRequest")], True),
        ([(b"accept", b"text/html,application/xhtml+xml")], False),
        ([], False),
    ],
)
def test_which_requests_get_401_json(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    """Only top-level navigations are redirected to login; fetch/XHR/JSON clients get 401 JSON."""
    assert wants_login_json(headers) is expected


# -- with the real OIDC client and the real test OpenID Provider ---------------------------------


@pytest.fixture(scope="module")
def real_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """npm oidc-provider over TLS with a client registered for these endpoints' callback, logout
    page and a receiver for its back-channel logout tokens."""
    from tests.integration import idp_fixture

    idp_fixture.idp_available()
    ca = idp_fixture.make_ca(tmp_path_factory.mktemp("routes-ca"))
    receiver = idp_fixture.start_logout_receiver(ca, tmp_path_factory.mktemp("routes-bcl"))
    client = idp_fixture.IdpClient(
        "tabiji",
        idp_fixture.CLIENT_SECRET,
        redirect_uris=(f"{P}/.tabiji/oidc/callback",),
        post_logout_redirect_uris=(f"{P}/.tabiji/logged-out",),
        backchannel_logout_uri=receiver.url,
    )
    idp = idp_fixture.start_idp(tmp_path_factory.mktemp("routes-idp"), ca, clients=(client,))
    try:
        yield idp, receiver
    finally:
        idp.stop()
        receiver.stop()


@pytest.mark.integration
@pytest.mark.anyio
async def test_with_the_real_provider_login_logout_and_backchannel_logout(
    real_idp: tuple[Any, Any], tmp_path: Path
) -> None:
    """Through the real OIDC client and provider: login at H ends with a host session; RP-initiated
    logout comes back to P's logged-out page; the provider's back-channel logout token ends the
    next session, and the same token again is refused."""
    from gateway.identity.oidc import OidcProvider, ProviderConfig
    from tests.integration.idp_fixture import CLIENT_SECRET, login_with_httpx, logout_with_httpx

    idp, receiver = real_idp
    provider = OidcProvider(
        ProviderConfig(
            name="town",
            issuer=idp.issuer,
            client_id="tabiji",
            client_secret=CLIENT_SECRET,
            redirect_uri=f"{P}/.tabiji/oidc/callback",
            ca_bundle=idp.ca_path,
        )
    )
    user = idp.user("suzuki")
    try:
        async with make_env(tmp_path, providers={"town": provider}) as env:
            with idp.http_client() as browser:
                # 1. login at a route host, through the provider's real login page
                idp_url = await start_at(env.client, H, "/x")
                callback = login_with_httpx(browser, idp_url, user.username, user.password)
                to_handoff = location(await env.client.get(callback))
                assert location(await env.client.get(to_handoff)) == "/x"
                identity = await env.sessions.lookup(
                    host_cookie(env), "app.example.test", time.time()
                )
                assert identity is not None
                assert (identity.issuer, identity.subject) == (idp.issuer, user.sub)
                assert identity.email == user.email
                # 2. RP-initiated logout: to the provider, and back to P's logged-out page
                token = await logout_form(env)
                out = await env.client.post(
                    f"{H}/.tabiji/logout", data={"csrf": token}, headers={"origin": H}
                )
                assert out.status_code == 303
                assert out.headers["location"].startswith(idp.issuer)
                assert logout_with_httpx(browser, out.headers["location"]).startswith(
                    f"{P}/.tabiji/logged-out"
                )
                # 3. back-channel logout ends a new session
                idp_url = await start_at(env.client, H, "/y")
                callback = login_with_httpx(browser, idp_url, user.username, user.password)
                await env.client.get(location(await env.client.get(callback)))
                assert await env.sessions.lookup(host_cookie(env), "app.example.test", time.time())
                seen = len(receiver.tokens)
                idp.admin_logout(user.sub, notify=True)
                logout_token = receiver.wait_for(seen + 1)[-1]
                bcl = f"{P}/.tabiji/oidc/backchannel-logout/town"
                ok = await env.client.post(bcl, data={"logout_token": logout_token})
                assert ok.status_code == 200
                assert (
                    await env.sessions.lookup(host_cookie(env), "app.example.test", time.time())
                    is None
                )
                again = await env.client.post(bcl, data={"logout_token": logout_token})
                assert again.status_code == 400
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_the_pipelines_peer_decides_scheme_host_and_client(tmp_path: Path) -> None:
    """Behind a TLS-terminating trusted proxy the socket is plain HTTP: the endpoints take the
    scheme, host and client IP from the pipeline's Peer (scope "tabiji.peer"), so the cookies
    are the HTTPS ones and rate limits count the real client."""
    from factories import make_peer

    async with make_env(tmp_path, limiter=RateLimiter(rate_per_minute=1, burst=1)) as env:
        env.clock.fixed = 1_000.0
        client_ip = {"value": "198.51.100.1"}

        async def behind_proxy(scope: Any, receive: Any, send: Any) -> None:
            peer = make_peer(
                client_ip["value"], authority="app.example.test", via_trusted_proxy=True
            )
            await env.app({**scope, "tabiji.peer": peer}, receive, send)

        transport = httpx.ASGITransport(app=behind_proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://10.0.0.5:8080") as proxy:
            first = await proxy.get("/.tabiji/login", params={"rd": "/x"})
            assert location(first).startswith(f"{P}/.tabiji/authorize?req=")
            assert "Secure" in set_cookies(first)[LOGIN_COOKIE]
            assert (await proxy.get("/.tabiji/login")).status_code == 429  # same client
            client_ip["value"] = "198.51.100.2"
            assert (await proxy.get("/.tabiji/login")).status_code == 302  # another client


# -- the state store down ---------------------------------------------------------------------

STORE_METHODS = (
    "get",
    "put",
    "put_new",
    "take",
    "delete",
    "index_add",
    "index_members",
    "index_remove",
    "publish",
    "read_since",
)


def store_down(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every store call fails as an unreachable Redis does (StateUnavailable)."""

    async def unavailable(*args: object, **kwargs: object) -> None:
        raise StateUnavailable("the test store is down")

    for name in STORE_METHODS:
        monkeypatch.setattr(env.store, name, unavailable)


@pytest.mark.anyio
@pytest.mark.parametrize("language", ["ja", "en"])
async def test_without_the_store_a_login_gets_a_page_not_a_500(
    env: Env, monkeypatch: pytest.MonkeyPatch, language: str
) -> None:
    """A login that cannot store its single-use values stops with the 503 login-unavailable
    page in the reader's language first (the other one beside it), and sets no cookie."""
    store_down(env, monkeypatch)
    response = await env.client.get(
        f"{H}/.tabiji/login", params={"rd": "/x"}, headers={"accept-language": language}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "10"
    assert response.headers["content-language"] == language
    assert "ログインを一時的に受け付けられません" in response.text
    assert "Signing in is unavailable for the moment" in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
async def test_without_the_store_programs_get_the_code_as_json(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program asking for JSON gets the stable code, not a page."""
    store_down(env, monkeypatch)
    response = await env.client.get(
        f"{P}/.tabiji/authorize", params={"req": "x"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 503
    assert response.json()["error"] == "login-unavailable"


@pytest.mark.anyio
async def test_without_the_store_a_handoff_code_is_refused(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-off code that cannot be taken (single use unprovable) gives no host session."""
    to_handoff = await handoff_url(env, env.client)
    store_down(env, monkeypatch)
    response = await env.client.get(to_handoff)
    assert response.status_code == 503
    assert SESSION_COOKIE not in set_cookies(response)
    assert "ログインを一時的に受け付けられません" in response.text


@pytest.mark.anyio
async def test_without_the_store_logout_says_it_did_not_happen(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logout that cannot end the session says so (503 logout-unavailable) and keeps the
    cookie, rather than showing "signed out" while the session lives on."""
    await sign_in(env, env.client)
    token = await logout_form(env)
    store_down(env, monkeypatch)
    response = await env.client.post(
        f"{H}/.tabiji/logout", data={"csrf": token}, headers={"origin": H}
    )
    assert response.status_code == 503
    assert "ログアウトを完了できませんでした" in response.text
    assert "Signing out could not be completed" in response.text
    assert SESSION_COOKIE not in set_cookies(response)


@pytest.mark.anyio
async def test_without_the_store_backchannel_logout_asks_for_a_retry(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's logout call gets a JSON 503 (temporarily_unavailable), not a 500 page."""
    token = env.providers["town"].logout_token(sid="S1")
    store_down(env, monkeypatch)
    response = await env.client.post(BCL, data={"logout_token": token})
    assert response.status_code == 503
    assert response.json() == {"error": "temporarily_unavailable"}
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.anyio
async def test_a_store_error_escaping_any_own_page_is_its_page_not_a_500() -> None:
    """An endpoint that resolves its viewer while the store is down (the auditors' view, the
    device admin) ends in the error's own page and status, not Starlette's bare 500."""
    from starlette.routing import Route

    async def guarded_page(request: Any) -> Any:
        raise StateUnavailable("the test store is down")

    async def readiness() -> dict[str, Any]:
        return {"ready": True, "checks": {}}

    app = build_internal_app(
        pages=Pages(load_catalogue()),
        readiness=readiness,
        extra_routes=[Route("/.tabiji/audit", guarded_page)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=P) as client:
        response = await client.get("/.tabiji/audit", headers={"accept-language": "en"})
    assert response.status_code == 503
    assert "Your sign-in could not be checked" in response.text
    assert "ログイン情報を確認できませんでした" in response.text
    assert response.headers["x-frame-options"] == "DENY"
