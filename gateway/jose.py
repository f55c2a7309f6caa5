"""JOSE for the gateway: verify JWTs against JWKS / static keys, sign ES256, manage key formats.

The gateway's one home of pyjwt (ruff banned-api); imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from ipaddress import ip_address
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("tabiji.jose")

# RFC 8725 §3.1: an explicit allow-list, asymmetric only. `none` and HS* never verify here: an
# HMAC "verified" with a public key's bytes is the classic key-confusion forgery.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)
_RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHM_BY_CURVE: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
# Only the public members of a JWK are ever used (RFC 7517 §4, RFC 7518 §6): a JWKS that leaks
# private parts must not turn verification into something else.
_PUBLIC_MEMBERS: Final = {
    "RSA": ("kty", "n", "e"),
    "EC": ("kty", "crv", "x", "y"),
    "OKP": ("kty", "crv", "x"),
}
DEFAULT_REQUIRED: Final = ("exp", "iat", "iss", "aud", "sub")
MAX_JWKS_BYTES: Final = 512 * 1024


class TokenInvalid(Exception):
    """A refused token: `code` is stable kebab-case (audit, pages), `detail` is for logs."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class KeySource(Protocol):
    """Where verification keys come from: only ever by `kid` and `alg`, never from the token."""

    def cached_key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key if it is already in memory (the hot path: no await, no I/O)."""

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key, fetching when allowed; raises TokenInvalid when there is none."""


class _KeyTable:
    """Parsed keys: (kid, alg) -> PyJWK, plus alg -> keys for tokens without a `kid`."""

    __slots__ = ("by_alg", "by_kid")

    def __init__(self, document: object) -> None:
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError("a JWK Set is an object with a `keys` array (RFC 7517 §5)")
        self.by_kid: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self.by_alg: dict[str, list[jwt.PyJWK]] = {}
        for entry in document["keys"]:
            try:
                parsed = _parse_jwk(entry)
            except (ValueError, TypeError, KeyError, jwt.PyJWTError) as error:
                # One odd key (a kty we don't know, an encryption key) must not hide the others.
                log.info("JWKS key skipped: %s", error)
                continue
            kid = entry.get("kid")
            for alg, key in parsed:
                self.by_kid.setdefault((kid, alg), key)
                self.by_alg.setdefault(alg, []).append(key)

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            return self.by_kid.get((kid, alg))
        # No `kid` in the token: only unambiguous when the set has one key for this alg.
        candidates = self.by_alg.get(alg, ())
        return candidates[0] if len(candidates) == 1 else None


def _parse_jwk(entry: object) -> list[tuple[str, jwt.PyJWK]]:
    """One JWK -> the (alg, key) pairs it may verify; refuses what it must not be used for."""
    if not isinstance(entry, Mapping):
        raise TypeError("a JWK is an object")
    kty = entry.get("kty")
    if kty not in _PUBLIC_MEMBERS:
        raise ValueError(f"kty {kty!r} is not an asymmetric signing key type")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TypeError("kid must be a string")
    # RFC 7517 §4.2/§4.3: a key marked for encryption (or without `verify`) never verifies.
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"key {kid!r} has use {use!r}")
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError(f"key {kid!r} has key_ops {key_ops!r}")
    public = {name: entry[name] for name in _PUBLIC_MEMBERS[kty] if name in entry}
    declared = entry.get("alg")
    if declared is not None:
        if declared not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"key {kid!r} has alg {declared!r}")
        algorithms: tuple[str, ...] = (declared,)
    elif kty == "RSA":
        algorithms = _RSA_ALGORITHMS
    elif kty == "EC":
        algorithms = (_EC_ALGORITHM_BY_CURVE.get(str(public.get("crv")), "?"),)
    else:
        algorithms = ("EdDSA",)
    pairs = []
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"key {kid!r}: no signing algorithm for {kty}/{public.get('crv')}")
        # PyJWK binds the algorithm; pyjwt then refuses a token whose alg differs from it.
        pairs.append((alg, jwt.PyJWK(public, algorithm=alg)))
    return pairs


class StaticKeys:
    """Keys given directly (a JWK Set document): tests and the gateway's own keys."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._table = _KeyTable(jwks)

    def cached_key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        return self._table.get(kid, alg)

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        key = self._table.get(kid, alg)
        if key is None:
            raise TokenInvalid("token-unknown-kid", f"no key {kid!r} for {alg}")
        return key


def _check_jwks_uri(uri: str) -> None:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):  # a name, not an address literal
        loopback = loopback or ip_address(host).is_loopback
    # Keys fetched in the clear could be swapped on the way; plain http only on loopback (tests,
    # a provider on the same host).
    if parts.scheme == "http" and loopback:
        return
    raise ValueError(f"JWKS URI must be https (plain http only on loopback): {uri}")


class JwksCache:
    """A provider's JWK Set fetched over HTTPS, parsed once, refetched on an unknown `kid`.

    Refetches are rate-limited (at most one per `min_refetch_interval`) and shared by concurrent
    callers, so a flood of made-up `kid`s cannot make the gateway hammer the provider. The set is
    also refetched after `max_age` (a key the provider withdrew stops verifying); when that fetch
    fails the known keys stay in use.
    """

    def __init__(
        self,
        jwks_uri: str,
        *,
        ssl_context: ssl.SSLContext | None,
        min_refetch_interval: float = 30.0,
        http_timeout: float = 5.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_jwks_uri(jwks_uri)
        self.jwks_uri = jwks_uri
        self._ssl_context = ssl_context
        self._min_refetch_interval = min_refetch_interval
        self._http_timeout = http_timeout
        self._max_age = max_age
        self._clock = clock
        self._table: _KeyTable | None = None
        self._loaded_at = -math.inf  # when the current table was fetched
        self._attempted_at = -math.inf  # when the last fetch was tried (success or not)
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # fetch attempts, for metrics and tests

    def cached_key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        table = self._table
        if table is None or self._clock() - self._loaded_at >= self._max_age:
            return None
        return table.get(kid, alg)

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        key = self.cached_key(kid, alg)
        if key is not None:
            return key
        async with self._lock:
            # Whoever held the lock before us may just have fetched the key we need.
            key = self.cached_key(kid, alg)
            if key is not None:
                return key
            if self._clock() - self._attempted_at >= self._min_refetch_interval:
                await self._fetch()
        table = self._table
        key = table.get(kid, alg) if table is not None else None
        if key is not None:
            return key
        if table is None:
            raise TokenInvalid("token-keys-unavailable", self._last_error or "no keys yet")
        raise TokenInvalid("token-unknown-kid", f"no key {kid!r} for {alg} at {self.jwks_uri}")

    async def refresh(self) -> None:
        """Fetch now (startup prefetch); raises TokenInvalid token-keys-unavailable on failure."""
        async with self._lock:
            await self._fetch()
        if self._last_error is not None:
            raise TokenInvalid("token-keys-unavailable", self._last_error)

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        self.fetches += 1
        try:
            document = await self._download()
            table = _KeyTable(document)
        except (httpx.HTTPError, ValueError, RecursionError, ssl.SSLError, OSError) as error:
            self._last_error = f"{self.jwks_uri}: {error}"
            log.warning("JWKS fetch failed: %s", self._last_error)
            return
        self._table = table
        self._loaded_at = self._attempted_at
        self._last_error = None

    async def _download(self) -> object:
        # No redirects (a JWKS that moves is a config change); no proxy from the environment.
        async with (
            httpx.AsyncClient(
                verify=self._ssl_context if self._ssl_context is not None else True,
                follow_redirects=False,
                timeout=self._http_timeout,
                trust_env=False,
            ) as client,
            client.stream(
                "GET", self.jwks_uri, headers={"Accept": "application/jwk-set+json"}
            ) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 512 KiB")
        return json.loads(body)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: a JSON number (not a string, not a boolean), finite."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenInvalid("token-claim-invalid", f"{name} is not a NumericDate")
    return float(value)


def _normalise_typ(value: str) -> str:
    # RFC 7515 §4.1.9: typ is case-insensitive and "application/" may be omitted.
    value = value.lower()
    return value[12:] if value.startswith("application/") else value


def parse_header(token: str) -> dict[str, Any]:
    """The unverified JOSE header, refusing what no verification should even start on.

    Only the header segment is decoded here (pyjwt's own parser decodes all three segments,
    ≈ 10 µs); pyjwt parses the whole token strictly again when it verifies.
    """
    segment, dot, _ = token.partition(".")
    try:
        if not dot:
            raise ValueError("not a JWS compact serialisation")
        raw = base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
        header = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        raise TokenInvalid("token-malformed", "the header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise TokenInvalid("token-malformed", "the header is not a JSON object")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenInvalid("token-malformed", "kid is not a string")
    # RFC 7515 §4.1.11: we understand no critical extension (b64=false included).
    if "crit" in header or "b64" in header:
        raise TokenInvalid("token-malformed", "critical header extensions are not supported")
    return header


def peek_claim(token: str, name: str) -> object:
    """One claim from the UNVERIFIED payload: only to choose which keys verify the token."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, RecursionError):
        raise TokenInvalid("token-malformed", "payload is not base64url JSON") from None
    if not isinstance(claims, dict):
        raise TokenInvalid("token-malformed", "payload is not a JSON object")
    return claims.get(name)


async def verify_jwt(
    token: str,
    *,
    keys: KeySource,
    issuer: str,
    audiences: Collection[str],
    algorithms: Collection[str],
    expected_typ: Collection[str] | None = None,
    required: Collection[str] = DEFAULT_REQUIRED,
    leeway: float = 30,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify signature and claims; return the claims or raise TokenInvalid (with its code).

    `expected_typ` holds accepted `typ` values (lower case, without "application/"); "" in it
    accepts a token without `typ`. The key comes only from `keys`, by `kid` (RFC 8725 §3.10).
    """
    if isinstance(algorithms, str):
        raise TypeError("algorithms is a collection of names, not one string")
    header = parse_header(token)
    alg = header.get("alg")
    # RFC 8725 §3.1: the allow-list is checked before any key is looked up.
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS or alg not in algorithms:
        raise TokenInvalid("token-alg-not-allowed", f"alg {alg!r}")
    kid = header.get("kid")
    # `jwk`, `jku`, `x5u`, `x5c` in the header are never read: an attacker names their own key
    # there (RFC 8725 §3.10). The key comes from our key source, by `kid`, nothing else.
    key = keys.cached_key(kid, alg)
    if key is None:
        key = await keys.key_for(kid, alg)
    return verify_with_key(
        token,
        header,
        key,
        issuer=issuer,
        audiences=audiences,
        expected_typ=expected_typ,
        required=required,
        leeway=leeway,
        now=now,
    )


def _decode(
    token: str, key: jwt.PyJWK, issuer: str, audiences: Collection[str], required: Collection[str]
) -> dict[str, Any]:
    """Signature, iss, aud and required claims by pyjwt; its exceptions become our codes."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[key.algorithm_name],
            audience=list(audiences),
            issuer=issuer,
            # Time is checked by _check_times against the caller's `now` (pyjwt reads the clock).
            options={
                "require": list(required),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    # Most specific first: InvalidSignatureError is a DecodeError.
    except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as error:
        raise TokenInvalid("token-bad-signature", str(error)) from None
    except jwt.InvalidAlgorithmError as error:
        raise TokenInvalid("token-alg-not-allowed", str(error)) from None
    except jwt.InvalidAudienceError as error:
        raise TokenInvalid("token-wrong-audience", str(error)) from None
    except jwt.InvalidIssuerError as error:
        raise TokenInvalid("token-wrong-issuer", str(error)) from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenInvalid("token-missing-claim", str(error)) from None
    except (jwt.exceptions.InvalidSubjectError, jwt.exceptions.InvalidJTIError) as error:
        raise TokenInvalid("token-claim-invalid", str(error)) from None
    except jwt.PyJWTError as error:
        raise TokenInvalid("token-malformed", str(error)) from None


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    # RFC 7519 §4.1.4 / §4.1.5 / §4.1.6, with a small leeway for clock skew.
    exp = _numeric_date(claims, "exp")
    if exp is not None and exp <= now - leeway:
        raise TokenInvalid("token-expired", f"exp {exp:.0f} <= now {now:.0f}")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenInvalid("token-not-yet-valid", f"nbf {nbf:.0f} > now {now:.0f}")
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise TokenInvalid("token-issued-in-future", f"iat {iat:.0f} > now {now:.0f}")


def verify_with_key(
    token: str,
    header: Mapping[str, Any],
    key: jwt.PyJWK,
    *,
    issuer: str,
    audiences: Collection[str],
    expected_typ: Collection[str] | None = None,
    required: Collection[str] = DEFAULT_REQUIRED,
    leeway: float = 30,
    now: float | None = None,
) -> dict[str, Any]:
    """The synchronous half of verify_jwt, once the key is known (header from parse_header)."""
    if expected_typ is not None:
        typ = header.get("typ", "")
        if not isinstance(typ, str) or _normalise_typ(typ) not in expected_typ:
            raise TokenInvalid("token-wrong-type", f"typ {typ!r}")
    if not audiences or isinstance(audiences, str):
        raise ValueError("verify_jwt needs a collection of at least one audience")
    claims = _decode(token, key, issuer, audiences, required)
    _check_times(claims, time.time() if now is None else now, leeway)
    return claims


# --- the gateway's own keys (ES256 only) -------------------------------------------------------


def sign_jwt(
    claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, kid: str, typ: str = "JWT"
) -> str:
    """An ES256 JWS compact serialisation of `claims`, with `kid` and `typ` in the header."""
    return jwt.encode(dict(claims), key, algorithm="ES256", headers={"kid": kid, "typ": typ})


def generate_es256_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def es256_key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file's 0600 mode protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_es256_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM; anything else is refused (ValueError)."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 (ES256) private key")
    return key


def _b64url_uint(value: int, size: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


def es256_public_jwk(
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, kid: str
) -> dict[str, str]:
    """The public JWK (RFC 7518 §6.2) with kid, alg ES256, use sig: never a private member."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url_uint(numbers.x, 32),
        "y": _b64url_uint(numbers.y, 32),
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
    }


def jwk_thumbprint(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a stable, filename-safe key id."""
    jwk = es256_public_jwk(key, "")
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
