"""gateway.identity.tokens: bearer JWTs from configured issuers -> Identities, cached until exp."""

from __future__ import annotations

from typing import Any

import pytest
from jwks_server import JwksState, SigningKey, ec_key, jwks_of, rsa_key, serve_jwks

from gateway.identity.tokens import BearerIssuer, BearerVerifier
from gateway.jose import JwksCache, KeySource, StaticKeys, TokenInvalid

STAFF = "https://login.example.test/tenant/v2.0"
PARTNER = "https://accounts.partner.example.test"
NOW = 1_800_000_000.0


def issuer(keys: KeySource, iss: str = STAFF, name: str = "town", **changes: Any) -> BearerIssuer:
    settings: dict[str, Any] = {
        "name": name,
        "issuer": iss,
        "audiences": ("api://tabiji",),
        "keys": keys,
        "algorithms": ("ES256", "RS256"),
    }
    settings.update(changes)
    return BearerIssuer(**settings)


def token(key: SigningKey, iss: str = STAFF, **changes: Any) -> str:
    claims: dict[str, Any] = {
        "iss": iss,
        "aud": "api://tabiji",
        "sub": "u-1",
        "iat": int(NOW) - 5,
        "exp": int(NOW) + 600,
        "email": "sato@town.example.test",
        "email_verified": True,
        "name": "佐藤 花子",
        "groups": ["staff", "finance"],
        "amr": ["pwd", "mfa"],
        "acr": "urn:town:mfa",
        "sid": "idp-session-7",
    }
    claims.update(changes)
    return key.sign({k: v for k, v in claims.items() if v is not None})


async def code_of(verifier: BearerVerifier, value: str, now: float = NOW) -> str:
    with pytest.raises(TokenInvalid) as caught:
        await verifier.verify(value, now)
    return caught.value.code


@pytest.mark.anyio
async def test_valid_token_becomes_identity() -> None:
    """Every identity fact comes from the verified claims; method is bearer."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    identity = await verifier.verify(token(key), NOW)
    assert identity.key == (STAFF, "u-1")
    assert identity.method == "bearer"
    assert identity.provider == "town"
    assert identity.email == "sato@town.example.test"
    assert identity.email_verified is True
    assert identity.name == "佐藤 花子"
    assert identity.groups == {"staff", "finance"}
    assert identity.groups_overage is False
    assert identity.amr == {"pwd", "mfa"}
    assert identity.acr == "urn:town:mfa"
    assert identity.idp_sid == "idp-session-7"
    assert identity.session_hash is None
    assert identity.expires_at == int(NOW) + 600
    assert identity.claims["sub"] == "u-1"


@pytest.mark.anyio
async def test_issuer_chosen_by_iss_and_then_verified_for_real() -> None:
    """Two issuers: each token verifies with its own keys; claiming the other's iss fails."""
    staff_key, partner_key = ec_key("staff"), rsa_key("partner")
    verifier = BearerVerifier(
        [
            issuer(StaticKeys(jwks_of(staff_key))),
            issuer(StaticKeys(jwks_of(partner_key)), iss=PARTNER, name="partner"),
        ]
    )
    assert (await verifier.verify(token(partner_key, iss=PARTNER), NOW)).provider == "partner"
    assert (await verifier.verify(token(staff_key), NOW)).provider == "town"
    # The partner's key signing a token that claims to be from the town's issuer.
    assert await code_of(verifier, token(partner_key, iss=STAFF)) == "token-unknown-kid"
    impostor = ec_key("staff")  # same kid as the town's key, different key
    assert await code_of(verifier, token(impostor)) == "token-bad-signature"


@pytest.mark.anyio
async def test_unknown_issuer_refused_without_fetching() -> None:
    """A token from an issuer that is not configured is refused and fetches no keys."""
    key = ec_key()
    with serve_jwks(JwksState(jwks_of(key))) as server:
        verifier = BearerVerifier([issuer(JwksCache(server.url, ssl_context=None))])
        assert await code_of(verifier, token(key, iss="https://evil.example")) == (
            "token-wrong-issuer"
        )
        assert await code_of(verifier, "a.b.c") == "token-malformed"
        assert server.state.fetches == 0
        assert (await verifier.verify(token(key), NOW)).subject == "u-1"
        assert server.state.fetches == 1


@pytest.mark.anyio
async def test_cache_returns_same_identity_without_verifying_again() -> None:
    """A repeated token is a cache hit: the same Identity object, no second verification."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    value = token(key)
    first = await verifier.verify(value, NOW)
    second = await verifier.verify(value, NOW + 10)
    assert second is first
    assert verifier.cached(value, NOW + 20) is first
    assert verifier.verifications == 1
    assert verifier.cached(token(key, sub="u-2"), NOW) is None


@pytest.mark.anyio
async def test_cache_drops_expired_identity() -> None:
    """Past exp the cached identity is never returned; verifying again says expired."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)), leeway=0.0)])
    value = token(key, exp=int(NOW) + 60)
    await verifier.verify(value, NOW)
    assert verifier.cached(value, NOW + 59) is not None
    assert verifier.cached(value, NOW + 60) is None
    assert await code_of(verifier, value, NOW + 61) == "token-expired"
    assert verifier.verifications == 2


@pytest.mark.anyio
async def test_cache_is_bounded() -> None:
    """Beyond cache_size the oldest entry is evicted."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))], cache_size=2)
    tokens = [token(key, sub=f"u-{n}") for n in range(3)]
    for value in tokens:
        await verifier.verify(value, NOW)
    assert verifier.cached(tokens[0], NOW) is None
    assert verifier.cached(tokens[1], NOW) is not None
    assert verifier.cached(tokens[2], NOW) is not None


@pytest.mark.anyio
async def test_groups_claim_must_be_a_list_of_strings() -> None:
    """A groups claim that is not a list of strings is token-claim-invalid, never guessed."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    assert await code_of(verifier, token(key, groups="staff")) == "token-claim-invalid"
    assert await code_of(verifier, token(key, groups=["staff", 7])) == "token-claim-invalid"
    assert await code_of(verifier, token(key, amr="mfa")) == "token-claim-invalid"


@pytest.mark.anyio
async def test_configured_groups_claim_is_used() -> None:
    """groups_claim names the claim groups come from."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)), groups_claim="roles")])
    identity = await verifier.verify(token(key, roles=["clerk"]), NOW)
    assert identity.groups == {"clerk"}


@pytest.mark.anyio
async def test_entra_group_overage_flagged() -> None:
    """_claim_names.groups or hasgroups=true marks the groups as incomplete (Entra ID overage)."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    overage = token(key, groups=None, _claim_names={"groups": "src1"}, _claim_sources={})
    identity = await verifier.verify(overage, NOW)
    assert identity.groups_overage is True
    assert identity.groups == frozenset()
    implicit = await verifier.verify(token(key, groups=None, hasgroups=True), NOW)
    assert implicit.groups_overage is True
    plain = await verifier.verify(token(key, groups=None), NOW)
    assert plain.groups_overage is False


@pytest.mark.anyio
async def test_email_verified_only_when_json_true() -> None:
    """email_verified given as the string "true" does not count as verified."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    assert (await verifier.verify(token(key, email_verified="true"), NOW)).email_verified is False


@pytest.mark.anyio
async def test_bearer_typ_defaults_refuse_logout_tokens() -> None:
    """By default no typ, JWT or at+jwt pass, a logout+jwt does not; expected_typ narrows it."""
    key = ec_key()
    verifier = BearerVerifier([issuer(StaticKeys(jwks_of(key)))])
    untyped = key.sign(_claims_with(), typ=None)
    assert (await verifier.verify(untyped, NOW)).subject == "u-1"
    at = key.sign(_claims_with(), typ="at+jwt")
    assert (await verifier.verify(at, NOW)).subject == "u-1"
    logout = key.sign(_claims_with(), typ="logout+jwt")
    assert await code_of(verifier, logout) == "token-wrong-type"
    strict = BearerVerifier([issuer(StaticKeys(jwks_of(key)), expected_typ=frozenset({"at+jwt"}))])
    assert await code_of(strict, token(key)) == "token-wrong-type"
    assert (await strict.verify(at, NOW)).subject == "u-1"


def _claims_with() -> dict[str, Any]:
    return {
        "iss": STAFF,
        "aud": "api://tabiji",
        "sub": "u-1",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
    }


def test_issuer_config_refuses_symmetric_or_empty_allow_lists() -> None:
    """HS256/none in the allow-list, no audience, or exp not required are configuration errors."""
    keys = StaticKeys({"keys": []})
    with pytest.raises(ValueError, match="never none or HS"):
        issuer(keys, algorithms=("HS256", "RS256"))
    with pytest.raises(ValueError, match="never none or HS"):
        issuer(keys, algorithms=())
    with pytest.raises(ValueError, match="audience"):
        issuer(keys, audiences=())
    with pytest.raises(ValueError, match="exp"):
        issuer(keys, required=("iss", "sub"))
    with pytest.raises(ValueError, match="twice"):
        BearerVerifier([issuer(keys), issuer(keys, name="again")])
