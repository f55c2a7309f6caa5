"""The agent ↔ gateway wire contract: signed posture reports, proofs, attestations, enrolment."""

from __future__ import annotations

import base64
import hashlib
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent import report
from device_agent.report import PostureFacts, PostureReport, ReportInvalid

NOW = 1_790_000_000
ORIGIN = "https://gw.example.jp"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def other_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _report(**changes: object) -> PostureReport:
    values: dict[str, object] = {
        "device_id": "dev-1",
        "audience": ORIGIN,
        "counter": 7,
        "issued_at": NOW,
        "facts": PostureFacts(os="linux", os_version="12", disk_encrypted=False, firewall=True),
        "loopback_port": 47801,
    }
    values.update(changes)
    return PostureReport(**values)  # type: ignore[arg-type]


def _verify(token: str, key: ec.EllipticCurvePrivateKey, **kw: object) -> PostureReport:
    args: dict[str, object] = {"device_id": "dev-1", "audience": ORIGIN, "now": NOW}
    args.update(kw)
    return report.verify_report(token, key.public_key(), **args)  # type: ignore[arg-type]


def _code(call: object) -> str:
    with pytest.raises(ReportInvalid) as refused:
        call()  # type: ignore[operator]
    return refused.value.code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_canonical_json_is_one_byte_form() -> None:
    """Key order and spacing never change the signed bytes."""
    assert report.canonical_json({"b": 1, "a": "é"}) == report.canonical_json({"a": "é", "b": 1})
    assert report.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_report_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    """A report signed with the device key verifies and keeps every fact, unknown stays None."""
    got = _verify(report.sign_report(_report(), key), key)
    assert got.counter == 7
    assert got.loopback_port == 47801
    assert got.facts.disk_encrypted is False
    assert got.facts.screen_lock is None


def test_report_signed_by_another_key_is_refused(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    """A report signed by another device's key is a forgery."""
    token = report.sign_report(_report(), other_key)
    assert _code(lambda: _verify(token, key)) == "report-bad-signature"


def test_report_for_another_device_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """A report whose kid names another device is not this device's."""
    token = report.sign_report(_report(device_id="dev-2"), key)
    assert _code(lambda: _verify(token, key)) == "report-wrong-device"


def test_report_for_another_gateway_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """A report made for another gateway cannot be replayed here."""
    token = report.sign_report(_report(audience="https://other.example"), key)
    assert _code(lambda: _verify(token, key)) == "report-wrong-audience"


def test_report_from_the_future_or_the_past_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """Clock skew beyond the window either way is refused."""
    future = report.sign_report(_report(issued_at=NOW + 301), key)
    past = report.sign_report(_report(issued_at=NOW - 301), key)
    assert _code(lambda: _verify(future, key)) == "report-clock-skew"
    assert _code(lambda: _verify(past, key)) == "report-expired"
    assert _verify(report.sign_report(_report(issued_at=NOW + 299), key), key).counter == 7


def test_oversized_report_is_refused_unparsed(key: ec.EllipticCurvePrivateKey) -> None:
    """A huge body is refused before any JSON or signature work."""
    token = "a" * (report.MAX_TOKEN_BYTES + 1)
    assert _code(lambda: _verify(token, key)) == "report-too-large"


def test_alg_none_and_hmac_are_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """Only ES256: `none` and an HMAC keyed with public bytes never verify."""
    header = _b64(json.dumps({"alg": "none", "typ": report.REPORT_TYPE, "kid": "dev-1"}).encode())
    payload = _b64(report.canonical_json(_report().claims()))
    assert _code(lambda: _verify(f"{header}.{payload}.", key)) == "report-bad-algorithm"
    hmac = jwt.api_jws.encode(
        report.canonical_json(_report().claims()),
        b"0" * 32,
        algorithm="HS256",
        headers={"typ": report.REPORT_TYPE, "kid": "dev-1"},
    )
    assert _code(lambda: _verify(hmac, key)) == "report-bad-algorithm"


def test_other_token_types_are_not_reports(key: ec.EllipticCurvePrivateKey) -> None:
    """A proof or an attestation can't be passed off as a posture report (token confusion)."""
    proof = report.make_proof(key, device_id="dev-1", method="GET", url=ORIGIN + "/", now=NOW)
    assert _code(lambda: _verify(proof, key)) == "report-wrong-type"


@pytest.mark.parametrize(
    "posture",
    [
        {"disk_encrypted": "yes"},
        {"screen_lock_timeout": -1},
        {"screen_lock_timeout": True},
        {"os": "beos"},
        {"os_name": "x" * 201},
        {"os_name": "evil\nline"},
        {"root": True},
        [],
    ],
)
def test_malformed_posture_is_refused(key: ec.EllipticCurvePrivateKey, posture: object) -> None:
    """Wrong types, unknown facts, control characters, over-long text: refused, not coerced."""
    claims = {**_report().claims(), "posture": posture}
    token = jwt.api_jws.encode(
        report.canonical_json(claims),
        key,
        algorithm="ES256",
        headers={"typ": report.REPORT_TYPE, "kid": "dev-1"},
    )
    assert _code(lambda: _verify(token, key)) == "report-malformed"


def test_proof_binds_method_url_and_time(key: ec.EllipticCurvePrivateKey) -> None:
    """A proof verifies only for its method and URL (query ignored), and only while fresh."""
    proof = report.make_proof(
        key, device_id="dev-1", method="post", url=ORIGIN + "/files?x=1", now=NOW
    )
    pub = key.public_key()
    got = report.verify_proof(
        proof, pub, method="POST", url=ORIGIN + "/files", device_id="dev-1", now=NOW
    )
    assert got.method == "POST"
    assert got.proof_id
    wrong_method = lambda: report.verify_proof(  # noqa: E731
        proof, pub, method="GET", url=ORIGIN + "/files", device_id="dev-1", now=NOW
    )
    wrong_url = lambda: report.verify_proof(  # noqa: E731
        proof, pub, method="POST", url=ORIGIN + "/other", device_id="dev-1", now=NOW
    )
    late = lambda: report.verify_proof(  # noqa: E731
        proof, pub, method="POST", url=ORIGIN + "/files", device_id="dev-1", now=NOW + 61
    )
    assert _code(wrong_method) == "proof-wrong-method"
    assert _code(wrong_url) == "proof-wrong-url"
    assert _code(late) == "report-expired"


def test_attestation_binds_challenge_and_origin(key: ec.EllipticCurvePrivateKey) -> None:
    """The browser-binding answer holds only for its challenge and the gateway's origin."""
    token = report.sign_attestation(key, device_id="dev-1", challenge="c1", origin=ORIGIN, now=NOW)
    pub = key.public_key()

    def check(challenge: str, origin: str) -> report.Attestation:
        return report.verify_attestation(
            token, pub, device_id="dev-1", challenge=challenge, origin=origin, now=NOW
        )

    assert check("c1", ORIGIN).challenge == "c1"
    assert _code(lambda: check("c2", ORIGIN)) == "attest-wrong-challenge"
    assert _code(lambda: check("c1", "https://evil.example")) == "attest-wrong-origin"


def test_enrolment_proves_possession_of_the_key(
    key: ec.EllipticCurvePrivateKey, other_key: ec.EllipticCurvePrivateKey
) -> None:
    """An enrolment verifies with the key it carries; a swapped key in the header is refused."""
    token = report.sign_enrolment(key, request={"hostname": "pc-1"}, audience=ORIGIN, now=NOW)
    public, claims = report.verify_enrolment(token, audience=ORIGIN, now=NOW)
    assert report.key_thumbprint(public) == report.key_thumbprint(key.public_key())
    assert claims["hostname"] == "pc-1"
    # Someone else's key in the header, the signature still by `key`: refused.
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    header["jwk"] = report.public_jwk(other_key.public_key())
    header["kid"] = report.key_thumbprint(other_key.public_key())
    forged = ".".join([_b64(json.dumps(header).encode()), payload, signature])
    assert _code(lambda: report.verify_enrolment(forged, audience=ORIGIN, now=NOW)) == (
        "report-bad-signature"
    )


def test_enrolment_with_a_private_jwk_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """A header jwk with extra (private) members is refused rather than used."""
    token = report.sign_enrolment(key, request={}, audience=ORIGIN, now=NOW)
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    header["jwk"]["d"] = "AAAA"
    forged = ".".join([_b64(json.dumps(header).encode()), payload, signature])
    assert _code(lambda: report.verify_enrolment(forged, audience=ORIGIN, now=NOW)) == (
        "enrol-malformed"
    )


def test_thumbprint_is_rfc7638() -> None:
    """The thumbprint hashes the required members in lexical order with no whitespace (§3.2)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = report.public_jwk(key)
    assert set(jwk) == {"kty", "crv", "x", "y"}
    members = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'
    expected = _b64(hashlib.sha256(members.encode()).digest())
    assert report.key_thumbprint(key) == expected


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("HTTPS://GW.Example.jp:443/files?x=1#top", "https://gw.example.jp/files"),
        ("http://127.0.0.1:80", "http://127.0.0.1/"),
        ("https://gw.example.jp:8443/a/B", "https://gw.example.jp:8443/a/B"),
        ("https://[::1]:8443/x", "https://[::1]:8443/x"),
    ],
)
def test_proof_url_is_normalised(typed: str, expected: str) -> None:
    """Scheme, host case and default ports never make a hand-typed URL's proof fail (§4.3)."""
    assert report.proof_url(typed) == expected


def test_a_counter_beyond_64_bits_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    """A counter no 64-bit store column can hold is a malformed report, not a store crash."""
    token = report.sign_report(_report(counter=2**63), key)
    assert _code(lambda: _verify(token, key)) == "report-malformed"
    assert _verify(report.sign_report(_report(counter=2**63 - 1), key), key).counter == 2**63 - 1
