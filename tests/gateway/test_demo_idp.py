"""The demo OpenID Provider (gateway/demo/idp.py), driven in-process over httpx's ASGI transport.

Every flow is a real authorization-code + PKCE exchange; ID tokens are verified with pyjwt against
the provider's own /jwks.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import uvicorn

from gateway.demo import idp as idp_module
from gateway.demo.idp import (
    LOGIN_COOKIE,
    DemoIdpError,
    build_demo_idp_app,
    is_loopback,
    load_users,
    main,
    run_demo_idp,
)

ISSUER = "http://127.0.0.1:9000"
CLIENT_ID = "tabiji-demo"
SECRET = "s3cret-for-tests"
CALLBACK = "http://127.0.0.1:8080/.tabiji/oidc/callback"
LOGGED_OUT = "http://127.0.0.1:8080/.tabiji/logged-out"


class _Inputs(HTMLParser):
    """Collects the <input> fields of a page, form by form."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            self.forms.append({})
        elif tag == "input" and self.forms:
            fields = dict(attrs)
            if fields.get("name"):
                self.forms[-1][str(fields["name"])] = fields.get("value") or ""


def forms_of(page: str) -> list[dict[str, str]]:
    parser = _Inputs()
    parser.feed(page)
    return parser.forms


@dataclass
class Attempt:
    """One authorization request: its PKCE verifier, state and nonce."""

    verifier: str
    state: str
    nonce: str
    params: dict[str, str]


def new_attempt(**overrides: str | None) -> Attempt:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    state, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": CALLBACK,
        "scope": "openid profile email groups",
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge.decode(),
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return Attempt(verifier, state, nonce, {k: v for k, v in params.items() if v is not None})


@pytest.fixture
async def idp() -> AsyncIterator[httpx.AsyncClient]:
    """A fresh provider and a browser-like client (cookie jar, no automatic redirects)."""
    app = build_demo_idp_app(ISSUER, CLIENT_ID, SECRET, [CALLBACK], [LOGGED_OUT])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        yield client


async def sign_in(
    client: httpx.AsyncClient, attempt: Attempt, username: str, password: str, otp: str = ""
) -> httpx.Response:
    """Open the login page for `attempt`, then post the credentials with its hidden fields."""
    page = await client.get("/authorize", params=attempt.params)
    assert page.status_code == 200, page.text
    form = forms_of(page.text)[-1]  # the credentials form is the last one
    form.update(username=username, password=password, otp=otp)
    return await client.post("/authorize", data=form)


def callback_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


async def exchange(
    client: httpx.AsyncClient, code: str, verifier: str | None, secret: str = SECRET
) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK}
    if verifier is not None:
        data["code_verifier"] = verifier
    return await client.post("/token", data=data, auth=(CLIENT_ID, secret))


async def verified_id_token(client: httpx.AsyncClient, token: str, nonce: str) -> dict[str, Any]:
    """Verify the ID token as a relying party does: signature (JWKS), alg, iss, aud, nonce."""
    jwks = jwt.PyJWKSet.from_dict((await client.get("/jwks")).json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["ES256"], audience=CLIENT_ID, issuer=ISSUER
    )
    assert claims["nonce"] == nonce
    return claims


async def full_login(
    client: httpx.AsyncClient, username: str, password: str, otp: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    attempt = new_attempt()
    params = callback_params(await sign_in(client, attempt, username, password, otp))
    token = await exchange(client, params["code"], attempt.verifier)
    assert token.status_code == 200, token.text
    body = token.json()
    return body, await verified_id_token(client, body["id_token"], attempt.nonce)


@pytest.mark.anyio
async def test_discovery_names_the_endpoints_and_what_the_provider_supports(
    idp: httpx.AsyncClient,
) -> None:
    """Discovery lists every endpoint under the issuer, code flow only, S256, ES256, RFC 9207."""
    meta = (await idp.get("/.well-known/openid-configuration")).json()
    assert meta["issuer"] == ISSUER
    for name, path in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("jwks_uri", "/jwks"),
        ("userinfo_endpoint", "/userinfo"),
        ("end_session_endpoint", "/end_session"),
    ]:
        assert meta[name] == ISSUER + path
    assert meta["response_types_supported"] == ["code"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["id_token_signing_alg_values_supported"] == ["ES256"]
    assert meta["authorization_response_iss_parameter_supported"] is True


@pytest.mark.anyio
async def test_mfa_user_gets_a_signed_id_token_with_every_claim(idp: httpx.AsyncClient) -> None:
    """A code + PKCE login yields code, state and iss, and an ES256 ID token with every claim."""
    attempt = new_attempt()
    response = await sign_in(idp, attempt, "hanako", "hanako-demo", "123456")
    params = callback_params(response)
    assert params["state"] == attempt.state
    assert params["iss"] == ISSUER  # RFC 9207
    assert LOGIN_COOKIE in response.cookies
    token = await exchange(idp, params["code"], attempt.verifier)
    assert token.status_code == 200, token.text
    assert token.headers["cache-control"] == "no-store"
    claims = await verified_id_token(idp, token.json()["id_token"], attempt.nonce)
    assert claims["sub"] == "demo-0001"
    assert claims["email"] == "hanako@town.example"
    assert claims["email_verified"] is True
    assert claims["name"] == "山田 花子"
    assert claims["groups"] == ["staff", "soumu"]
    assert claims["amr"] == ["pwd", "otp", "mfa"]
    assert claims["acr"] == "http://schemas.openid.net/pape/policies/2007/06/multi-factor"
    assert isinstance(claims["auth_time"], int)
    assert claims["sid"]
    assert jwt.get_unverified_header(token.json()["id_token"])["alg"] == "ES256"


@pytest.mark.anyio
async def test_password_only_user_has_amr_pwd_and_userinfo_answers(
    idp: httpx.AsyncClient,
) -> None:
    """A user without MFA gets amr ["pwd"]; /userinfo answers the access token with the claims."""
    body, claims = await full_login(idp, "ken", "ken-demo")
    assert claims["amr"] == ["pwd"]
    assert claims["groups"] == ["staff"]
    info = await idp.get("/userinfo", headers={"authorization": f"Bearer {body['access_token']}"})
    assert info.status_code == 200
    assert info.json()["email"] == "ken@town.example"
    assert info.json()["sub"] == claims["sub"]
    refused = await idp.get("/userinfo", headers={"authorization": "Bearer not-a-token"})
    assert refused.status_code == 401


@pytest.mark.anyio
async def test_a_user_without_groups_gets_an_empty_group_list(idp: httpx.AsyncClient) -> None:
    """The contractor signs in and carries no groups at all."""
    _, claims = await full_login(idp, "contractor", "contractor-demo")
    assert claims["groups"] == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("username", "password", "otp"),
    [
        ("ken", "wrong", ""),
        ("nobody", "ken-demo", ""),
        ("hanako", "hanako-demo", ""),  # MFA user without the one-time code
        ("hanako", "hanako-demo", "000000"),
        ("hanako", "wrong", "123456"),
    ],
)
async def test_wrong_credentials_are_refused_without_a_code(
    idp: httpx.AsyncClient, username: str, password: str, otp: str
) -> None:
    """A wrong password, unknown user or missing/wrong one-time code shows the form again, 401."""
    response = await sign_in(idp, new_attempt(), username, password, otp)
    assert response.status_code == 401
    assert "location" not in response.headers
    assert LOGIN_COOKIE not in response.cookies
    assert "パスワード" in response.text


@pytest.mark.anyio
async def test_login_post_without_the_csrf_cookie_is_refused(idp: httpx.AsyncClient) -> None:
    """A cross-site post (no SameSite cookie, so no matching token) issues no code."""
    attempt = new_attempt()
    page = await idp.get("/authorize", params=attempt.params)
    form = forms_of(page.text)[-1]
    form.update(username="ken", password="ken-demo")
    idp.cookies.clear()
    response = await idp.post("/authorize", data=form)
    assert response.status_code == 403
    assert "location" not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    "overrides",
    [
        {"code_challenge": None, "code_challenge_method": None},
        {"code_challenge": None},
        {"code_challenge": "too-short"},
        {"code_challenge_method": None},
        {"code_challenge_method": "plain"},
    ],
)
async def test_authorization_without_s256_pkce_is_refused(
    idp: httpx.AsyncClient, overrides: dict[str, str | None]
) -> None:
    """No challenge, no method, or `plain`: invalid_request back to the client, with iss."""
    attempt = new_attempt(**overrides)
    response = await idp.get("/authorize", params=attempt.params)
    params = callback_params(response)
    assert params["error"] == "invalid_request"
    assert params["state"] == attempt.state
    assert params["iss"] == ISSUER
    assert "code" not in params


@pytest.mark.anyio
@pytest.mark.parametrize("verifier", [None, "x" * 64])
async def test_token_exchange_without_the_right_verifier_is_refused(
    idp: httpx.AsyncClient, verifier: str | None
) -> None:
    """A missing or wrong PKCE verifier gets invalid_grant and no tokens."""
    attempt = new_attempt()
    params = callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    response = await exchange(idp, params["code"], verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "id_token" not in response.json()


@pytest.mark.anyio
async def test_a_failed_exchange_spends_the_code(idp: httpx.AsyncClient) -> None:
    """A code tried with a wrong verifier is gone: the right verifier afterwards gets nothing."""
    attempt = new_attempt()
    params = callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    assert (await exchange(idp, params["code"], "y" * 64)).status_code == 400
    retry = await exchange(idp, params["code"], attempt.verifier)
    assert retry.status_code == 400
    assert retry.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_an_expired_code_is_refused(
    idp: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A code past its lifetime buys nothing, even with the right verifier."""
    monkeypatch.setattr(idp_module, "CODE_LIFETIME", -1)
    attempt = new_attempt()
    params = callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    response = await exchange(idp, params["code"], attempt.verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.anyio
async def test_a_code_works_once_and_its_replay_revokes_the_tokens(
    idp: httpx.AsyncClient,
) -> None:
    """The second exchange of a code fails, and the access token from the first stops working."""
    attempt = new_attempt()
    params = callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    first = await exchange(idp, params["code"], attempt.verifier)
    assert first.status_code == 200
    access = {"authorization": f"Bearer {first.json()['access_token']}"}
    assert (await idp.get("/userinfo", headers=access)).status_code == 200
    second = await exchange(idp, params["code"], attempt.verifier)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert (await idp.get("/userinfo", headers=access)).status_code == 401


@pytest.mark.anyio
async def test_the_token_endpoint_needs_the_client_secret(idp: httpx.AsyncClient) -> None:
    """A wrong client secret is invalid_client (401), even with a good code and verifier."""
    attempt = new_attempt()
    params = callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    response = await exchange(idp, params["code"], attempt.verifier, secret="guess")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "redirect_uri",
    [
        "http://evil.example/cb",
        CALLBACK + "/extra",
        CALLBACK + "?x=1",
        "http://127.0.0.1:8081/.tabiji/oidc/callback",
    ],
)
async def test_unregistered_redirect_uri_is_refused_without_redirecting(
    idp: httpx.AsyncClient, redirect_uri: str
) -> None:
    """Only the exact registered redirect URI is used; otherwise a 400 page, no Location."""
    response = await idp.get("/authorize", params=new_attempt(redirect_uri=redirect_uri).params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "invalid_request" in response.text


@pytest.mark.anyio
@pytest.mark.parametrize("client_id", ["other", "tabiji-démo", "tabiji-demo\x00"])
async def test_an_unknown_client_is_refused_without_redirecting(
    idp: httpx.AsyncClient, client_id: str
) -> None:
    """A client id the provider does not know (non-ASCII too) gets a page, never a redirect."""
    response = await idp.get("/authorize", params=new_attempt(client_id=client_id).params)
    assert response.status_code == 400
    assert "location" not in response.headers


@pytest.mark.anyio
async def test_a_second_login_is_one_click_with_the_same_provider_session(
    idp: httpx.AsyncClient,
) -> None:
    """With the provider's cookie, "continue" issues a new code without a password; same sid."""
    _, first = await full_login(idp, "auditor", "auditor-demo")
    attempt = new_attempt()
    page = await idp.get("/authorize", params=attempt.params)
    assert "監査 一郎" in page.text
    form = forms_of(page.text)[0]
    assert form["continue"] == "1"
    params = callback_params(await idp.post("/authorize", data=form))
    token = await exchange(idp, params["code"], attempt.verifier)
    second = await verified_id_token(idp, token.json()["id_token"], attempt.nonce)
    assert second["sub"] == first["sub"]
    assert second["sid"] == first["sid"]


@pytest.mark.anyio
async def test_continue_without_a_login_issues_no_code(idp: httpx.AsyncClient) -> None:
    """A forged "continue" post without the provider's login cookie shows the form again."""
    attempt = new_attempt()
    page = await idp.get("/authorize", params=attempt.params)
    form = forms_of(page.text)[-1]
    form["continue"] = "1"
    response = await idp.post("/authorize", data=form)
    assert response.status_code == 401
    assert "location" not in response.headers


@pytest.mark.anyio
async def test_prompt_login_needs_the_password_again(idp: httpx.AsyncClient) -> None:
    """With prompt=login, "continue" from an existing login is not enough (OIDC Core §3.1.2.1)."""
    await full_login(idp, "ken", "ken-demo")
    attempt = new_attempt(prompt="login")
    page = await idp.get("/authorize", params=attempt.params)
    form = forms_of(page.text)[0]
    assert form.get("continue") == "1"
    response = await idp.post("/authorize", data=form)
    assert response.status_code == 401
    assert "location" not in response.headers


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["form_post", "fragment"])
async def test_only_the_query_response_mode_is_served(idp: httpx.AsyncClient, mode: str) -> None:
    """response_mode other than query (as discovery says) goes back as invalid_request."""
    attempt = new_attempt(response_mode=mode)
    params = callback_params(await idp.get("/authorize", params=attempt.params))
    assert params["error"] == "invalid_request"
    assert "code" not in params


@pytest.mark.anyio
async def test_prompt_none_without_a_login_returns_login_required(idp: httpx.AsyncClient) -> None:
    """prompt=none with nobody signed in sends login_required back, never a login page."""
    attempt = new_attempt(prompt="none")
    params = callback_params(await idp.get("/authorize", params=attempt.params))
    assert params["error"] == "login_required"
    assert params["state"] == attempt.state


@pytest.mark.anyio
async def test_a_replayed_nonce_is_refused(idp: httpx.AsyncClient) -> None:
    """An authorization request repeating a nonce that already bought a code is refused."""
    attempt = new_attempt()
    callback_params(await sign_in(idp, attempt, "ken", "ken-demo"))
    replay = await idp.get("/authorize", params=attempt.params)
    assert callback_params(replay)["error"] == "invalid_request"


@pytest.mark.anyio
async def test_end_session_redirects_to_a_registered_uri_and_ends_the_login(
    idp: httpx.AsyncClient,
) -> None:
    """RP-initiated logout with id_token_hint goes to the registered URI and clears the cookie."""
    body, _ = await full_login(idp, "ken", "ken-demo")
    access = {"authorization": f"Bearer {body['access_token']}"}
    response = await idp.get(
        "/end_session",
        params={
            "id_token_hint": body["id_token"],
            "post_logout_redirect_uri": LOGGED_OUT,
            "state": "bye",
        },
    )
    assert response.status_code == 302
    assert response.headers["location"] == LOGGED_OUT + "?state=bye"
    assert f'{LOGIN_COOKIE}=""' in response.headers["set-cookie"]
    assert (await idp.get("/userinfo", headers=access)).status_code == 401
    page = await idp.get("/authorize", params=new_attempt().params)
    assert "continue" not in forms_of(page.text)[0]  # no one-click login any more


@pytest.mark.anyio
async def test_end_session_from_another_browser_ends_the_login_named_by_the_hint(
    idp: httpx.AsyncClient,
) -> None:
    """The id_token_hint's sid ends that login (and its tokens) without the provider's cookie."""
    body, _ = await full_login(idp, "ken", "ken-demo")
    access = {"authorization": f"Bearer {body['access_token']}"}
    idp.cookies.clear()
    response = await idp.get(
        "/end_session",
        params={"id_token_hint": body["id_token"], "post_logout_redirect_uri": LOGGED_OUT},
    )
    assert response.status_code == 302
    assert (await idp.get("/userinfo", headers=access)).status_code == 401


@pytest.mark.anyio
@pytest.mark.parametrize(
    "target", ["http://evil.example/", LOGGED_OUT + "/x", "http://127.0.0.1:8080/"]
)
async def test_end_session_never_redirects_to_an_unregistered_uri(
    idp: httpx.AsyncClient, target: str
) -> None:
    """An unregistered post_logout_redirect_uri ends the session but redirects nowhere."""
    body, _ = await full_login(idp, "ken", "ken-demo")
    response = await idp.get(
        "/end_session",
        params={"id_token_hint": body["id_token"], "post_logout_redirect_uri": target},
    )
    assert response.status_code == 200
    assert "location" not in response.headers


@pytest.mark.anyio
async def test_end_session_with_a_forged_hint_is_refused(idp: httpx.AsyncClient) -> None:
    """An id_token_hint not signed by the provider is an error page, never a redirect."""
    forged = jwt.encode({"iss": ISSUER, "aud": CLIENT_ID, "sub": "x"}, "k" * 32, algorithm="HS256")
    response = await idp.get(
        "/end_session",
        params={"id_token_hint": forged, "post_logout_redirect_uri": LOGGED_OUT},
    )
    assert response.status_code == 400
    assert "location" not in response.headers


@pytest.mark.anyio
async def test_end_session_without_a_hint_asks_first(idp: httpx.AsyncClient) -> None:
    """Without id_token_hint the user confirms with a form; the confirmed post ends the login."""
    await full_login(idp, "ken", "ken-demo")
    page = await idp.get("/end_session", params={"post_logout_redirect_uri": LOGGED_OUT})
    assert page.status_code == 200
    form = forms_of(page.text)[0]
    done = await idp.post("/end_session", data=form)
    assert done.status_code == 200  # no hint: never redirected (§3)
    assert "location" not in done.headers
    assert f'{LOGIN_COOKIE}=""' in done.headers["set-cookie"]


@pytest.mark.anyio
async def test_pages_carry_a_strict_content_security_policy(idp: httpx.AsyncClient) -> None:
    """The login page allows no scripts, is never framed and posts only to itself or the RP."""
    page = await idp.get("/authorize", params=new_attempt().params)
    csp = page.headers["content-security-policy"]
    assert "script-src" not in csp
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "form-action 'self' http://127.0.0.1:8080;" in csp


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104 — the address under test
        ("192.0.2.1", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Only 127.0.0.0/8, ::1 and localhost count as loopback."""
    assert is_loopback(host) is loopback


def _never_serve(*args: object, **kwargs: object) -> None:
    raise AssertionError("the provider would have started serving")


def test_a_non_loopback_address_is_refused_without_the_demo_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_demo_idp refuses 0.0.0.0 before binding anything, naming the demo-only flag."""
    monkeypatch.setattr(uvicorn, "run", _never_serve)
    with pytest.raises(DemoIdpError, match="--demo-allow-non-loopback"):
        run_demo_idp(
            "0.0.0.0",  # noqa: S104 — the address under test
            0,
            issuer=ISSUER,
            client_id=CLIENT_ID,
            client_secret=SECRET,
            redirect_uris=[CALLBACK],
            post_logout_redirect_uris=[],
        )


def test_the_cli_refuses_a_non_loopback_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m gateway.demo.idp --host 192.0.2.1` exits 2 with the reason."""
    monkeypatch.setattr(uvicorn, "run", _never_serve)
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    code = main(
        ["--host", "192.0.2.1", "--client-secret-file", str(secret), "--redirect-uri", CALLBACK]
    )
    assert code == 2
    assert "loopback only" in capsys.readouterr().err


def test_the_demo_flag_lets_a_non_loopback_address_through_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With --demo-allow-non-loopback the provider serves on 0.0.0.0 and logs a loud warning."""
    served: list[tuple[str, int]] = []

    def fake_run(app: object, *, host: str, port: int, **options: object) -> None:
        served.append((host, port))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("AUTHLIB_INSECURE_TRANSPORT", raising=False)
    run_demo_idp(
        "0.0.0.0",  # noqa: S104 — the address under test
        9999,
        issuer="https://idp.demo.example",
        client_id=CLIENT_ID,
        client_secret=SECRET,
        redirect_uris=[CALLBACK],
        post_logout_redirect_uris=[],
        allow_non_loopback=True,
    )
    assert served == [("0.0.0.0", 9999)]  # noqa: S104 — the address under test
    assert "DEMO IDENTITY PROVIDER LISTENING ON 0.0.0.0" in caplog.text


def test_the_shipped_users_file_has_the_demo_accounts() -> None:
    """users.yaml holds the five demo accounts (joho is IT); only hanako has a one-time code."""
    users = {user.username: user for user in load_users(Path("gateway/demo/users.yaml"))}
    assert set(users) == {"hanako", "ken", "auditor", "contractor", "joho"}
    assert users["joho"].groups == ("staff", "it-admins")
    assert users["hanako"].groups == ("staff", "soumu")
    assert [name for name, user in users.items() if user.otp] == ["hanako"]
    assert users["contractor"].groups == ()


def test_a_broken_users_file_is_reported(tmp_path: Path) -> None:
    """A user entry without a password names the file and the entry."""
    broken = tmp_path / "users.yaml"
    broken.write_text("users:\n  - {username: a, subject: s, name: n, email: e}\n")
    with pytest.raises(DemoIdpError, match=r"users\.yaml: user #1 needs 'password'"):
        load_users(broken)
