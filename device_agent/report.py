"""The wire contract between the device agent and the gateway: posture facts, signed reports,
per-request device proofs (RFC 9449 shape) and browser-binding attestations.

Everything the device signs is a compact JWS (ES256, the device's P-256 key) over canonical JSON,
so both sides agree on the bytes. The agent signs with whatever key store holds the key (a TPM
key's `sign()` runs inside the chip); the gateway verifies with the public key it enrolled.
This module is the agent's one home of pyjwt and is imported by the gateway (DESIGN.md §3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM: Final = "ES256"
REPORT_TYPE: Final = "tabiji-posture+jwt"
PROOF_TYPE: Final = "dpop+jwt"  # RFC 9449 §4.2
ATTEST_TYPE: Final = "tabiji-attest+jwt"
ENROL_TYPE: Final = "tabiji-enrol+jwt"
MAX_TOKEN_BYTES: Final = 16 * 1024  # a report is ~1 KiB; refuse anything far larger unparsed
DEFAULT_MAX_SKEW: Final = 300  # seconds of clock difference tolerated between laptop and gateway
PROOF_HEADER: Final = "DPoP"
MAX_FACT_TEXT: Final = 200
MAX_INTEGER: Final = 2**63 - 1

OsName = Literal["linux", "macos", "windows"]
KeyStorage = Literal["tpm", "software"]


class ReportInvalid(ValueError):
    """A refused report, proof or attestation: `code` is a stable kebab-case reason."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def canonical_json(value: object) -> bytes:
    """One byte form for one value: sorted keys, no spaces, UTF-8 (RFC 8785 for our value set:
    strings, integers, booleans, null, lists and objects — never floats)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The P-256 public key as a JWK (RFC 7517), public members only."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ReportInvalid("device-key-unsupported", "device keys are P-256")
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def key_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the device key's stable name."""
    jwk = public_jwk(key)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return _b64(hashlib.sha256(canonical_json(members)).digest())


def public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from SubjectPublicKeyInfo PEM; anything else is refused."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise ReportInvalid("device-key-invalid", str(error)) from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ReportInvalid("device-key-unsupported", "device keys are P-256")
    return key


# -- posture facts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostureFacts:
    """What the probes found. None always means *unknown* (could not be read), never *false*."""

    os: OsName | None = None
    os_version: str | None = None  # "12" (Debian), "14.5" (macOS), "10.0.22631" (Windows build)
    os_name: str | None = None  # human-readable, e.g. "Debian GNU/Linux 12 (bookworm)"
    kernel: str | None = None
    disk_encrypted: bool | None = None  # the system volume (LUKS / FileVault / BitLocker)
    firewall: bool | None = None
    screen_lock: bool | None = None  # a lock after inactivity is enabled
    screen_lock_timeout: int | None = None  # seconds of inactivity before the lock
    auto_update: bool | None = None
    patch_age_days: int | None = None  # days since updates were last installed
    antivirus: bool | None = None  # Windows Defender real-time protection
    system_integrity: bool | None = None  # macOS SIP
    agent_version: str | None = None

    def to_json(self) -> dict[str, object]:
        """Only the known facts: absence on the wire means unknown."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: object) -> PostureFacts:
        """Strict: unknown members, wrong types and over-long text are refused, never coerced."""
        if not isinstance(data, Mapping):
            raise ReportInvalid("report-malformed", "posture is not an object")
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                raise ReportInvalid("report-malformed", f"unknown posture fact {name!r}")
            if value is None:
                continue
            kind = _FACT_KINDS[name]
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, str) and len(value) <= MAX_FACT_TEXT and value.isprintable()
            if not ok:
                raise ReportInvalid("report-malformed", f"posture fact {name!r} has a bad value")
            values[name] = value
        if values.get("os") not in (None, "linux", "macos", "windows"):
            raise ReportInvalid("report-malformed", "unknown os")
        return cls(**values)


_FACT_KINDS: Final[dict[str, type]] = {
    "os": str,
    "os_version": str,
    "os_name": str,
    "kernel": str,
    "disk_encrypted": bool,
    "firewall": bool,
    "screen_lock": bool,
    "screen_lock_timeout": int,
    "auto_update": bool,
    "patch_age_days": int,
    "antivirus": bool,
    "system_integrity": bool,
    "agent_version": str,
}


@dataclass(frozen=True, slots=True)
class PostureReport:
    """One signed report: which device, its counter (strictly increasing), when, and the facts."""

    device_id: str
    audience: str  # the gateway's origin, so a report for one gateway is useless at another
    counter: int
    issued_at: int  # unix seconds, the laptop's clock
    facts: PostureFacts
    report_id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    loopback_port: int | None = None  # where the agent answers browser attestations

    def claims(self) -> dict[str, object]:
        claims: dict[str, object] = {
            "sub": self.device_id,
            "aud": self.audience,
            "cnt": self.counter,
            "iat": self.issued_at,
            "jti": self.report_id,
            "posture": self.facts.to_json(),
        }
        if self.loopback_port is not None:
            claims["port"] = self.loopback_port
        return claims


def _sign(claims: Mapping[str, object], key: ec.EllipticCurvePrivateKey, typ: str, kid: str) -> str:
    payload = canonical_json(dict(claims))
    headers = {"typ": typ, "kid": kid}
    return jwt.api_jws.encode(payload, key, algorithm=ALGORITHM, headers=headers)


def sign_report(report: PostureReport, key: ec.EllipticCurvePrivateKey) -> str:
    """The report as a compact JWS signed with the device key."""
    return _sign(report.claims(), key, REPORT_TYPE, report.device_id)


def unverified_device_id(token: str, expected_type: str) -> str:
    """The device a token says it is from (`kid`), to look up its key; nothing else is trusted
    before the signature is checked."""
    if len(token) > MAX_TOKEN_BYTES:
        raise ReportInvalid("report-too-large", f"{len(token)} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as error:
        raise ReportInvalid("report-malformed", str(error)) from error
    if header.get("typ") != expected_type:
        raise ReportInvalid("report-wrong-type", str(header.get("typ")))
    if header.get("alg") != ALGORITHM:
        raise ReportInvalid("report-bad-algorithm", str(header.get("alg")))
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 64 or not kid.isprintable():
        raise ReportInvalid("report-malformed", "no device id (kid)")
    return kid


def _verify(
    token: str, key: ec.EllipticCurvePublicKey, expected_type: str, device_id: str
) -> dict[str, Any]:
    if unverified_device_id(token, expected_type) != device_id:
        raise ReportInvalid("report-wrong-device", "kid names another device")
    try:
        payload = jwt.api_jws.decode(token, key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError as error:
        raise ReportInvalid("report-bad-signature", str(error)) from error
    except jwt.PyJWTError as error:
        raise ReportInvalid("report-malformed", str(error)) from error
    try:
        claims = json.loads(payload)
    except ValueError as error:
        raise ReportInvalid("report-malformed", "payload is not JSON") from error
    if not isinstance(claims, dict):
        raise ReportInvalid("report-malformed", "payload is not an object")
    return claims


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    # Bounded to a signed 64-bit column: a larger counter must be refused here, not crash a store.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INTEGER:
        raise ReportInvalid("report-malformed", f"{name} is not an integer in 0..2^63-1")
    return value


def _str_claim(claims: Mapping[str, Any], name: str, limit: int = 512) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ReportInvalid("report-malformed", f"{name} is missing or too long")
    return value


def _check_time(issued_at: int, now: float, max_skew: int, max_age: int) -> None:
    if issued_at > now + max_skew:
        raise ReportInvalid("report-clock-skew", f"issued {issued_at - now:.0f} s in the future")
    if issued_at < now - max_age:
        raise ReportInvalid("report-expired", f"issued {now - issued_at:.0f} s ago")


def verify_report(
    token: str,
    key: ec.EllipticCurvePublicKey,
    *,
    device_id: str,
    audience: str,
    now: float,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> PostureReport:
    """A report signed by this device's key, for this gateway, fresh; or ReportInvalid.

    The counter is returned, not judged: only the registry knows the last one it accepted.
    """
    claims = _verify(token, key, REPORT_TYPE, device_id)
    if claims.get("sub") != device_id:
        raise ReportInvalid("report-wrong-device", "sub names another device")
    if claims.get("aud") != audience:
        raise ReportInvalid("report-wrong-audience", str(claims.get("aud"))[:100])
    issued_at = _int_claim(claims, "iat")
    _check_time(issued_at, now, max_skew, max_skew)
    port = claims.get("port")
    if port is not None and (not isinstance(port, int) or not 1024 <= port <= 65535):
        raise ReportInvalid("report-malformed", "port")
    return PostureReport(
        device_id=device_id,
        audience=audience,
        counter=_int_claim(claims, "cnt"),
        issued_at=issued_at,
        facts=PostureFacts.from_json(claims.get("posture")),
        report_id=_str_claim(claims, "jti", 64),
        loopback_port=port,
    )


# -- per-request proofs (RFC 9449 shape) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceProof:
    device_id: str
    method: str
    url: str
    issued_at: int
    proof_id: str  # `jti`: single use, the gateway keeps a replay cache


def make_proof(
    key: ec.EllipticCurvePrivateKey,
    *,
    device_id: str,
    method: str,
    url: str,
    now: float,
    proof_id: str | None = None,
) -> str:
    """A proof for one request: `htm`, `htu` (no query or fragment, RFC 9449 §4.2), `iat`, `jti`."""
    claims = {
        "htm": method.upper(),
        "htu": proof_url(url),
        "iat": int(now),
        "jti": proof_id or secrets.token_urlsafe(16),
    }
    return _sign(claims, key, PROOF_TYPE, device_id)


def proof_url(url: str) -> str:
    """The URL a proof covers, compared after RFC 3986 §6.2.2–6.2.3 normalisation (RFC 9449 §4.3):
    scheme and host lower-cased, a default port dropped, an empty path as "/", no query or
    fragment. Both sides apply it, so a hand-typed `HTTPS://GW.example:443/x` still matches."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{parts.path or '/'}"


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def verify_proof(
    token: str,
    key: ec.EllipticCurvePublicKey,
    *,
    device_id: str,
    method: str,
    url: str,
    now: float,
    max_age: int = 60,
    max_skew: int = 5,
) -> DeviceProof:
    """A fresh proof by this device for exactly this method and URL; the caller checks `jti`."""
    claims = _verify(token, key, PROOF_TYPE, device_id)
    if claims.get("htm") != method.upper():
        raise ReportInvalid("proof-wrong-method", str(claims.get("htm"))[:20])
    if claims.get("htu") != proof_url(url):
        raise ReportInvalid("proof-wrong-url", str(claims.get("htu"))[:200])
    issued_at = _int_claim(claims, "iat")
    _check_time(issued_at, now, max_skew, max_age)
    return DeviceProof(
        device_id, method.upper(), proof_url(url), issued_at, _str_claim(claims, "jti", 64)
    )


# -- browser binding: the agent answers the gateway's challenge -------------------------------


@dataclass(frozen=True, slots=True)
class Attestation:
    device_id: str
    challenge: str
    origin: str
    issued_at: int


def sign_attestation(
    key: ec.EllipticCurvePrivateKey, *, device_id: str, challenge: str, origin: str, now: float
) -> str:
    """The agent's answer: this device saw this challenge from this gateway origin, now."""
    claims = {"chal": challenge, "origin": origin, "sub": device_id, "iat": int(now)}
    return _sign(claims, key, ATTEST_TYPE, device_id)


def verify_attestation(
    token: str,
    key: ec.EllipticCurvePublicKey,
    *,
    device_id: str,
    challenge: str,
    origin: str,
    now: float,
    max_age: int = 120,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> Attestation:
    claims = _verify(token, key, ATTEST_TYPE, device_id)
    if claims.get("sub") != device_id:
        raise ReportInvalid("report-wrong-device", "sub names another device")
    if claims.get("chal") != challenge:
        raise ReportInvalid("attest-wrong-challenge")
    if claims.get("origin") != origin:
        raise ReportInvalid("attest-wrong-origin", str(claims.get("origin"))[:200])
    issued_at = _int_claim(claims, "iat")
    _check_time(issued_at, now, max_skew, max_age)
    return Attestation(device_id, challenge, origin, issued_at)


# -- enrolment: proof of possession of the new key -------------------------------------------


def sign_enrolment(
    key: ec.EllipticCurvePrivateKey,
    *,
    request: Mapping[str, object],
    audience: str,
    now: float,
) -> str:
    """The enrolment request, signed by the key being enrolled (proof of possession).

    The key itself travels in the header (`jwk`): no device id exists yet; `kid` is its thumbprint.
    """
    public = key.public_key()
    claims = {**request, "aud": audience, "iat": int(now)}
    payload = canonical_json(claims)
    headers = {"typ": ENROL_TYPE, "kid": key_thumbprint(public), "jwk": public_jwk(public)}
    return jwt.api_jws.encode(payload, key, algorithm=ALGORITHM, headers=headers)


def verify_enrolment(
    token: str, *, audience: str, now: float, max_skew: int = DEFAULT_MAX_SKEW
) -> tuple[ec.EllipticCurvePublicKey, dict[str, Any]]:
    """The enrolling key and its request, if the request is signed by that very key."""
    thumbprint = unverified_device_id(token, ENROL_TYPE)
    try:
        jwk = jwt.get_unverified_header(token).get("jwk")
        if not isinstance(jwk, dict) or set(jwk) - {"kty", "crv", "x", "y"}:
            raise ReportInvalid("enrol-malformed", "jwk must be a public P-256 key")
        key = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(jwk))
    except (jwt.PyJWTError, ValueError, TypeError) as error:
        raise ReportInvalid("enrol-malformed", str(error)) from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ReportInvalid("device-key-unsupported", "device keys are P-256")
    if key_thumbprint(key) != thumbprint:
        raise ReportInvalid("enrol-malformed", "kid is not the key's thumbprint")
    claims = _verify(token, key, ENROL_TYPE, thumbprint)
    if claims.get("aud") != audience:
        raise ReportInvalid("report-wrong-audience", str(claims.get("aud"))[:100])
    _check_time(_int_claim(claims, "iat"), now, max_skew, max_skew)
    return key, claims
