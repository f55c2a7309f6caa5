"""Bearer JWTs through the gateway over TLS: keys from a real JWKS endpoint (HTTPS, test CA);
valid tokens reach the upstream with an assertion, every bad one gets 401 with its precise code."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .conftest import Upstream, route
from .identity_env import IdentityEnv, echo_of, header_of, identity_env, load_test_helper

pytestmark = pytest.mark.integration

jwks_server = load_test_helper("jwks_server")
ISSUER = "https://tokens.tabiji.test"
AUDIENCE = "tabiji-api"
KEY = jwks_server.ec_key("ec-1")
RSA_KEY = jwks_server.rsa_key("rsa-1")
OTHER = jwks_server.ec_key("ec-1")  # same kid, another key: a forgery


def _routes(port: int, upstream_port: int) -> list[dict[str, Any]]:
    h = f"https://localhost:{port}"
    up = f"http://127.0.0.1:{upstream_port}"
    return [
        route("mfa", h + "/mfa", up, policy="staff-mfa"),
        route("api", h, up, policy="signed-in"),
    ]


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A JWKS endpoint over HTTPS (certificate from its own test CA) serving KEY and RSA_KEY."""
    directory = tmp_path_factory.mktemp("jwks")
    ca = load_test_helper("tls_ca").make_ca(directory / "ca")
    cert, key = ca.issue(["127.0.0.1"], directory / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    state = jwks_server.JwksState(document=jwks_server.jwks_of(KEY, RSA_KEY))
    with jwks_server.serve_jwks(state, context) as server:
        server.ca_path = ca.ca_path
        yield server


@pytest.fixture(scope="module")
def env(
    upstream: Upstream, jwks: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IdentityEnv]:
    """A gateway with one bearer issuer and no browser login provider (a program-only API)."""
    bearer = {
        "name": "api",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks_uri": jwks.url,
        "algorithms": ["ES256", "RS256"],
        "ca_bundle": str(jwks.ca_path),
    }
    with identity_env(
        tmp_path_factory.mktemp("idbearer"),
        upstream,
        with_idp=False,
        bearer=[bearer],
        routes=_routes,
    ) as running:
        yield running


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "svc-juki-sync",
        "email": "sync@town.example.jp",
        "email_verified": True,
        "groups": ["staff", "batch"],
        "amr": ["pwd", "otp"],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _get(env: IdentityEnv, token: str, path: str = "/api/items") -> httpx.Response:
    with env.client() as client:
        return client.get(
            env.h + path,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )


def test_valid_token_reaches_the_upstream_with_an_assertion(env: IdentityEnv) -> None:
    """A valid ES256 token: 200, and the upstream gets an assertion naming the token's subject."""
    response = _get(env, KEY.sign(_claims()))
    echo = echo_of(response)
    claims = env.verify_assertion(header_of(echo, "x-tabiji-assertion")[0], audience=env.h)
    assert claims["sub"] == "svc-juki-sync"
    assert claims["iss"] == env.p
    assert claims["idp"] == ISSUER
    assert claims["groups"] == ["batch", "staff"]
    assert claims["sid"] is None  # no session behind a bearer token


def test_valid_rs256_token_is_accepted(env: IdentityEnv) -> None:
    """An RS256 token from the same issuer (both algorithms allowed) is accepted."""
    assert _get(env, RSA_KEY.sign(_claims())).status_code == 200


def test_bearer_facts_feed_the_policy(env: IdentityEnv) -> None:
    """The token's groups and amr decide: otp in amr passes the MFA route, pwd only does not."""
    assert _get(env, KEY.sign(_claims()), "/mfa/x").status_code == 200
    refused = _get(env, KEY.sign(_claims(amr=["pwd"])), "/mfa/x")
    assert refused.status_code == 403
    assert "mfa-required" in refused.json()["reasons"]


def _forged_hs256(claims: dict[str, Any]) -> str:
    """HS256 with the issuer's *public* key as the HMAC secret (the classic key confusion)."""
    import hashlib
    import hmac
    import json

    header = jwks_server.b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = jwks_server.b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{body}".encode()
    mac = hmac.new(RSA_KEY.public_pem(), signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{jwks_server.b64url(mac)}"


def _jwk_injected(claims: dict[str, Any]) -> str:
    """Signed by an attacker's key, which the token's own `jwk` header offers (must be ignored)."""
    attacker = jwks_server.ec_key("attacker")
    return str(attacker.sign(claims, jwk=attacker.jwk()))


BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (
        lambda: KEY.sign(_claims(exp=int(time.time()) - 600, iat=int(time.time()) - 900, nbf=None)),
        "token-expired",
    ),
    "not-yet-valid": (lambda: KEY.sign(_claims(nbf=int(time.time()) + 600)), "token-not-yet-valid"),
    "wrong-aud": (lambda: KEY.sign(_claims(aud="someone-else")), "token-wrong-audience"),
    "wrong-iss": (lambda: KEY.sign(_claims(iss="https://evil.example")), "token-wrong-issuer"),
    "alg-none": (
        lambda: jwks_server.unsigned_token(_claims(), {"alg": "none", "typ": "JWT", "kid": "ec-1"}),
        "token-alg-not-allowed",
    ),
    "hs256-public-key": (lambda: _forged_hs256(_claims()), "token-alg-not-allowed"),
    "unknown-kid": (
        lambda: jwks_server.ec_key("nobody-knows").sign(_claims()),
        "token-unknown-kid",
    ),
    "forged-signature": (lambda: OTHER.sign(_claims()), "token-bad-signature"),
    "jwk-header": (lambda: _jwk_injected(_claims()), "token-unknown-kid"),
    "logout-token-typ": (lambda: KEY.sign(_claims(), typ="logout+jwt"), "token-wrong-type"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused_and_not_forwarded(env: IdentityEnv, case: str) -> None:
    """Every invalid token: 401 and nothing reaches the upstream (never downgraded to anonymous)."""
    make, _ = BAD_TOKENS[case]
    marker = f"/api/refused-{case}"
    response = _get(env, make(), marker)
    assert response.status_code == 401
    assert env.upstream.received(marker) == []


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_tokens_get_401_with_the_precise_code(env: IdentityEnv, case: str) -> None:
    """Every invalid token: 401, WWW-Authenticate Bearer error="invalid_token" with the code,
    and the code as the JSON body's error (RFC 6750 §3)."""
    make, code = BAD_TOKENS[case]
    response = _get(env, make(), f"/api/bad-{case}")
    assert response.status_code == 401
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    assert code in challenge
    assert response.json()["error"] == code


def test_malformed_authorization_is_refused_with_a_challenge(env: IdentityEnv) -> None:
    """A Bearer credential that is not a JWT is a refusal (401 with a challenge), not anonymous."""
    response = _get(env, "not-a-jwt")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.json()["error"] == "token-malformed"


def test_flood_of_unknown_kids_does_not_hammer_the_jwks(env: IdentityEnv, jwks: Any) -> None:
    """Twenty made-up kids cause at most one extra JWKS fetch (rate-limited refetch)."""
    before = jwks.state.fetches
    for index in range(20):
        token = jwks_server.ec_key(f"made-up-{index}").sign(_claims())
        assert _get(env, token).status_code == 401
    assert jwks.state.fetches - before <= 1


def test_no_credential_on_a_bearer_only_route_is_401_json(env: IdentityEnv) -> None:
    """Without any credential, a program gets 401 JSON (no provider to log in with)."""
    with env.client() as client:
        response = client.get(env.h + "/api/items", headers={"Accept": "application/json"})
    assert response.status_code == 401
