"""gateway.jose: JWT verification against a real JWKS endpoint, with real keys and signatures."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from jwks_server import (
    JwksState,
    b64url,
    ec_key,
    jwks_of,
    make_tls,
    rsa_key,
    serve_jwks,
    unsigned_token,
)

from gateway import jose
from gateway.jose import JwksCache, StaticKeys, TokenInvalid, verify_jwt

ISS = "https://idp.example.test"
AUD = "api://tabiji"
NOW = 1_800_000_000.0


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


async def check(token: str, keys: jose.KeySource, **options: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "keys": keys,
        "issuer": ISS,
        "audiences": [AUD],
        "algorithms": ["ES256", "RS256", "PS256"],
        "now": NOW,
    }
    arguments.update(options)
    return await verify_jwt(token, **arguments)


async def refused(token: str, keys: jose.KeySource, **options: Any) -> str:
    with pytest.raises(TokenInvalid) as caught:
        await check(token, keys, **options)
    return caught.value.code


class Clock:
    """A monotonic clock the test moves by hand (rate limits without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- claims and signatures ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_valid_es256_token_verifies_and_returns_claims() -> None:
    """A correctly signed token with good claims returns its claims."""
    key = ec_key()
    result = await check(key.sign(claims(email="a@example.test")), StaticKeys(jwks_of(key)))
    assert result["sub"] == "user-1"
    assert result["email"] == "a@example.test"


@pytest.mark.anyio
async def test_rsa_key_without_alg_verifies_rs256_and_ps256() -> None:
    """A JWKS RSA key without `alg` verifies RS256 and PS256 tokens (alg from the allow-list)."""
    key = rsa_key()
    keys = StaticKeys(jwks_of(key, with_alg=False))
    assert (await check(key.sign(claims()), keys))["sub"] == "user-1"
    ps = rsa_key("rsa-1", "PS256")
    ps_keys = StaticKeys(jwks_of(ps, with_alg=False))
    assert (await check(ps.sign(claims()), ps_keys))["sub"] == "user-1"


@pytest.mark.anyio
async def test_key_with_declared_alg_refuses_other_alg() -> None:
    """A JWK that declares RS256 is not used for a PS256 token with the same kid."""
    key = rsa_key()
    ps_token = rsa_key("rsa-1", "PS256").sign(claims())
    assert await refused(ps_token, StaticKeys(jwks_of(key))) == "token-unknown-kid"


@pytest.mark.anyio
async def test_expired_token_refused_but_leeway_applies() -> None:
    """exp in the past beyond the leeway is token-expired; within the leeway it passes."""
    key = ec_key()
    keys = StaticKeys(jwks_of(key))
    assert await refused(key.sign(claims(exp=int(NOW) - 31)), keys) == "token-expired"
    assert (await check(key.sign(claims(exp=int(NOW) - 10)), keys))["sub"] == "user-1"
    assert await refused(key.sign(claims(exp=int(NOW) - 10)), keys, leeway=0) == "token-expired"


@pytest.mark.anyio
async def test_not_yet_valid_token_refused() -> None:
    """nbf beyond now + leeway is token-not-yet-valid."""
    key = ec_key()
    token = key.sign(claims(nbf=int(NOW) + 120))
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-not-yet-valid"


@pytest.mark.anyio
async def test_issued_in_future_refused() -> None:
    """iat beyond now + leeway is token-issued-in-future."""
    key = ec_key()
    token = key.sign(claims(iat=int(NOW) + 120))
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-issued-in-future"


@pytest.mark.anyio
async def test_numeric_dates_must_be_numbers() -> None:
    """An exp given as a string is token-claim-invalid, not coerced."""
    key = ec_key()
    token = key.sign(claims(exp=str(int(NOW) + 300)))
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-claim-invalid"


@pytest.mark.anyio
async def test_wrong_audience_refused_and_any_configured_audience_accepted() -> None:
    """aud must contain one of the configured audiences."""
    key = ec_key()
    keys = StaticKeys(jwks_of(key))
    assert await refused(key.sign(claims(aud="api://other")), keys) == "token-wrong-audience"
    token = key.sign(claims(aud=["api://other", "api://second"]))
    result = await check(token, keys, audiences=[AUD, "api://second"])
    assert result["sub"] == "user-1"


@pytest.mark.anyio
async def test_wrong_issuer_refused() -> None:
    """iss must equal the configured issuer exactly."""
    key = ec_key()
    token = key.sign(claims(iss=ISS + "/"))
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-wrong-issuer"


@pytest.mark.anyio
async def test_missing_required_claim_refused() -> None:
    """A token without sub (required by default) is token-missing-claim."""
    key = ec_key()
    token = key.sign(claims(sub=None))
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-missing-claim"


@pytest.mark.anyio
async def test_tampered_payload_is_bad_signature() -> None:
    """Changing one claim after signing breaks the signature."""
    key = ec_key()
    head, _, signature = key.sign(claims()).split(".")
    forged = f"{head}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert await refused(forged, StaticKeys(jwks_of(key))) == "token-bad-signature"


@pytest.mark.anyio
async def test_garbage_is_malformed() -> None:
    """Something that is not a JWS compact serialisation is token-malformed."""
    assert await refused("not.a.token", StaticKeys({"keys": []})) == "token-malformed"
    assert await refused("nodots", StaticKeys({"keys": []})) == "token-malformed"
    numeric_kid = unsigned_token(claims(), {"alg": "ES256", "kid": 7})
    assert await refused(numeric_kid, StaticKeys({"keys": []})) == "token-malformed"


@pytest.mark.anyio
async def test_critical_header_extension_refused() -> None:
    """A `crit` header (an extension we do not implement) is refused (RFC 7515 §4.1.11)."""
    key = ec_key()
    token = key.sign(claims(), crit=["exp"])
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-malformed"


# --- algorithm confusion and header-supplied keys -----------------------------------------------


@pytest.mark.anyio
async def test_alg_none_refused_even_if_allowed() -> None:
    """alg none is refused before any key is looked up, even if the caller lists it."""
    key = ec_key()
    token = unsigned_token(claims(), {"alg": "none", "kid": key.kid})
    code = await refused(token, StaticKeys(jwks_of(key)), algorithms=["none", "ES256"])
    assert code == "token-alg-not-allowed"
    token = unsigned_token(claims(), {"kid": key.kid})
    assert await refused(token, StaticKeys(jwks_of(key))) == "token-alg-not-allowed"


def _hs256(claim_set: dict[str, Any], secret: bytes, kid: str) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claim_set).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


@pytest.mark.anyio
@pytest.mark.parametrize("make", [ec_key, rsa_key])
async def test_hs256_signed_with_the_public_key_refused(make: Any) -> None:
    """An HS256 token whose HMAC secret is the public key (PEM or JWK JSON) is refused."""
    key = make()
    keys = StaticKeys(jwks_of(key))
    allow = ["HS256", "ES256", "RS256"]
    for secret in (key.public_pem(), json.dumps(key.jwk()).encode()):
        code = await refused(_hs256(claims(), secret, key.kid), keys, algorithms=allow)
        assert code == "token-alg-not-allowed"


@pytest.mark.anyio
async def test_symmetric_key_in_jwks_is_never_used() -> None:
    """An `oct` key published in a JWKS is skipped, so HS256 has nothing to verify with."""
    key = ec_key()
    document = jwks_of(key)
    document["keys"].append({"kty": "oct", "kid": "hmac", "k": b64url(b"secret")})
    keys = StaticKeys(document)
    assert keys.cached_key("hmac", "HS256") is None
    assert (await check(key.sign(claims()), keys))["sub"] == "user-1"


@pytest.mark.anyio
async def test_header_jwk_is_ignored() -> None:
    """A token carrying the attacker's key in `jwk` and the real kid is a bad signature."""
    real, attacker = ec_key("ec-1"), ec_key("ec-1")
    token = attacker.sign(claims(sub="admin"), jwk=attacker.jwk())
    assert await refused(token, StaticKeys(jwks_of(real))) == "token-bad-signature"


@pytest.mark.anyio
async def test_header_jku_and_x5u_are_never_fetched() -> None:
    """`jku`/`x5u` naming the attacker's JWKS are ignored: unknown kid, attacker never fetched."""
    real, attacker = ec_key("ec-1"), ec_key("evil")
    with (
        serve_jwks(JwksState(jwks_of(attacker))) as evil,
        serve_jwks(JwksState(jwks_of(real))) as idp,
    ):
        token = attacker.sign(claims(sub="admin"), jku=evil.url, x5u=evil.url)
        cache = JwksCache(idp.url, ssl_context=None)
        assert await refused(token, cache) == "token-unknown-kid"
        assert evil.state.fetches == 0
        assert idp.state.fetches == 1


@pytest.mark.anyio
async def test_header_x5c_is_ignored_without_kid() -> None:
    """A kid-less token with an `x5c` chain is verified only against our keys (two: ambiguous)."""
    real, other, attacker = ec_key("a"), ec_key("b"), ec_key("x")
    token = attacker.sign(claims(), kid=None, x5c=["MIIB"])
    assert await refused(token, StaticKeys(jwks_of(real, other))) == "token-unknown-kid"
    # With a single key, a kid-less token is checked against that key: still not the attacker's.
    assert await refused(token, StaticKeys(jwks_of(real))) == "token-bad-signature"
    good = real.sign(claims(), kid=None)
    assert (await check(good, StaticKeys(jwks_of(real))))["sub"] == "user-1"


@pytest.mark.anyio
async def test_encryption_key_is_not_used_for_verification() -> None:
    """A JWK with use=enc (or key_ops without verify) never verifies."""
    key = ec_key()
    keys = StaticKeys({"keys": [key.jwk(use="enc")]})
    assert await refused(key.sign(claims()), keys) == "token-unknown-kid"
    keys = StaticKeys({"keys": [key.jwk(key_ops=["encrypt"])]})
    assert await refused(key.sign(claims()), keys) == "token-unknown-kid"


def test_private_members_of_a_jwk_are_dropped() -> None:
    """A JWKS that leaks `d` still yields a public key object."""
    key = ec_key()
    leaky = key.jwk(d=b64url(key.private.private_numbers().private_value.to_bytes(32, "big")))
    parsed = StaticKeys({"keys": [leaky]}).cached_key(key.kid, "ES256")
    assert parsed is not None
    assert not hasattr(parsed.key, "private_numbers")


# --- typ ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_typ_checked_when_expected() -> None:
    """With expected_typ, a token of another typ is refused; case and application/ don't matter."""
    key = ec_key()
    keys = StaticKeys(jwks_of(key))
    expected = {"at+jwt"}
    code = await refused(key.sign(claims(), typ="JWT"), keys, expected_typ=expected)
    assert code == "token-wrong-type"
    assert await refused(key.sign(claims()), keys, expected_typ=expected) == "token-wrong-type"
    token = key.sign(claims(), typ="application/AT+JWT")
    assert (await check(token, keys, expected_typ=expected))["sub"] == "user-1"


# --- the JWKS cache against a real endpoint ----------------------------------------------------


@pytest.mark.anyio
async def test_unknown_kid_refetches_once_then_rate_limited() -> None:
    """An unknown kid causes one refetch; another within the interval does not; later it does."""
    key, stranger = ec_key("ec-1"), ec_key("ec-2")
    clock = Clock()
    with serve_jwks(JwksState(jwks_of(key))) as server:
        cache = JwksCache(server.url, ssl_context=None, min_refetch_interval=30, clock=clock)
        assert (await check(key.sign(claims()), cache))["sub"] == "user-1"
        assert server.state.fetches == 1
        assert (await check(key.sign(claims()), cache))["sub"] == "user-1"
        assert server.state.fetches == 1  # known kid: no fetch
        clock.now += 31
        assert await refused(stranger.sign(claims()), cache) == "token-unknown-kid"
        assert server.state.fetches == 2  # exactly one refetch
        clock.now += 5
        assert await refused(ec_key("ec-3").sign(claims()), cache) == "token-unknown-kid"
        assert server.state.fetches == 2  # rate-limited
        clock.now += 30
        assert await refused(ec_key("ec-4").sign(claims()), cache) == "token-unknown-kid"
        assert server.state.fetches == 3


@pytest.mark.anyio
async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    """Concurrent requests needing keys share one fetch and all see its result."""
    key = ec_key()
    with serve_jwks(JwksState(jwks_of(key))) as server:
        cache = JwksCache(server.url, ssl_context=None)
        tokens = [key.sign(claims(sub=f"u-{n}")) for n in range(6)]
        tokens += [ec_key(f"stranger-{n}").sign(claims()) for n in range(3)]
        results = await asyncio.gather(
            *(check(token, cache) for token in tokens), return_exceptions=True
        )
        assert [r["sub"] for r in results[:6] if isinstance(r, dict)] == [
            f"u-{n}" for n in range(6)
        ]
        assert all(
            isinstance(r, TokenInvalid) and r.code == "token-unknown-kid" for r in results[6:]
        )
        assert server.state.fetches == 1


@pytest.mark.anyio
async def test_key_rotation_at_the_provider_is_picked_up() -> None:
    """A new key published by the provider verifies after one refetch; a withdrawn one expires."""
    old, new = ec_key("old"), ec_key("new")
    clock = Clock()
    with serve_jwks(JwksState(jwks_of(old))) as server:
        cache = JwksCache(server.url, ssl_context=None, max_age=600, clock=clock)
        assert (await check(old.sign(claims()), cache))["sub"] == "user-1"
        server.state.document = jwks_of(new)
        clock.now += 31
        assert (await check(new.sign(claims()), cache))["sub"] == "user-1"
        assert server.state.fetches == 2
        # The old key was withdrawn; once the set is older than max_age it is fetched again.
        clock.now += 601
        assert await refused(old.sign(claims()), cache) == "token-unknown-kid"
        assert server.state.fetches == 3


@pytest.mark.anyio
async def test_stale_keys_kept_when_provider_is_down() -> None:
    """When the refetch after max_age fails, the known keys keep verifying."""
    key = ec_key()
    clock = Clock()
    with serve_jwks(JwksState(jwks_of(key))) as server:
        cache = JwksCache(server.url, ssl_context=None, max_age=600, clock=clock)
        assert (await check(key.sign(claims()), cache))["sub"] == "user-1"
        server.state.status = 503
        clock.now += 601
        assert (await check(key.sign(claims()), cache))["sub"] == "user-1"
        assert server.state.fetches == 2


@pytest.mark.anyio
async def test_unreachable_jwks_is_keys_unavailable() -> None:
    """No key set at all (endpoint errors) is token-keys-unavailable, not unknown kid."""
    key = ec_key()
    with serve_jwks(JwksState(jwks_of(key), status=500)) as server:
        cache = JwksCache(server.url, ssl_context=None)
        assert await refused(key.sign(claims()), cache) == "token-keys-unavailable"
        with pytest.raises(TokenInvalid) as caught:
            await cache.refresh()
        assert caught.value.code == "token-keys-unavailable"


@pytest.mark.anyio
async def test_jwks_redirect_not_followed() -> None:
    """A redirecting JWKS endpoint is not followed, even to a server with the right keys."""
    key = ec_key()
    with (
        serve_jwks(JwksState(jwks_of(key))) as target,
        serve_jwks(JwksState(location=target.url)) as redirecting,
    ):
        cache = JwksCache(redirecting.url, ssl_context=None)
        assert await refused(key.sign(claims()), cache) == "token-keys-unavailable"
        assert target.state.fetches == 0


@pytest.mark.anyio
async def test_jwks_over_tls_verified_with_the_given_ca(tmp_path: Path) -> None:
    """Over HTTPS the endpoint is verified with the given context; the system store refuses it."""
    key = ec_key()
    server_context, client_context = make_tls(tmp_path)
    with serve_jwks(JwksState(jwks_of(key)), ssl_context=server_context) as server:
        trusted = JwksCache(server.url, ssl_context=client_context)
        assert (await check(key.sign(claims()), trusted))["sub"] == "user-1"
        untrusted = JwksCache(server.url, ssl_context=None)
        assert await refused(key.sign(claims()), untrusted) == "token-keys-unavailable"


@pytest.mark.anyio
async def test_string_allow_lists_are_refused() -> None:
    """A single string as algorithms or audiences is a programming error, not a substring match."""
    key = ec_key()
    with pytest.raises(TypeError):
        await check(key.sign(claims()), StaticKeys(jwks_of(key)), algorithms="RS256,ES256")
    with pytest.raises(ValueError, match="audience"):
        await check(key.sign(claims(aud="a")), StaticKeys(jwks_of(key)), audiences="api")


def test_plain_http_jwks_only_on_loopback() -> None:
    """A JWKS URI over plain http is refused unless the host is loopback."""
    with pytest.raises(ValueError, match="https"):
        JwksCache("http://idp.example.test/jwks", ssl_context=None)
    JwksCache("http://127.0.0.1:1/jwks", ssl_context=None)
    JwksCache("https://idp.example.test/jwks", ssl_context=None)


# --- our own keys ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sign_and_public_jwk_roundtrip() -> None:
    """sign_jwt output verifies against es256_public_jwk, which has no private member."""
    private = jose.generate_es256_key()
    kid = jose.jwk_thumbprint(private)
    jwk = jose.es256_public_jwk(private, kid)
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    token = jose.sign_jwt(claims(), private, kid)
    assert (await check(token, StaticKeys({"keys": [jwk]})))["sub"] == "user-1"
    reloaded = jose.load_es256_pem(jose.es256_key_to_pem(private))
    assert jose.jwk_thumbprint(reloaded) == kid != jose.jwk_thumbprint(jose.generate_es256_key())


def test_load_es256_pem_refuses_other_keys() -> None:
    """An RSA PEM is not an ES256 key."""
    from cryptography.hazmat.primitives import serialization

    pem = rsa_key().private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="P-256"):
        jose.load_es256_pem(pem)


def test_wall_clock_used_without_now() -> None:
    """Without `now`, the wall clock decides (a token valid now verifies)."""
    key = ec_key()
    current = int(time.time())
    token = key.sign(claims(iat=current, exp=current + 60))
    result = asyncio.run(
        verify_jwt(
            token,
            keys=StaticKeys(jwks_of(key)),
            issuer=ISS,
            audiences=[AUD],
            algorithms=["ES256"],
        )
    )
    assert result["exp"] == current + 60
