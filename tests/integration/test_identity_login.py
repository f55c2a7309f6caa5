"""End-to-end login through the gateway over TLS with the real test OpenID Provider, scripted with
httpx: hand-off to a second host, cookie attributes, the assertion, SPA 401s, and the attacks."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import quote, urlencode, urljoin

import httpx
import pytest

from .conftest import Upstream, route
from .identity_env import Hop, IdentityEnv, echo_of, header_of, identity_env, query_of
from .idp_fixture import Idp, login_with_httpx

pytestmark = pytest.mark.integration

SESSION = "__Host-tabiji-session"


@pytest.fixture(scope="module")
def env(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityEnv]:
    """One provider and one gateway (SQLite store) for the module."""
    with identity_env(tmp_path_factory.mktemp("idlogin"), upstream) as running:
        yield running


@pytest.fixture(scope="module")
def tanaka(env: IdentityEnv) -> Iterator[tuple[httpx.Client, list[Hop]]]:
    """A browser in which tanaka (password + OTP) logged in at H, with the journey's hops."""
    hops: list[Hop] = []
    with env.client() as client:
        response = env.login(client, env.h + "/hello?x=1", "tanaka", hops=hops)
        assert response.status_code == 200, response.text[:300]
        yield client, hops


def _session_cookies(hops: list[Hop], origin: str) -> list[SimpleCookie]:
    found = []
    for hop in hops:
        if not hop.url.startswith(origin + "/"):
            continue
        for raw in hop.set_cookies:
            if raw.startswith(SESSION + "="):
                cookie: SimpleCookie = SimpleCookie()
                cookie.load(raw)
                found.append(cookie)
    return found


def _jar_value(client: httpx.Client, host: str) -> str | None:
    for cookie in client.cookies.jar:
        if cookie.name == SESSION and cookie.domain.split(".local")[0] == host:
            return cookie.value
    return None


def _handoff_url(env: IdentityEnv, client: httpx.Client, start: str, user: str) -> str:
    """Log in, and stop at P's redirect to H's hand-off (not followed)."""
    callback = env.callback_url(client, start, user)
    response = client.get(callback)
    assert response.status_code == 302, response.text[:300]
    location = urljoin(str(response.url), response.headers["location"])
    assert "/.tabiji/handoff?code=" in location
    return location


# -- the journey ------------------------------------------------------------------------------


def test_login_at_a_route_host_goes_through_p_and_hands_off(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """H → H login → P authorize → provider → P callback → H hand-off → the page asked for."""
    _, hops = tanaka
    urls = [hop.url.split("?")[0] for hop in hops]
    assert urls[0] == env.h + "/hello"
    assert env.h + "/.tabiji/login" in urls
    assert env.p + "/.tabiji/authorize" in urls
    assert env.p + "/.tabiji/oidc/callback" in urls
    handoff = urls.index(env.h + "/.tabiji/handoff")
    assert hops[handoff].location == "/hello?x=1"
    assert hops[-1].url == env.h + "/hello?x=1"
    assert hops[-1].status == 200


def test_session_cookies_are_host_only_secure_httponly_lax(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """P and H each get `__Host-tabiji-session`: Secure, HttpOnly, SameSite=Lax, Path=/, no
    Domain, no Max-Age (a browser-session cookie), and different opaque values."""
    _, hops = tanaka
    at_p = _session_cookies(hops, env.p)
    at_h = _session_cookies(hops, env.h)
    assert len(at_p) == 1
    assert len(at_h) == 1
    values = []
    for jar in (at_p[0], at_h[0]):
        morsel = jar[SESSION]
        assert morsel["secure"] is True
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Lax"
        assert morsel["path"] == "/"
        assert morsel["domain"] == ""
        assert len(morsel.value) >= 32
        values.append(morsel.value)
    assert values[0] != values[1]


def test_upstream_receives_a_verifiable_assertion(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """The upstream gets X-Tabiji-Assertion: ES256, verified with P's JWKS, iss = P, aud = the
    route's origin, tanaka's sub, groups and amr, and exp at most 5 minutes after iat."""
    client, _ = tanaka
    echo = echo_of(client.get(env.h + "/echo"))
    tokens = header_of(echo, "x-tabiji-assertion")
    assert len(tokens) == 1
    claims = env.verify_assertion(tokens[0], audience=env.h)
    assert claims["iss"] == env.p
    assert claims["aud"] == env.h
    assert claims["sub"] == "u-0001-tanaka"
    assert claims["email"] == "tanaka@town.example.jp"
    assert set(claims["groups"]) == {"staff", "juminka"}
    assert "otp" in claims["amr"]
    assert claims["sid"]
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert env.idp is not None
    assert claims["idp"] == env.idp.issuer


def test_assertion_for_another_audience_is_refused_by_the_verifier(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """An assertion minted for H does not verify for another origin (aud is bound)."""
    import jwt

    client, _ = tanaka
    token = header_of(echo_of(client.get(env.h + "/echo")), "x-tabiji-assertion")[0]
    with pytest.raises(jwt.InvalidAudienceError):
        env.verify_assertion(token, audience=env.p)


def test_client_supplied_assertion_never_reaches_the_upstream(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """A forged X-Tabiji-Assertion from the client is dropped; only the gateway's one arrives."""
    client, _ = tanaka
    echo = echo_of(client.get(env.h + "/echo", headers={"X-Tabiji-Assertion": "forged.x.y"}))
    tokens = header_of(echo, "x-tabiji-assertion")
    assert tokens != ["forged.x.y"]
    assert len(tokens) == 1
    assert env.verify_assertion(tokens[0], audience=env.h)["sub"] == "u-0001-tanaka"


def test_second_host_login_reuses_the_p_session_without_the_provider(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """Single sign-on: with a P session, a route on P opens straight away (no new login)."""
    client, _ = tanaka
    response, away = env.follow(client, env.p + "/papp/x")
    assert away is None
    echo = echo_of(response)
    claims = env.verify_assertion(header_of(echo, "x-tabiji-assertion")[0], audience=env.p)
    assert claims["sub"] == "u-0001-tanaka"


# -- no session: navigation vs. fetch ---------------------------------------------------------


def test_navigation_without_session_is_redirected_to_login(env: IdentityEnv) -> None:
    """A top-level navigation without a session gets 302 to this host's login with rd=."""
    with env.client() as client:
        response = client.get(env.h + "/app/page?q=1", headers={"Sec-Fetch-Mode": "navigate"})
    assert response.status_code == 302
    assert response.headers["location"] == (
        env.h + "/.tabiji/login?rd=" + quote("/app/page?q=1", safe="")
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Mode": "cors"},
        {"Accept": "application/json"},
        {"X-Requested-With": "XMLHttpRequest"},
    ],
)
def test_non_navigation_without_session_gets_401_json(
    env: IdentityEnv, headers: dict[str, str]
) -> None:
    """fetch / XHR / JSON clients get 401 JSON carrying the login URL, never a redirect."""
    with env.client() as client:
        response = client.get(env.h + "/api/items", headers=headers)
    assert response.status_code == 401
    assert "location" not in response.headers
    body = response.json()
    assert body["login_url"] == env.h + "/.tabiji/login?rd=" + quote("/api/items", safe="")


# -- return-to ----------------------------------------------------------------------------------

OPEN_REDIRECTS = [
    "//evil.example",
    "/\\evil.example",
    "https:evil.example",
    "https://evil.example/x",
    "/%2F%2Fevil.example",
    "/%5Cevil.example",
    "/\t/evil.example",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("rd", OPEN_REDIRECTS)
def test_open_redirect_attempts_end_on_the_default_page(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]], rd: str
) -> None:
    """A signed-in browser sent to /.tabiji/login?rd=<elsewhere> lands on "/" of this host."""
    client, _ = tanaka
    response = client.get(env.h + "/.tabiji/login?" + urlencode({"rd": rd}))
    assert response.status_code == 302
    assert response.headers["location"] == "/"


def test_open_redirect_through_a_full_login_ends_on_the_default_page(env: IdentityEnv) -> None:
    """After a whole login started with rd=//evil.example, the hand-off sends the browser to "/"."""
    hops: list[Hop] = []
    with env.client() as client:
        url = env.h + "/.tabiji/login?" + urlencode({"rd": "//evil.example/steal"})
        final = env.login(client, url, "suzuki", hops=hops)
    assert final.status_code == 200
    handoff = next(hop for hop in hops if "/.tabiji/handoff" in hop.url)
    assert handoff.location == "/"
    assert all("evil.example" not in (hop.location or "") for hop in hops[1:])


# -- state, callback, hand-off ----------------------------------------------------------------


def test_callback_with_wrong_or_missing_state_is_refused(env: IdentityEnv) -> None:
    """A callback whose state is missing or not the one this gateway issued: 400."""
    with env.client() as client:
        callback = env.callback_url(client, env.h + "/s", "suzuki")
        params = query_of(callback)
        base = callback.split("?")[0]
        wrong = client.get(base + "?" + urlencode({**params, "state": "not-the-state"}))
        missing = client.get(
            base + "?" + urlencode({k: v for k, v in params.items() if k != "state"})
        )
        # The genuine one still works afterwards: the wrong ones burnt nothing.
        good = client.get(callback)
    assert wrong.status_code == 400
    assert missing.status_code == 400
    assert "login-state-invalid" in wrong.text
    assert good.status_code == 302


def test_replayed_callback_is_refused(env: IdentityEnv) -> None:
    """The same callback URL (state + code) works once; the replay gets 400 and no cookie."""
    with env.client() as client:
        callback = env.callback_url(client, env.h + "/r", "suzuki")
        first = client.get(callback)
        second = client.get(callback)
    assert first.status_code == 302
    assert second.status_code == 400
    assert "login-state-invalid" in second.text
    assert not any(c.startswith(SESSION + "=") for c in second.headers.get_list("set-cookie"))


def test_callback_in_another_browser_is_refused(env: IdentityEnv) -> None:
    """Login CSRF: a callback delivered to a browser that did not start the login: 400."""
    with env.client() as victim_side, env.client() as other:
        callback = env.callback_url(victim_side, env.h + "/c", "suzuki")
        response = other.get(callback)
    assert response.status_code == 400
    assert "login-binding-invalid" in response.text


def test_handoff_code_works_once(env: IdentityEnv) -> None:
    """The hand-off code is single-use: the second presentation gets 400 handoff-invalid."""
    with env.client() as client:
        handoff = _handoff_url(env, client, env.h + "/once", "suzuki")
        first = client.get(handoff)
        client.cookies.delete(SESSION, domain="localhost.local")
        second = client.get(handoff)
    assert first.status_code == 302
    assert first.headers["location"] == "/once"
    assert second.status_code == 400
    assert "handoff-invalid" in second.text


def test_handoff_code_at_another_host_is_refused_and_burnt(env: IdentityEnv) -> None:
    """A code minted for H presented at P is refused, and is then useless at H too."""
    with env.client() as client:
        handoff = _handoff_url(env, client, env.h + "/moved", "suzuki")
        at_p = client.get(handoff.replace(env.h, env.p))
        at_h = client.get(handoff)
    assert at_p.status_code == 400
    assert "handoff-invalid" in at_p.text
    assert at_h.status_code == 400


def test_handoff_code_in_another_browser_is_refused(env: IdentityEnv) -> None:
    """A code is bound to the browser that started at H: anyone else gets 400."""
    with env.client() as client, env.client() as thief:
        handoff = _handoff_url(env, client, env.h + "/bound", "suzuki")
        response = thief.get(handoff)
    assert response.status_code == 400
    assert not any(c.startswith(SESSION + "=") for c in response.headers.get_list("set-cookie"))


# -- cookies ------------------------------------------------------------------------------------


def test_cookie_of_one_host_is_refused_at_another(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """H's session cookie presented at P (and P's at H) is no session there."""
    client, _ = tanaka
    h_cookie = _jar_value(client, "localhost")
    p_cookie = _jar_value(client, "127.0.0.1")
    assert h_cookie is not None
    assert p_cookie is not None
    with env.client() as other:
        at_p = other.get(env.p + "/papp/x", headers={"cookie": f"{SESSION}={h_cookie}"})
        at_h = other.get(env.h + "/x", headers={"cookie": f"{SESSION}={p_cookie}"})
        genuine = other.get(env.h + "/x", headers={"cookie": f"{SESSION}={h_cookie}"})
    assert at_p.status_code == 302
    assert "/.tabiji/login" in at_p.headers["location"]
    assert at_h.status_code == 302
    assert genuine.status_code == 200


def test_unknown_or_planted_cookie_is_no_session_and_login_gives_a_new_id(
    env: IdentityEnv,
) -> None:
    """A planted session id (fixation) is ignored; the login issues fresh ids for P and H."""
    planted = "fixated-session-id-AAAAAAAAAAAAAAAAAAAAAAAA"
    with env.client() as client:
        client.cookies.set(SESSION, planted, domain="localhost.local", path="/")
        client.cookies.set(SESSION, planted, domain="127.0.0.1", path="/")
        refused = client.get(env.h + "/x")
        assert refused.status_code == 302
        hops: list[Hop] = []
        final = env.login(client, env.h + "/x", "suzuki", hops=hops)
        assert final.status_code == 200
        issued = [c[SESSION].value for c in _session_cookies(hops, env.h)]
        issued += [c[SESSION].value for c in _session_cookies(hops, env.p)]
    assert len(issued) == 2
    assert planted not in issued


def test_every_login_gets_a_new_session_id(env: IdentityEnv) -> None:
    """Logging in again creates new P and H session ids, and the session the browser still
    presented at the callback is ended (no fixation, no two live sessions in one browser)."""
    with env.client() as client:
        env.login(client, env.h + "/a", "suzuki")
        old_h = _jar_value(client, "localhost")
        old_p = _jar_value(client, "127.0.0.1")
        assert old_h is not None
        assert old_p is not None
        # Forget both gateway cookies so the login goes to the provider again (whose own
        # session skips its login form), then present the old P cookie at the callback.
        client.cookies.delete(SESSION, domain="localhost.local")
        client.cookies.delete(SESSION, domain="127.0.0.1")
        authorize = env.start_login(client, env.h + "/b")
        client.cookies.set(SESSION, old_p, domain="127.0.0.1", path="/")
        assert env.idp is not None
        person = env.idp.user("suzuki")
        callback = login_with_httpx(client, authorize, person.username, person.password)
        final, _ = env.follow(client, callback)
        assert final.status_code == 200
        new_h = _jar_value(client, "localhost")
        new_p = _jar_value(client, "127.0.0.1")
    assert new_p not in (None, old_p)
    assert new_h not in (None, old_h)
    with env.client() as other:
        stale = other.get(env.h + "/x", headers={"cookie": f"{SESSION}={old_h}"})
    assert stale.status_code == 302


# -- what the policy sees ------------------------------------------------------------------------


def _reasons(client: httpx.Client, url: str) -> tuple[int, list[str]]:
    response = client.get(url, headers={"Accept": "application/json"})
    reasons: list[str] = response.json().get("reasons", []) if response.status_code != 200 else []
    return response.status_code, reasons


def test_unverified_email_is_refused_where_the_policy_needs_one(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """sato (email_verified false) is refused with email-unverified; tanaka (verified) is let in."""
    with env.client() as client:
        final = env.login(client, env.h + "/verified/doc", "sato")
        assert final.status_code == 403
        status, reasons = _reasons(client, env.h + "/verified/doc")
        # The same person is signed in: a route needing only a session lets sato in.
        assert client.get(env.h + "/other").status_code == 200
    assert status == 403
    assert "email-unverified" in reasons
    assert tanaka[0].get(env.h + "/verified/doc").status_code == 200


def test_mfa_policy_refuses_a_password_only_login(env: IdentityEnv) -> None:
    """suzuki (password only) is refused on the MFA route with reason mfa-required."""
    with env.client() as client:
        final = env.login(client, env.h + "/mfa/records", "suzuki")
        assert final.status_code == 403
        status, reasons = _reasons(client, env.h + "/mfa/records")
    assert status == 403
    assert "mfa-required" in reasons


def test_mfa_policy_admits_an_otp_login(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """tanaka, who logged in with password and OTP (amr pwd+otp), reaches the MFA route."""
    response = tanaka[0].get(env.h + "/mfa/records")
    assert echo_of(response)["path"] == "/mfa/records"


def test_mfa_capable_user_without_the_second_factor_is_refused(env: IdentityEnv) -> None:
    """tanaka logging in with the password only gets mfa-required: the fact is per login."""
    with env.client() as client:
        final = env.login(client, env.h + "/mfa/records", "tanaka", otp=False)
        assert final.status_code == 403
        _, reasons = _reasons(client, env.h + "/mfa/records")
    assert "mfa-required" in reasons


def test_upstream_does_not_receive_the_session_cookie(
    env: IdentityEnv, tanaka: tuple[httpx.Client, list[Hop]]
) -> None:
    """The gateway's session cookie is its own: the upstream never sees it (or could replay it)."""
    client, _ = tanaka
    client.cookies.set("app", "1", domain="localhost.local", path="/")
    echo = echo_of(client.get(env.h + "/echo"))
    cookies = " ".join(header_of(echo, "cookie"))
    assert "app=1" in cookies  # the application's own cookies still arrive
    assert SESSION not in cookies
    assert "tabiji-login" not in cookies


# -- several providers -----------------------------------------------------------------------------


def _multi_routes(port: int, upstream_port: int) -> list[dict[str, Any]]:
    """H: /staff (town only), /vendor (contractors only), / (either: the chooser)."""
    h = f"https://localhost:{port}"
    up = f"http://127.0.0.1:{upstream_port}"
    return [
        route("staff", h + "/staff", up, policy="signed-in", providers=["town"]),
        route("vendor", h + "/vendor", up, policy="signed-in", providers=["contractors"]),
        route("either", h, up, policy="signed-in"),
    ]


@pytest.fixture(scope="module")
def multi(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityEnv]:
    """A gateway with two independent providers, `town` (A) and `contractors` (B)."""
    with identity_env(
        tmp_path_factory.mktemp("idmulti"), upstream, second_provider=True, routes=_multi_routes
    ) as running:
        yield running


def _idp_b(env: IdentityEnv) -> Idp:
    provider = env.extra["idp_b"]
    assert isinstance(provider, Idp)
    return provider


def _choices(page: str) -> dict[str, str]:
    """provider name → start link, from the chooser page."""
    found = re.findall(r'<a href="([^"]+)" data-provider="([^"]+)"', page)
    return {name: html.unescape(href) for href, name in found}


def test_route_open_to_several_providers_shows_the_chooser(multi: IdentityEnv) -> None:
    """A route every provider may log in for gets a chooser page at P listing both by label."""
    with multi.client() as client:
        page, away = multi.follow(client, multi.h + "/desk")
    assert away is None
    assert page.status_code == 200
    assert str(page.url).startswith(multi.p + "/.tabiji/authorize?")
    choices = _choices(page.text)
    assert set(choices) == {"town", "contractors"}
    assert "役場" in page.text
    assert "委託事業者" in page.text


@pytest.mark.parametrize(("prefix", "which"), [("/staff", "a"), ("/vendor", "b")])
def test_route_with_one_provider_goes_straight_to_it(
    multi: IdentityEnv, prefix: str, which: str
) -> None:
    """A route naming one provider skips the chooser and sends the browser to that provider."""
    provider = multi.idp if which == "a" else _idp_b(multi)
    assert provider is not None
    with multi.client() as client:
        away = multi.start_login(client, multi.h + prefix + "/x")
    assert away.startswith(provider.issuer + "/auth?")


def test_login_through_the_chooser_with_the_second_provider(multi: IdentityEnv) -> None:
    """Choosing `contractors` logs in at provider B; the assertion names B as the identity's
    issuer, and the same subject at A and at B are two different users (keyed by iss+sub)."""
    subjects: list[tuple[str, str]] = []
    for name in ("contractors", "town"):
        with multi.client() as client:
            page, _ = multi.follow(client, multi.h + "/desk")
            authorize = multi.start_login(client, urljoin(str(page.url), _choices(page.text)[name]))
            provider = _idp_b(multi) if name == "contractors" else multi.idp
            assert provider is not None
            user = provider.user("suzuki")
            callback = login_with_httpx(client, authorize, user.username, user.password)
            final, _ = multi.follow(client, callback)
            claims = multi.verify_assertion(
                header_of(echo_of(final), "x-tabiji-assertion")[0], audience=multi.h
            )
            subjects.append((claims["idp"], claims["sub"]))
    assert subjects[0][0] == _idp_b(multi).issuer
    assert multi.idp is not None
    assert subjects[1][0] == multi.idp.issuer
    assert subjects[0][1] == subjects[1][1]  # the same `sub` string at both providers…
    assert subjects[0] != subjects[1]  # …is two different people


def test_mix_up_code_from_the_other_provider_is_refused(multi: IdentityEnv) -> None:
    """A code issued by provider B, sent to the gateway with the state of a login started at A
    (mix-up attack), is refused with or without B's `iss`, and creates no session."""
    idp_b = _idp_b(multi)
    with multi.client() as victim, multi.client() as attacker:
        state_a = query_of(multi.start_login(victim, multi.h + "/staff/x"))["state"]
        authorize_b = multi.start_login(attacker, multi.h + "/vendor/y")
        user = idp_b.user("suzuki")
        from_b = query_of(login_with_httpx(attacker, authorize_b, user.username, user.password))
        base = multi.p + "/.tabiji/oidc/callback?"
        with_iss = victim.get(base + urlencode({**from_b, "state": state_a}))
        # The first attempt took state_a; a second login at A gives a fresh one.
        state_a2 = query_of(multi.start_login(victim, multi.h + "/staff/x"))["state"]
        without_iss = {k: v for k, v in from_b.items() if k != "iss"}
        bare = victim.get(base + urlencode({**without_iss, "state": state_a2}))
    for response in (with_iss, bare):
        assert response.status_code == 400
        assert not any(c.startswith(SESSION + "=") for c in response.headers.get_list("set-cookie"))
