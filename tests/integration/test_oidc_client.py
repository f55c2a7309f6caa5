"""The OIDC client (gateway/identity/oidc.py) against a real OpenID Provider (npm oidc-provider)
over TLS with a test CA: discovery, code flow with PKCE, MFA facts, refresh, logout, and the
attacks it must refuse (mix-up, replayed code, nonce, forged ID and logout tokens).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import jose
from gateway.identity.oidc import (
    BACKCHANNEL_LOGOUT_EVENT,
    LoginStart,
    OidcError,
    OidcLogin,
    OidcProvider,
    ProviderConfig,
)

from .idp_fixture import (
    DEFAULT_POST_LOGOUT_URI,
    REPO,
    Idp,
    LogoutReceiver,
    idp,
    idp_b,
    idp_ca,
    idp_logout_receiver,
    login_with_httpx,
    logout_with_httpx,
    start_idp,
)

__all__ = ["idp", "idp_b", "idp_ca", "idp_logout_receiver"]  # fixtures used by name below

SCOPES = ("openid", "email", "profile", "groups")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config_for(idp: Idp, client_id: str = "tabiji", **overrides: Any) -> ProviderConfig:
    client = idp.clients[client_id]
    values: dict[str, Any] = {
        "name": idp.name,
        "issuer": idp.issuer,
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "redirect_uri": client.redirect_uri,
        "scopes": SCOPES,
        "ca_bundle": idp.ca_path,
    }
    values.update(overrides)
    return ProviderConfig(**values)


@asynccontextmanager
async def relying_party(
    idp: Idp, client_id: str = "tabiji", keys: jose.KeySource | None = None, **overrides: Any
) -> AsyncIterator[OidcProvider]:
    rp = OidcProvider(config_for(idp, client_id, **overrides), keys=keys)
    try:
        yield rp
    finally:
        await rp.aclose()


def callback_params(callback_url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(callback_url).query))


async def authorize(
    rp: OidcProvider, idp: Idp, username: str, *, otp: str | None = None
) -> tuple[LoginStart, dict[str, str]]:
    """begin() and the provider's login pages: the login start and the callback parameters."""
    start = await rp.begin(time.time())
    user = idp.user(username)
    with idp.http_client() as browser:
        callback = login_with_httpx(
            browser, start.authorization_url, user.username, user.password, otp
        )
    assert callback.startswith(rp.config.redirect_uri + "?")
    return start, callback_params(callback)


async def log_in(rp: OidcProvider, idp: Idp, username: str, *, otp: str | None = None) -> OidcLogin:
    start, params = await authorize(rp, idp, username, otp=otp)
    return await rp.finish(params, start)


async def oidc_error(awaitable: Any) -> OidcError:
    with pytest.raises(OidcError) as caught:
        await awaitable
    return caught.value


# -- configuration (no server) -------------------------------------------------------------------


def _config(**overrides: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "name": "town",
        "issuer": "https://login.example.jp/tenant/v2.0",
        "client_id": "tabiji",
        "client_secret": "s",
        "redirect_uri": "https://gw.example.jp/.tabiji/callback",
    }
    values.update(overrides)
    return ProviderConfig(**values)


@pytest.mark.parametrize("algorithms", [("HS256",), ("none",), ("RS256", "HS512"), ()])
def test_config_refuses_symmetric_or_no_algorithms(algorithms: tuple[str, ...]) -> None:
    """The algorithm allow-list may hold only asymmetric algorithms, and at least one."""
    with pytest.raises(ValueError, match="algorithms"):
        _config(algorithms=algorithms)


def test_config_refuses_plain_http_issuer_off_loopback() -> None:
    """An issuer over plain http is refused unless it is a loopback host (tests)."""
    with pytest.raises(ValueError, match="https"):
        _config(issuer="http://login.example.jp")
    assert _config(issuer="http://127.0.0.1:8080").issuer == "http://127.0.0.1:8080"


def test_config_requires_the_openid_scope() -> None:
    """Without the openid scope there is no ID token: the config is refused."""
    with pytest.raises(ValueError, match="openid"):
        _config(scopes=("email",))


def test_config_extra_params_cannot_override_the_flow() -> None:
    """extra_auth_params may not replace state, nonce, PKCE or the redirect URI."""
    with pytest.raises(ValueError, match="extra_auth_params"):
        _config(extra_auth_params=(("nonce", "fixed"),))


def test_importing_the_client_raises_no_warning() -> None:
    """authlib's httpx integration is imported on httpx2, the client it wants: a fresh interpreter
    with every warning an error imports the OIDC module (the httpx fallback warns)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import gateway.identity.oidc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- discovery -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.anyio
async def test_discovery_reads_the_real_provider(idp: Idp) -> None:
    """Discovery finds the endpoints, the promise of RFC 9207 `iss`, and the logout endpoint."""
    async with relying_party(idp) as rp:
        metadata = await rp.discover()
        assert metadata.issuer == idp.issuer
        assert metadata.token_endpoint == idp.issuer + "/token"
        assert metadata.jwks_uri.startswith(idp.issuer + "/")
        assert metadata.end_session_endpoint == idp.issuer + "/session/end"
        assert metadata.iss_parameter_supported is True
        assert await rp.discover() is metadata  # cached


@pytest.mark.integration
@pytest.mark.anyio
async def test_discovery_refuses_metadata_for_another_issuer(idp: Idp) -> None:
    """Metadata whose issuer differs from the configured one (here by a trailing slash) is
    refused (OIDC Discovery §4.3)."""
    async with relying_party(idp, issuer=idp.issuer + "/") as rp:
        error = await oidc_error(rp.discover())
        assert error.code == "oidc-discovery-failed"
        assert "issuer" in error.detail
        assert rp.metadata is None


@pytest.mark.integration
@pytest.mark.anyio
async def test_discovery_verifies_the_provider_certificate(idp: Idp) -> None:
    """Without the test CA (system trust store only) the provider's certificate is refused."""
    async with relying_party(idp, ca_bundle=None) as rp:
        error = await oidc_error(rp.discover())
        assert error.code == "oidc-discovery-failed"
        assert "CERTIFICATE_VERIFY_FAILED" in error.detail


# -- the code flow -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.anyio
async def test_authorization_url_has_pkce_and_fresh_random_values(idp: Idp) -> None:
    """Each login gets its own ≥256-bit state, nonce and verifier, with an S256 challenge."""
    async with relying_party(idp) as rp:
        first, second = await rp.begin(1.0), await rp.begin(2.0)
    query = dict(parse_qsl(urlsplit(first.authorization_url).query))
    challenge = base64.urlsafe_b64encode(hashlib.sha256(first.code_verifier.encode()).digest())
    assert query["code_challenge"] == challenge.rstrip(b"=").decode()
    assert query["code_challenge_method"] == "S256"
    assert (query["state"], query["nonce"]) == (first.state, first.nonce)
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == rp.config.redirect_uri
    for value in (first.state, first.nonce, first.code_verifier):
        assert len(value) >= 43
    assert {first.state, first.nonce, first.code_verifier}.isdisjoint(
        {second.state, second.nonce, second.code_verifier}
    )


@pytest.mark.integration
@pytest.mark.anyio
async def test_full_login_with_mfa(idp: Idp) -> None:
    """A login with password and one-time code gives groups, e-mail and amr pwd+otp."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "tanaka", otp=idp.user("tanaka").otp)
    assert login.issuer == idp.issuer
    assert login.subject == "u-0001-tanaka"
    assert login.email == "tanaka@town.example.jp"
    assert login.email_verified is True
    assert login.name == "田中 花子"
    assert login.groups == frozenset({"staff", "juminka"})
    assert login.groups_overage is False
    assert login.amr == ("pwd", "otp")
    assert login.acr == "urn:tabiji:test:acr:mfa"
    assert login.sid  # the client registered a back-channel logout URI, so sid is in the token
    assert login.auth_time is not None
    assert login.id_token
    assert login.refresh_token
    assert login.claims["aud"] == "tabiji"


@pytest.mark.integration
@pytest.mark.anyio
async def test_login_without_second_factor_has_pwd_only(idp: Idp) -> None:
    """A password-only login carries amr ["pwd"], so an MFA policy can tell the difference."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "suzuki")
    assert login.amr == ("pwd",)
    assert login.acr == "urn:tabiji:test:acr:pwd"


@pytest.mark.integration
@pytest.mark.anyio
async def test_public_client_with_es256(idp: Idp) -> None:
    """A public client (no secret, PKCE only) gets an ES256-signed ID token that verifies."""
    async with relying_party(idp, "tabiji-public") as rp:
        login = await log_in(rp, idp, "suzuki")
    assert login.subject == "u-0002-suzuki"
    assert jwt.get_unverified_header(login.id_token or "")["alg"] == "ES256"


@pytest.mark.integration
@pytest.mark.anyio
async def test_unverified_email_is_reported_as_such(idp: Idp) -> None:
    """email_verified false from the provider stays false (policy may require a verified one)."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "sato")
    assert login.email == "sato@contractor.example.com"
    assert login.email_verified is False


@pytest.mark.integration
@pytest.mark.anyio
async def test_state_mismatch_is_refused(idp: Idp) -> None:
    """A callback whose state is not the stored one fails before the code is redeemed."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        error = await oidc_error(rp.finish({**params, "state": "x" + start.state}, start))
        assert error.code == "oidc-state-invalid"
        assert (await rp.finish(params, start)).subject == "u-0002-suzuki"  # code still unspent


@pytest.mark.integration
@pytest.mark.anyio
async def test_iss_parameter_mismatch_is_refused(idp: Idp) -> None:
    """An `iss` response parameter that is not our issuer is refused (RFC 9207 §2.4)."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        assert params["iss"] == idp.issuer  # the provider sends it
        error = await oidc_error(rp.finish({**params, "iss": "https://evil.example"}, start))
        assert error.code == "oidc-iss-mismatch"


@pytest.mark.integration
@pytest.mark.anyio
async def test_missing_iss_is_refused_when_the_provider_promises_it(idp: Idp) -> None:
    """The provider advertises authorization_response_iss_parameter_supported: `iss` is then
    required, and its absence (a stripped response) fails."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        del params["iss"]
        error = await oidc_error(rp.finish(params, start))
        assert error.code == "oidc-iss-mismatch"


@pytest.mark.integration
@pytest.mark.anyio
async def test_provider_error_response(idp: Idp) -> None:
    """The user cancelling at the provider arrives as error=access_denied: oidc-provider-error."""
    async with relying_party(idp) as rp:
        start = await rp.begin(time.time())
        with idp.http_client() as browser:
            response = browser.get(start.authorization_url)
            interaction = response.headers["location"]
            response = browser.get(f"{idp.issuer}{interaction}/abort")
            response = browser.get(response.headers["location"])
        params = callback_params(response.headers["location"])
        error = await oidc_error(rp.finish(params, start))
    assert error.code == "oidc-provider-error"
    assert error.reason == "access_denied"


@pytest.mark.integration
@pytest.mark.anyio
async def test_nonce_mismatch_is_refused(idp: Idp) -> None:
    """An ID token whose nonce is not the stored one (an injected code) is refused."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        error = await oidc_error(rp.finish(params, replace(start, nonce="another-nonce")))
    assert error.code == "oidc-nonce-mismatch"


@pytest.mark.integration
@pytest.mark.anyio
async def test_replayed_code_is_refused(idp: Idp) -> None:
    """A code redeemed once cannot be redeemed again."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        await rp.finish(params, start)
        error = await oidc_error(rp.finish(params, start))
    assert error.code == "oidc-code-exchange-failed"
    assert error.reason == "invalid_grant"


@pytest.mark.integration
@pytest.mark.anyio
async def test_wrong_pkce_verifier_is_refused(idp: Idp) -> None:
    """A stolen code without its PKCE verifier is useless (RFC 7636)."""
    async with relying_party(idp) as rp:
        start, params = await authorize(rp, idp, "suzuki")
        error = await oidc_error(rp.finish(params, replace(start, code_verifier="v" * 43)))
    assert error.code == "oidc-code-exchange-failed"
    assert error.reason == "invalid_grant"


@pytest.mark.integration
@pytest.mark.anyio
async def test_mix_up_between_two_providers_is_refused(idp: Idp, idp_b: Idp) -> None:
    """A response from provider B presented to a login started at A fails: B's `iss` does not
    match, and with the `iss` rewritten to A's, B's code is worthless at A's token endpoint."""
    async with relying_party(idp) as rp_a, relying_party(idp_b) as rp_b:
        start_a = await rp_a.begin(time.time())
        start_b, params_b = await authorize(rp_b, idp_b, "suzuki")
        # The attacker (or a confused browser) hands B's response to A's callback with A's state.
        forged = {**params_b, "state": start_a.state}
        error = await oidc_error(rp_a.finish(forged, start_a))
        assert error.code == "oidc-iss-mismatch"
        error = await oidc_error(rp_a.finish({**forged, "iss": idp.issuer}, start_a))
        assert error.code == "oidc-code-exchange-failed"
        # B's own flow still works: the refusals came from the checks, not a broken provider.
        assert (await rp_b.finish(params_b, start_b)).issuer == idp_b.issuer


# -- forged ID tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signature)}"


def hs256_token(claims: dict[str, Any], secret: bytes, kid: str | None) -> str:
    """A token 'signed' with HMAC using `secret` (pyjwt itself refuses PEM keys as HMAC secrets)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


@dataclass(frozen=True)
class Forger:
    """Our own signing keys, pinned into a relying party so every claim can be forged."""

    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": "forger-rs", "alg": "RS256", "use": "sig"},
                {**ec_jwk, "kid": "forger-es", "alg": "ES256", "use": "sig"},
            ]
        }

    def sign(self, claims: dict[str, Any], *, alg: str = "RS256", **header: Any) -> str:
        key: Any = self.rsa_key if alg.startswith("RS") else self.ec_key
        kid = "forger-rs" if alg.startswith("RS") else "forger-es"
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **header})


@pytest.fixture(scope="module")
def forger() -> Forger:
    return Forger(rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()))


def id_claims(idp: Idp, now: float, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": idp.issuer,
        "sub": "u-0002-suzuki",
        "aud": "tabiji",
        "exp": int(now) + 600,
        "iat": int(now),
        "nonce": "the-nonce",
        "email": "suzuki@town.example.jp",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_well_formed_id_token_from_pinned_keys_verifies(idp: Idp, forger: Forger) -> None:
    """The forging set-up itself is sound: a token with every claim right is accepted."""
    now = time.time()
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks())) as rp:
        claims = await rp.validate_id_token(forger.sign(id_claims(idp, now)), "the-nonce", now)
        es = await rp.validate_id_token(forger.sign(id_claims(idp, now), alg="ES256"), None, now)
    assert claims["sub"] == es["sub"] == "u-0002-suzuki"


FORGED_CASES = [
    # (name, claim changes, expected code, expected jose reason)
    ("expired", {"exp": -120, "iat": -700}, "oidc-id-token-invalid", "token-expired"),
    (
        "iat-in-future",
        {"iat": 3600, "exp": 4200},
        "oidc-id-token-invalid",
        "token-issued-in-future",
    ),
    ("not-yet-valid", {"nbf": 3600}, "oidc-id-token-invalid", "token-not-yet-valid"),
    ("issued-long-ago", {"iat": -3600, "exp": 600}, "oidc-id-token-invalid", "token-old"),
    ("wrong-aud", {"aud": "another-app"}, "oidc-id-token-invalid", "token-wrong-audience"),
    (
        "extra-aud",
        {"aud": ["tabiji", "another-app"], "azp": "tabiji"},
        "oidc-id-token-invalid",
        "token-aud",
    ),
    ("wrong-azp", {"azp": "another-app"}, "oidc-id-token-invalid", "token-azp"),
    ("wrong-iss", {"iss": "https://evil.example"}, "oidc-id-token-invalid", "token-wrong-issuer"),
    ("no-sub", {"sub": None}, "oidc-id-token-invalid", "token-missing-claim"),
    ("no-exp", {"exp": None}, "oidc-id-token-invalid", "token-missing-claim"),
    ("wrong-nonce", {"nonce": "other"}, "oidc-nonce-mismatch", None),
    ("no-nonce", {"nonce": None}, "oidc-nonce-mismatch", None),
]


@pytest.mark.integration
@pytest.mark.anyio
@pytest.mark.parametrize("case", FORGED_CASES, ids=[c[0] for c in FORGED_CASES])
async def test_forged_id_token_claims_are_refused(
    idp: Idp, forger: Forger, case: tuple[str, dict[str, Any], str, str | None]
) -> None:
    """A correctly signed ID token with one claim wrong is refused with a precise reason."""
    name, changes, code, reason = case
    now = time.time()
    times = {"exp", "iat", "nbf"}
    shifted = {k: (int(now) + v if k in times and v is not None else v) for k, v in changes.items()}
    token = forger.sign(id_claims(idp, now, **shifted))
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks())) as rp:
        error = await oidc_error(rp.validate_id_token(token, "the-nonce", now))
    assert (error.code, error.reason) == (code, reason), name


@pytest.mark.integration
@pytest.mark.anyio
async def test_algorithm_outside_the_allow_list_is_refused(idp: Idp, forger: Forger) -> None:
    """An ES256 token is refused by a provider configured for RS256 only, even with a valid key."""
    now = time.time()
    token = forger.sign(id_claims(idp, now), alg="ES256")
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks()), algorithms=("RS256",)) as rp:
        error = await oidc_error(rp.validate_id_token(token, "the-nonce", now))
    assert error.reason == "token-alg-not-allowed"


@pytest.fixture(scope="module")
def real_rs256_key(idp: Idp) -> tuple[str, bytes]:
    """The real provider's RS256 key id and its public key in PEM (what an attacker can fetch)."""
    with idp.http_client() as client:
        jwks = client.get(idp.issuer + "/jwks").json()
    entry = next(k for k in jwks["keys"] if k.get("alg") == "RS256")
    public = jwt.PyJWK(entry).key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return entry["kid"], pem


@pytest.mark.integration
@pytest.mark.anyio
async def test_attacks_against_the_real_jwks_are_refused(
    idp: Idp, forger: Forger, real_rs256_key: tuple[str, bytes]
) -> None:
    """With the provider's real JWKS: alg none, HS256 keyed with the public key, our own key under
    the provider's kid, and an unknown kid are all refused."""
    kid, pem = real_rs256_key
    now = time.time()
    claims = id_claims(idp, now)
    cases = {
        "none": (unsigned_token({"alg": "none", "kid": kid}, claims), "token-alg-not-allowed"),
        "hs256-public-key": (hs256_token(claims, pem, kid), "token-alg-not-allowed"),
        "their-kid-our-key": (
            jwt.encode(claims, forger.rsa_key, algorithm="RS256", headers={"kid": kid}),
            "token-bad-signature",
        ),
        "unknown-kid": (
            jwt.encode(claims, forger.rsa_key, algorithm="RS256", headers={"kid": "not-there"}),
            "token-unknown-kid",
        ),
        "embedded-jwk": (
            jwt.encode(
                claims,
                forger.rsa_key,
                algorithm="RS256",
                headers={"jwk": forger.jwks()["keys"][0], "kid": "forger-rs"},
            ),
            "token-unknown-kid",
        ),
    }
    async with relying_party(idp) as rp:
        for name, (token, reason) in cases.items():
            error = await oidc_error(rp.validate_id_token(token, "the-nonce", now))
            assert (error.code, error.reason) == ("oidc-id-token-invalid", reason), name


@pytest.mark.integration
@pytest.mark.anyio
async def test_real_id_token_outside_its_lifetime_or_for_another_client(idp: Idp) -> None:
    """A genuine ID token is refused after its exp, before its iat, and by another client."""
    async with relying_party(idp) as rp, relying_party(idp, "tabiji-public") as other:
        start, params = await authorize(rp, idp, "suzuki")
        login = await rp.finish(params, start)
        token = login.id_token or ""
        exp, iat = int(login.claims["exp"]), int(login.claims["iat"])
        expired = await oidc_error(rp.validate_id_token(token, start.nonce, exp + 120))
        early = await oidc_error(rp.validate_id_token(token, start.nonce, iat - 3600))
        foreign = await oidc_error(other.validate_id_token(token, start.nonce))
    assert expired.reason == "token-expired"
    assert early.reason == "token-issued-in-future"
    assert foreign.reason == "token-wrong-audience"


# -- refresh ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.anyio
async def test_refresh_and_rejection_after_logout_at_the_provider(idp: Idp) -> None:
    """A refresh returns the same user's facts; once the provider ends the user's sessions and
    grants, the refresh is rejected (oidc-refresh-rejected: end the session)."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "tanaka", otp=idp.user("tanaka").otp)
        refreshed = await rp.refresh(login.refresh_token or "", login)
        assert (refreshed.issuer, refreshed.subject) == (login.issuer, login.subject)
        assert refreshed.groups == login.groups
        assert refreshed.amr == ("pwd", "otp")
        assert refreshed.refresh_token
        assert idp.admin_logout(login.subject, notify=False)["grants"] >= 1
        error = await oidc_error(rp.refresh(refreshed.refresh_token or ""))
    assert error.code == "oidc-refresh-rejected"
    assert error.reason == "invalid_grant"


@pytest.mark.integration
@pytest.mark.anyio
async def test_refresh_with_an_unknown_token_is_rejected(idp: Idp) -> None:
    """A refresh token the provider never issued is rejected, not retried."""
    async with relying_party(idp) as rp:
        error = await oidc_error(rp.refresh("made-up-refresh-token"))
    assert error.code == "oidc-refresh-rejected"


@pytest.mark.integration
@pytest.mark.anyio
async def test_refresh_while_the_provider_is_down_is_transient(idp_ca: Any, tmp_path: Path) -> None:
    """With the provider unreachable, a refresh fails as transient (oidc-refresh-failed), so the
    session is kept and retried rather than ended."""
    provider = start_idp(tmp_path / "idp", idp_ca, name="opdown")
    try:
        async with relying_party(provider) as rp:
            login = await log_in(rp, provider, "suzuki")
            provider.stop()
            error = await oidc_error(rp.refresh(login.refresh_token or ""))
    finally:
        provider.stop()
    assert error.code == "oidc-refresh-failed"


@pytest.mark.integration
@pytest.mark.anyio
async def test_no_login_starts_towards_a_provider_that_is_down(
    idp_ca: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discovery is cached, but a login start asks the provider again (at most every
    REACHABLE_FOR s): once it is down, begin() fails (oidc-discovery-failed, which the login
    endpoint turns into its page) instead of sending the browser to a dead address."""
    from gateway.identity import oidc

    provider = start_idp(tmp_path / "idp", idp_ca, name="opgone")
    try:
        async with relying_party(provider) as rp:
            await rp.begin(time.time())
            provider.stop()
            # Within the window the last answer still counts: no request per login.
            monkeypatch.setattr(oidc, "REACHABLE_FOR", 3600.0)
            await rp.begin(time.time())
            monkeypatch.setattr(oidc, "REACHABLE_FOR", 0.0)
            error = await oidc_error(rp.begin(time.time()))
    finally:
        provider.stop()
    assert error.code == "oidc-discovery-failed"


# -- logout -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.anyio
async def test_rp_initiated_logout_and_its_back_channel_token(
    idp: Idp, idp_logout_receiver: LogoutReceiver
) -> None:
    """end_session_url logs the user out at the provider and returns to our URL with our state;
    the provider's back-channel logout token for that session verifies."""
    async with relying_party(idp) as rp:
        start = await rp.begin(time.time())
        user = idp.user("suzuki")
        with idp.http_client() as browser:
            callback = login_with_httpx(
                browser, start.authorization_url, user.username, user.password
            )
            login = await rp.finish(callback_params(callback), start)
            url = rp.end_session_url(login.id_token, DEFAULT_POST_LOGOUT_URI, "logout-state")
            assert url is not None
            query = dict(parse_qsl(urlsplit(url).query))
            assert query["id_token_hint"] == login.id_token
            assert query["client_id"] == "tabiji"
            seen = len(idp_logout_receiver.tokens)
            final = logout_with_httpx(browser, url)
        assert final.startswith(DEFAULT_POST_LOGOUT_URI)
        assert callback_params(final)["state"] == "logout-state"
        tokens = idp_logout_receiver.wait_for(seen + 1)
        logout = await rp.verify_logout_token(tokens[seen])
    assert (logout.subject, logout.sid) == (login.subject, login.sid)
    assert logout.jti
    assert logout.expires_at > logout.issued_at


@pytest.mark.integration
@pytest.mark.anyio
async def test_admin_logout_at_the_provider_sends_a_verifiable_token(
    idp: Idp, idp_logout_receiver: LogoutReceiver
) -> None:
    """An administrator ending the user's session at the provider sends a logout token that
    verifies and names the session (sid) of our login."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "sato")
        seen = len(idp_logout_receiver.tokens)
        assert idp.admin_logout(login.subject)["notified"]
        tokens = idp_logout_receiver.wait_for(seen + 1)
        logout = await rp.verify_logout_token(tokens[-1])
    assert (logout.subject, logout.sid) == (login.subject, login.sid)


def test_end_session_url_is_none_when_turned_off_or_unknown() -> None:
    """No end_session URL before discovery, or when the operator turned RP-initiated logout off."""
    rp = OidcProvider(_config(end_session=False))
    assert rp.end_session_url("t", "https://gw.example.jp/", "s") is None
    rp = OidcProvider(_config())
    assert rp.end_session_url("t", "https://gw.example.jp/", "s") is None


def logout_claims(idp: Idp, now: float, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": "tabiji",
        "iat": int(now),
        "exp": int(now) + 120,
        "jti": uuid.uuid4().hex,
        "sub": "u-0002-suzuki",
        "sid": "sid-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.integration
@pytest.mark.anyio
async def test_logout_token_without_typ_or_sub_is_accepted(idp: Idp, forger: Forger) -> None:
    """A logout token with typ logout+jwt, or none, and with only sid, is accepted."""
    now = time.time()
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks())) as rp:
        typed = await rp.verify_logout_token(
            forger.sign(logout_claims(idp, now), typ="logout+jwt"), now
        )
        untyped = await rp.verify_logout_token(
            forger.sign(logout_claims(idp, now, sub=None), typ=None), now
        )
    assert typed.subject == "u-0002-suzuki"
    assert (untyped.subject, untyped.sid) == (None, "sid-1")


LOGOUT_CASES = [
    ("no-events", {"events": None}, "token-missing-claim"),
    ("event-not-object", {"events": {BACKCHANNEL_LOGOUT_EVENT: "yes"}}, None),
    ("other-event", {"events": {"http://example.com/other": {}}}, None),
    ("with-nonce", {"nonce": "n"}, None),
    ("wrong-aud", {"aud": "another-app"}, "token-wrong-audience"),
    ("wrong-iss", {"iss": "https://evil.example"}, "token-wrong-issuer"),
    ("no-sub-no-sid", {"sub": None, "sid": None}, None),
    ("no-jti", {"jti": None}, "token-missing-claim"),
    ("expired", {"exp": -60, "iat": -200}, "token-expired"),
    ("old-iat", {"iat": -3600, "exp": 600}, None),
]


@pytest.mark.integration
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "changes", "reason"), LOGOUT_CASES, ids=[c[0] for c in LOGOUT_CASES]
)
async def test_forged_logout_tokens_are_refused(
    idp: Idp, forger: Forger, case: str, changes: dict[str, Any], reason: str | None
) -> None:
    """A logout token breaking Back-Channel Logout 1.0 §2.6 is refused."""
    now = time.time()
    times = {"exp", "iat"}
    shifted = {k: (int(now) + v if k in times else v) for k, v in changes.items()}
    token = forger.sign(logout_claims(idp, now, **shifted), typ="logout+jwt")
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks())) as rp:
        error = await oidc_error(rp.verify_logout_token(token, now))
    assert error.code == "oidc-logout-token-invalid", case
    assert error.reason == reason, case


@pytest.mark.integration
@pytest.mark.anyio
async def test_logout_token_with_another_typ_or_an_id_token_is_refused(
    idp: Idp, forger: Forger
) -> None:
    """A token typed as something else (typ JWT), or a genuine ID token, is no logout token."""
    now = time.time()
    async with relying_party(idp, keys=jose.StaticKeys(forger.jwks())) as rp:
        typed = await oidc_error(
            rp.verify_logout_token(forger.sign(logout_claims(idp, now), typ="JWT"), now)
        )
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, "suzuki")
        id_token = await oidc_error(rp.verify_logout_token(login.id_token or ""))
    assert (typed.code, typed.reason) == ("oidc-logout-token-invalid", "token-wrong-type")
    assert id_token.code == "oidc-logout-token-invalid"


# -- Entra ID group overage ---------------------------------------------------------------------


@dataclass
class FakeGraph:
    """An HTTPS stand-in for Microsoft Graph's memberOf: pages of groups, and what it was sent."""

    origin: str
    authorizations: list[str]
    server: ThreadingHTTPServer


@pytest.fixture
def fake_graph(idp_ca: Any, tmp_path: Path) -> Iterator[FakeGraph]:
    authorizations: list[str] = []
    holder: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            authorizations.append(self.headers.get("Authorization", ""))
            if self.path.startswith("/v1.0/me/memberOf"):
                body = {
                    "value": [{"id": "g-1"}, {"id": "g-2"}],
                    "@odata.nextLink": holder["origin"] + "/page2",
                }
            elif self.path == "/page2":
                body = {"value": [{"id": "g-3"}]}
            elif self.path == "/elsewhere":
                # Another origin (localhost, not 127.0.0.1) that would answer: only the origin
                # check keeps the access token from going there.
                other = holder["origin"].replace("127.0.0.1", "localhost")
                body = {"value": [{"id": "g-1"}], "@odata.nextLink": other + "/page2"}
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    cert, key = idp_ca.issue(["127.0.0.1", "localhost"], tmp_path / "graph")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    holder["origin"] = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield FakeGraph(holder["origin"], authorizations, server)
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.integration
@pytest.mark.anyio
@pytest.mark.parametrize("username", ["overage", "hasgroups"])
async def test_group_overage_is_reported_without_graph(idp: Idp, username: str) -> None:
    """An overage indicator (`_claim_names` for groups, or `hasgroups`) without a Graph lookup
    leaves the flag set and the groups empty (a clear deny reason, never a silent "no groups")."""
    async with relying_party(idp) as rp:
        login = await log_in(rp, idp, username)
    assert login.groups_overage is True
    assert login.groups == frozenset()


@pytest.mark.integration
@pytest.mark.anyio
async def test_group_overage_is_resolved_through_graph(idp: Idp, fake_graph: FakeGraph) -> None:
    """With a Graph URL configured the groups are read page by page with the access token."""
    url = fake_graph.origin + "/v1.0/me/memberOf?$select=id"
    async with relying_party(idp, graph_member_of_url=url) as rp:
        login = await log_in(rp, idp, "overage")
    assert login.groups == frozenset({"g-1", "g-2", "g-3"})
    assert login.groups_overage is False
    assert len(fake_graph.authorizations) == 2
    assert all(a.startswith("Bearer ") and len(a) > 20 for a in fake_graph.authorizations)


@pytest.mark.integration
@pytest.mark.anyio
async def test_graph_next_link_to_another_origin_is_not_followed(
    idp: Idp, fake_graph: FakeGraph
) -> None:
    """A nextLink to another host would receive the access token: it is refused, and the
    overage stays reported."""
    async with relying_party(idp, graph_member_of_url=fake_graph.origin + "/elsewhere") as rp:
        login = await log_in(rp, idp, "overage")
    assert login.groups_overage is True
    assert login.groups == frozenset()
    assert len(fake_graph.authorizations) == 1
