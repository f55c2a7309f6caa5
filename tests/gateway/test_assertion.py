"""gateway.assertion: the signed identity assertion, its reuse, its keys' rotation and files."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwks_server import JwksState, serve_jwks

from gateway.assertion import (
    UPSTREAM_EXAMPLE,
    AssertionKeyRing,
    AssertionMinter,
    KeyRingError,
    convenience_headers,
)
from gateway.identity.model import Identity

GATEWAY = "https://gateway.town.example.test"
APP = "https://app.town.example.test"
T0 = 1_800_000_000.0


def make_identity(**changes: Any) -> Identity:
    facts: dict[str, Any] = {
        "issuer": "https://login.example.test/tenant/v2.0",
        "subject": "u-1",
        "method": "session",
        "provider": "town",
        "email": "sato@town.example.test",
        "email_verified": True,
        "name": "佐藤 花子",
        "groups": frozenset({"staff", "finance"}),
        "amr": frozenset({"pwd", "mfa"}),
        "session_hash": "ab" * 32,
        "expires_at": T0 + 3600,
    }
    facts.update(changes)
    return Identity(**facts)


@pytest.fixture
def ring(tmp_path: Path) -> AssertionKeyRing:
    keys = AssertionKeyRing(tmp_path / "keys")
    keys.ensure(T0)
    return keys


def decode(token: str, ring: AssertionKeyRing, now: float, audience: str = APP) -> dict[str, Any]:
    """Verify like an upstream would: the published JWKS, ES256 only, iss and aud."""
    header = jwt.get_unverified_header(token)
    jwk = next(k for k in ring.jwks(now)["keys"] if k["kid"] == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=["ES256"],
        issuer=GATEWAY,
        audience=audience,
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims


def test_assertion_claims_are_exact(ring: AssertionKeyRing) -> None:
    """The claims are exactly the documented set, lists sorted, signed ES256 with the ring's kid."""
    minter = AssertionMinter(ring, GATEWAY)
    token = minter.mint(make_identity(), APP, T0 + 0.7, device_id="dev-9", device_trust="managed")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": ring.signing_key(T0).kid}
    claims = decode(token, ring, T0)
    jti = claims.pop("jti")
    assert isinstance(jti, str)
    assert len(jti) >= 20
    assert claims == {
        "iss": GATEWAY,
        "aud": APP,
        "idp": "https://login.example.test/tenant/v2.0",
        "sub": "u-1",
        "email": "sato@town.example.test",
        "email_verified": True,
        "name": "佐藤 花子",
        "groups": ["finance", "staff"],
        "amr": ["mfa", "pwd"],
        "sid": "ab" * 32,
        "device_id": "dev-9",
        "device_trust": "managed",
        "iat": int(T0),
        "exp": int(T0) + 120,
    }


def test_lifetime_at_most_five_minutes(ring: AssertionKeyRing) -> None:
    """A lifetime over 300 s is refused; exp - iat equals the configured lifetime."""
    with pytest.raises(ValueError, match="lifetime"):
        AssertionMinter(ring, GATEWAY, lifetime=301)
    minter = AssertionMinter(ring, GATEWAY, lifetime=300, reuse_margin=60)
    claims = decode(minter.mint(make_identity(), APP, T0), ring, T0)
    assert claims["exp"] - claims["iat"] == 300


def test_exp_capped_by_identity_and_expired_identity_refused(ring: AssertionKeyRing) -> None:
    """An assertion never outlives the identity; an expired identity gets none."""
    minter = AssertionMinter(ring, GATEWAY)
    identity = make_identity(expires_at=T0 + 45)
    token = minter.mint(identity, APP, T0)
    assert decode(token, ring, T0)["exp"] == int(T0) + 45
    # Capped: a new one could be no longer, so it is reused until the identity ends.
    assert minter.mint(identity, APP, T0 + 40) == token
    with pytest.raises(ValueError, match="expired"):
        minter.mint(identity, APP, T0 + 45)
    with pytest.raises(ValueError, match="expired"):
        minter.mint(make_identity(expires_at=0.0), APP, T0)


def test_assertion_reused_within_margin_and_renewed_after(ring: AssertionKeyRing) -> None:
    """The same assertion is returned until exp - reuse_margin; after that a new one is signed."""
    minter = AssertionMinter(ring, GATEWAY, lifetime=120, reuse_margin=30)
    identity = make_identity()
    first = minter.mint(identity, APP, T0)
    assert minter.mint(identity, APP, T0 + 89) == first
    assert minter.signatures == 1
    renewed = minter.mint(identity, APP, T0 + 90)
    assert renewed != first
    assert decode(renewed, ring, T0)["iat"] == int(T0) + 90
    assert minter.signatures == 2


def test_assertion_not_shared_across_audiences_or_facts(ring: AssertionKeyRing) -> None:
    """Another route, device trust, group set or user gets its own assertion."""
    minter = AssertionMinter(ring, GATEWAY)
    identity = make_identity()
    base = minter.mint(identity, APP, T0)
    other_app = minter.mint(identity, "https://mail.town.example.test", T0)
    assert decode(other_app, ring, T0, "https://mail.town.example.test")["sub"] == "u-1"
    trusted = minter.mint(identity, APP, T0, device_trust="managed")
    regrouped = minter.mint(make_identity(groups=frozenset({"staff"})), APP, T0)
    bearer = minter.mint(make_identity(method="bearer", session_hash=None), APP, T0)
    assert len({base, other_app, trusted, regrouped, bearer}) == 5
    assert decode(regrouped, ring, T0)["groups"] == ["staff"]
    assert decode(bearer, ring, T0)["sid"] is None


def test_identity_end_caps_reuse_but_does_not_split_the_cache(ring: AssertionKeyRing) -> None:
    """A later identity end (idle timeout) reuses the assertion; an earlier one gets a new one."""
    minter = AssertionMinter(ring, GATEWAY)
    first = minter.mint(make_identity(expires_at=T0 + 3600), APP, T0)
    assert minter.mint(make_identity(expires_at=T0 + 3700), APP, T0 + 10) == first
    shorter = minter.mint(make_identity(expires_at=T0 + 60), APP, T0 + 20)
    assert shorter != first
    assert decode(shorter, ring, T0)["exp"] == int(T0) + 60


def test_upstream_example_verifies_a_real_assertion(tmp_path: Path) -> None:
    """The README's upstream example, run as written against a served JWKS, accepts it."""
    ring = AssertionKeyRing(tmp_path / "keys")
    ring.ensure(time.time())
    state = JwksState(ring.jwks(time.time()))
    with serve_jwks(state) as server:
        gateway_url = server.url.removesuffix("/jwks.json")
        minter = AssertionMinter(ring, gateway_url)
        token = minter.mint(make_identity(expires_at=time.time() + 600), APP, time.time())
        code = UPSTREAM_EXAMPLE.replace("https://gateway.town.example", gateway_url)
        code = code.replace("https://app.town.example", APP)
        namespace: dict[str, Any] = {}
        exec(compile(code, "upstream_example", "exec"), namespace)  # noqa: S102 -- runs the documented snippet
        user = namespace["user_from"]({"X-Tabiji-Assertion": token})
        assert user == (
            ("https://login.example.test/tenant/v2.0", "u-1"),
            "sato@town.example.test",
            {"staff", "finance"},
        )
        other = AssertionMinter(ring, gateway_url).mint(
            make_identity(), "https://evil.example", time.time()
        )
        with pytest.raises(jwt.InvalidAudienceError):
            namespace["user_from"]({"X-Tabiji-Assertion": other})
        assert state.fetches == 1


def test_device_id_defaults_to_the_identitys(ring: AssertionKeyRing) -> None:
    """Without a device_id argument the identity's bound device is asserted."""
    minter = AssertionMinter(ring, GATEWAY)
    token = minter.mint(make_identity(device_id="dev-3"), APP, T0)
    assert decode(token, ring, T0)["device_id"] == "dev-3"


# --- the key ring -----------------------------------------------------------------------------


def test_files_are_private(ring: AssertionKeyRing) -> None:
    """The directory is 0700 and every key file 0600."""
    assert stat.S_IMODE(ring.directory.stat().st_mode) == 0o700
    pems = list(ring.directory.glob("*.pem"))
    assert [p.stem for p in pems] == [ring.signing_key(T0).kid]
    for path in pems:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_jwks_has_only_public_parts(ring: AssertionKeyRing) -> None:
    """The published JWKS holds EC public keys only: no `d`, alg ES256, use sig."""
    ring.rotate(T0 + 10)
    document = ring.jwks(T0 + 10)
    assert len(document["keys"]) == 2
    for key in document["keys"]:
        assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "PRIVATE" not in json.dumps(document)


def test_rotation_timeline(ring: AssertionKeyRing) -> None:
    """Publish ahead, switch at activation, keep the old key published, then delete it."""
    old = ring.signing_key(T0).kid
    minter = AssertionMinter(ring, GATEWAY)
    before = minter.mint(make_identity(), APP, T0 + 100)
    new = ring.rotate(T0 + 100, publish_ahead=600, keep=900).kid

    def kids(now: float) -> set[str]:
        return {k["kid"] for k in ring.jwks(now)["keys"]}

    # Published ahead: upstreams can see the new key before anything is signed with it.
    assert kids(T0 + 101) == {old, new}
    assert ring.signing_key(T0 + 699).kid == old
    assert minter.mint(make_identity(), APP, T0 + 110) == before
    # Activation: the new key signs; a cached assertion under the old key is not reused.
    assert ring.signing_key(T0 + 700).kid == new
    after = minter.mint(make_identity(), APP, T0 + 700)
    assert jwt.get_unverified_header(after)["kid"] == new
    # The old key stays published while its assertions may still be valid.
    assert kids(T0 + 700 + 899) == {old, new}
    assert kids(T0 + 700 + 900) == {new}
    assert (ring.directory / f"{old}.pem").exists()
    assert ring.prune(T0 + 1600) == [old]
    assert not (ring.directory / f"{old}.pem").exists()
    assert [key.kid for key in ring.keys] == [new]


def test_cached_assertion_not_reused_across_a_key_change(ring: AssertionKeyRing) -> None:
    """When the new key activates, a still-fresh cached assertion is replaced by one it signs."""
    minter = AssertionMinter(ring, GATEWAY, lifetime=120, reuse_margin=30)
    before = minter.mint(make_identity(), APP, T0 + 100)
    new = ring.rotate(T0 + 100, publish_ahead=60).kid
    assert minter.mint(make_identity(), APP, T0 + 159) == before
    after = minter.mint(make_identity(), APP, T0 + 160)
    assert jwt.get_unverified_header(after)["kid"] == new


def test_rotation_refused_while_one_is_pending(ring: AssertionKeyRing) -> None:
    """A second rotation before the first key activates is refused; keep must cover 5 min."""
    ring.rotate(T0 + 10, publish_ahead=600)
    with pytest.raises(KeyRingError, match="pending"):
        ring.rotate(T0 + 20)
    with pytest.raises(ValueError, match="keep"):
        ring.rotate(T0 + 700, keep=299)


def test_rotation_reaches_other_processes_on_refresh(ring: AssertionKeyRing) -> None:
    """Another process's rotation is picked up by refresh(); an unchanged ring is not re-read."""
    worker = AssertionKeyRing(ring.directory)
    worker.load()
    assert worker.refresh() is False
    new = AssertionKeyRing(ring.directory).rotate(T0 + 50, publish_ahead=0)
    assert worker.refresh() is True
    assert worker.signing_key(T0 + 50).kid == new.kid
    assert worker.refresh() is False


def test_broken_directory_keeps_loaded_keys_on_refresh(ring: AssertionKeyRing) -> None:
    """A refresh that finds an inconsistent ring keeps signing with the keys it had."""
    kid = ring.signing_key(T0).kid
    index = ring.directory / "keyring.json"
    document = json.loads(index.read_text())
    document["keys"].append({"kid": "missing", "created": T0, "activates": T0})
    index.write_text(json.dumps(document))
    assert ring.refresh() is False
    assert ring.signing_key(T0 + 1).kid == kid
    with pytest.raises(KeyRingError, match="missing"):
        AssertionKeyRing(ring.directory).load()


def test_unsafe_key_file_modes_refused(ring: AssertionKeyRing) -> None:
    """A key file readable by others, or a group-writable directory, is refused at load."""
    pem = next(ring.directory.glob("*.pem"))
    pem.chmod(0o644)
    with pytest.raises(KeyRingError, match="chmod 600"):
        AssertionKeyRing(ring.directory).load()
    pem.chmod(0o600)
    ring.directory.chmod(0o770)
    with pytest.raises(KeyRingError, match="chmod 700"):
        AssertionKeyRing(ring.directory).load()


def test_swapped_key_file_refused(ring: AssertionKeyRing, tmp_path: Path) -> None:
    """A PEM that is not the key its kid names (a swapped file) is refused."""
    other = AssertionKeyRing(tmp_path / "other")
    other.ensure(T0)
    source = next(other.directory.glob("*.pem"))
    target = next(ring.directory.glob("*.pem"))
    os.replace(source, target)
    with pytest.raises(KeyRingError, match="does not match"):
        AssertionKeyRing(ring.directory).load()


def test_ensure_keeps_existing_keys(ring: AssertionKeyRing) -> None:
    """ensure() on a ring that has keys adds none."""
    kid = ring.signing_key(T0).kid
    again = AssertionKeyRing(ring.directory)
    again.ensure(T0 + 5)
    assert [key.kid for key in again.keys] == [kid]


def test_rotation_of_an_empty_ring_activates_at_once(tmp_path: Path) -> None:
    """With no key signing, a rotated-in key activates immediately (nothing to publish ahead of)."""
    ring = AssertionKeyRing(tmp_path / "keys")
    ring.ensure(T0)
    for path in ring.directory.glob("*.pem"):
        path.unlink()
    (ring.directory / "keyring.json").write_text('{"keys": []}')
    new = ring.rotate(T0 + 5, publish_ahead=600)
    assert ring.signing_key(T0 + 5).kid == new.kid


def test_missing_directory_is_a_key_ring_error(tmp_path: Path) -> None:
    """Loading a ring that was never created names the fix instead of crashing."""
    with pytest.raises(KeyRingError, match="tabiji keys"):
        AssertionKeyRing(tmp_path / "absent").load()


def test_no_active_key_is_an_error(tmp_path: Path) -> None:
    """Signing before any key has activated raises KeyRingError (never an unsigned header)."""
    ring = AssertionKeyRing(tmp_path / "keys")
    ring.ensure(T0)
    with pytest.raises(KeyRingError, match="no active"):
        ring.signing_key(T0 - 1)


# --- convenience headers -----------------------------------------------------------------------


def test_convenience_headers_plain_values() -> None:
    """Plain ASCII values pass as they are; groups are sorted and comma-joined."""
    headers = dict(convenience_headers(make_identity(name="Sato Hanako")))
    assert headers == {
        b"x-tabiji-user": b"u-1",
        b"x-tabiji-email": b"sato@town.example.test",
        b"x-tabiji-name": b"Sato Hanako",
        b"x-tabiji-groups": b"finance,staff",
    }


def test_convenience_headers_cannot_inject() -> None:
    """CR/LF, non-latin-1 text, commas and quotes are percent-encoded RFC 8187 style."""
    identity = make_identity(
        subject="u-1\r\nX-Admin: yes",
        groups=frozenset({"総務課", "a,b", "it's"}),
    )
    headers = dict(convenience_headers(identity))
    assert headers[b"x-tabiji-user"] == b"UTF-8''u-1%0D%0AX-Admin%3A%20yes"
    assert headers[b"x-tabiji-name"] == b"UTF-8''%E4%BD%90%E8%97%A4%20%E8%8A%B1%E5%AD%90"
    groups = headers[b"x-tabiji-groups"].split(b",")
    assert groups == [b"UTF-8''a%2Cb", b"UTF-8''it%27s", b"UTF-8''%E7%B7%8F%E5%8B%99%E8%AA%B2"]
    for value in headers.values():
        assert all(0x20 <= byte < 0x7F for byte in value)


def test_rotate_on_a_new_host_creates_the_first_key_ring(tmp_path: Path) -> None:
    """`tabiji keys rotate` where no key ring exists yet (not even its directory) creates it,
    private to the owner, with a key that signs at once — the fix the load error names."""
    ring = AssertionKeyRing(tmp_path / "absent" / "keys")
    new = ring.rotate(T0, publish_ahead=600)
    assert ring.signing_key(T0).kid == new.kid
    assert ring.directory.stat().st_mode & 0o777 == 0o700
    again = AssertionKeyRing(ring.directory)
    again.load()
    assert [key.kid for key in again.keys] == [new.kid]
