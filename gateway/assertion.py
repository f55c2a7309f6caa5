"""The signed identity assertion for upstreams (X-Tabiji-Assertion, ES256) and its rotating keys.

Signs through gateway.jose (never pyjwt directly); must not import gateway.settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.context import DeviceContext
from gateway.identity.model import Identity
from gateway.jose import (
    es256_key_to_pem,
    es256_public_jwk,
    generate_es256_key,
    jwk_thumbprint,
    load_es256_pem,
    sign_jwt,
)
from gateway.routing import Route

log = logging.getLogger("tabiji.assertion")

MAX_ASSERTION_LIFETIME: Final = 300.0  # issue #4 point 8: exp ≤ 5 min
ASSERTION_HEADER: Final = b"x-tabiji-assertion"
_KID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INDEX: Final = "keyring.json"
_LOCK: Final = ".lock"


class KeyRingError(Exception):
    """The key directory is unusable (missing, unsafe permissions, inconsistent, no active key)."""


@dataclass(frozen=True, slots=True)
class AssertionKey:
    """One signing key and its timeline (unix seconds); `removes` ends its publication."""

    kid: str
    created: float
    activates: float
    retires: float | None
    removes: float | None
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    def published(self, now: float) -> bool:
        return self.removes is None or now < self.removes

    def record(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "created": self.created,
            "activates": self.activates,
            "retires": self.retires,
            "removes": self.removes,
        }


def _number(entry: dict[str, Any], name: str, *, optional: bool) -> float | None:
    value = entry.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise KeyRingError(f"{_INDEX}: {name} of {entry.get('kid')!r} is not a number")
    return float(value)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a 0600 file so that a reader sees the old or the new content, never half."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


class AssertionKeyRing:
    """ES256 keys in a directory: `<kid>.pem` (0600) and `keyring.json` with each key's timeline.

    Files are read at load/refresh only, never per request. A new key is published
    `publish_ahead` seconds before it signs (upstream JWKS caches see it first); the key it
    replaces stops signing then and stays published `keep` more seconds (≥ the longest assertion
    lifetime), then it is deleted.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: tuple[AssertionKey, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._current: AssertionKey | None = None
        self._current_window = (math.inf, -math.inf)

    @property
    def keys(self) -> tuple[AssertionKey, ...]:
        return self._keys

    # --- reading ---------------------------------------------------------------------------

    def _check_directory(self) -> None:
        mode = self.directory.stat().st_mode
        if mode & 0o022:
            raise KeyRingError(f"{self.directory}: writable by group or others (chmod 700)")

    def load(self) -> None:
        """Read keyring.json and every key it names; refuses unsafe file modes."""
        index = self.directory / _INDEX
        try:
            self._check_directory()
            info = index.stat()
        except OSError as error:
            raise KeyRingError(
                f"{index}: {error.strerror} (tabiji keys rotate creates it)"
            ) from None
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        try:
            document = json.loads(index.read_bytes())
            entries = document["keys"]
            if not isinstance(entries, list):
                raise TypeError("keys is not a list")
        except (ValueError, KeyError, TypeError) as error:
            raise KeyRingError(f"{index}: not a key ring ({error})") from None
        keys = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise KeyRingError(f"{index}: an entry is not an object")
            kid = entry.get("kid")
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise KeyRingError(f"{index}: kid {kid!r} is not [A-Za-z0-9_-]{{1,64}}")
            keys.append(
                AssertionKey(
                    kid=kid,
                    created=_number(entry, "created", optional=False) or 0.0,
                    activates=_number(entry, "activates", optional=False) or 0.0,
                    retires=_number(entry, "retires", optional=True),
                    removes=_number(entry, "removes", optional=True),
                    private_key=self._read_key(kid),
                )
            )
        self._install(tuple(sorted(keys, key=lambda key: key.activates)), stamp)

    def _read_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        path = self.directory / f"{kid}.pem"
        try:
            with path.open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                data = file.read()
        except OSError as error:
            raise KeyRingError(f"{path}: {error.strerror}") from None
        if stat.S_IMODE(mode) & 0o077:
            raise KeyRingError(f"{path}: readable or writable by others (chmod 600)")
        try:
            key = load_es256_pem(data)
        except ValueError as error:
            raise KeyRingError(f"{path}: {error}") from None
        # The kid is the key's RFC 7638 thumbprint: a swapped file is caught here.
        if jwk_thumbprint(key) != kid:
            raise KeyRingError(f"{path}: the key does not match its kid")
        return key

    def _install(self, keys: tuple[AssertionKey, ...], stamp: tuple[int, int, int]) -> None:
        self._keys = keys
        self._stamp = stamp
        self._current = None
        self._current_window = (math.inf, -math.inf)

    def refresh(self) -> bool:
        """Re-read the directory if keyring.json changed (call on a timer); True if it did.

        A broken or half-rotated directory keeps the keys already loaded (logged), so a worker
        never ends up without a signing key because of a bad edit on the host.
        """
        try:
            info = (self.directory / _INDEX).stat()
        except OSError as error:
            log.error("assertion key ring %s: %s", self.directory, error)
            return False
        if (info.st_mtime_ns, info.st_ino, info.st_size) == self._stamp:
            return False
        try:
            self.load()
        except (KeyRingError, OSError) as error:
            log.error("assertion key ring not reloaded, keeping the loaded keys: %s", error)
            return False
        return True

    def signing_key(self, now: float) -> AssertionKey:
        """The newest activated key that has not retired; KeyRingError when there is none."""
        low, high = self._current_window
        if self._current is not None and low <= now < high:
            return self._current
        current: AssertionKey | None = None
        for key in self._keys:  # sorted by activates
            if key.activates <= now and (key.retires is None or now < key.retires):
                current = key
        if current is None:
            raise KeyRingError(f"{self.directory}: no active assertion key (tabiji keys rotate)")
        # Valid until the next key activates or this one retires, whichever comes first.
        high = min(
            [key.activates for key in self._keys if key.activates > now]
            + ([current.retires] if current.retires is not None else [])
            + [math.inf]
        )
        self._current = current
        self._current_window = (current.activates, high)
        return current

    def jwks(self, now: float) -> dict[str, list[dict[str, str]]]:
        """Every published public key (pending, active and retiring): never a private member."""
        return {
            "keys": [
                es256_public_jwk(key.private_key, key.kid)
                for key in self._keys
                if key.published(now)
            ]
        }

    # --- writing (the CLI on the host: `tabiji keys rotate`; ensure() at first start) ------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One writer at a time across processes (two `tabiji keys rotate` at once).
        with (self.directory / _LOCK).open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _make_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)

    def _write(self, keys: list[AssertionKey], new: AssertionKey | None) -> None:
        if new is not None:
            # The key file first: a reader that sees the new index always finds its key.
            _write_atomic(self.directory / f"{new.kid}.pem", es256_key_to_pem(new.private_key))
        index = {"keys": [key.record() for key in keys]}
        _write_atomic(self.directory / _INDEX, json.dumps(index, indent=2).encode())

    def ensure(self, now: float) -> None:
        """Create the directory and a first, immediately active key when there is none."""
        self._make_directory()
        with self._locked():
            if (self.directory / _INDEX).exists():
                self.load()
                if self._keys:
                    return
            key = _new_key(now, activates=now)
            self._write([key], key)
            self.load()

    def rotate(
        self, now: float, publish_ahead: float = 600.0, keep: float = 3600.0
    ) -> AssertionKey:
        """Add a key that signs from now + publish_ahead; the current one retires then."""
        if keep < MAX_ASSERTION_LIFETIME or publish_ahead < 0:
            raise ValueError(f"keep must be ≥ {MAX_ASSERTION_LIFETIME:.0f} s and publish_ahead ≥ 0")
        self._make_directory()  # `tabiji keys rotate` on a new host creates the first key ring
        with self._locked():
            if (self.directory / _INDEX).exists():
                self.load()
            else:
                self._keys = ()
            if any(key.activates > now for key in self._keys):
                raise KeyRingError(f"{self.directory}: a rotation is already pending")
            # Nothing signs right now (a first key, or every key retired): no one to wait for.
            idle = not any(
                key.activates <= now and (key.retires is None or now < key.retires)
                for key in self._keys
            )
            new = _new_key(now, activates=now if idle else now + publish_ahead)
            keys = []
            for old in self._keys:
                if not old.published(now):
                    continue  # deleted below, after the index no longer names it
                if old.activates <= now and old.retires is None:
                    keys.append(replace(old, retires=new.activates, removes=new.activates + keep))
                else:
                    keys.append(old)
            keys.append(new)
            self._write(keys, new)
            self._delete_unlisted(keys)
            self.load()
        return new

    def prune(self, now: float) -> list[str]:
        """Delete keys whose publication ended; returns their kids."""
        with self._locked():
            self.load()
            gone = [key.kid for key in self._keys if not key.published(now)]
            if gone:
                keys = [key for key in self._keys if key.published(now)]
                self._write(keys, None)
                self._delete_unlisted(keys)
                self.load()
        return gone

    def _delete_unlisted(self, keys: list[AssertionKey]) -> None:
        listed = {key.kid for key in keys}
        for path in self.directory.glob("*.pem"):
            if path.stem not in listed:
                path.unlink()


def _new_key(now: float, *, activates: float) -> AssertionKey:
    private_key = generate_es256_key()
    return AssertionKey(
        kid=jwk_thumbprint(private_key),
        created=now,
        activates=activates,
        retires=None,
        removes=None,
        private_key=private_key,
    )


UPSTREAM_EXAMPLE: Final = """\
import jwt  # pip install "pyjwt[crypto]"

GATEWAY = "https://gateway.town.example"  # the gateway's public_url
ME = "https://app.town.example"  # this app's origin, as the route serves it
jwks = jwt.PyJWKClient(GATEWAY + "/.tabiji/jwks.json", lifespan=300)


def user_from(headers):
    token = headers["X-Tabiji-Assertion"]
    key = jwks.get_signing_key_from_jwt(token)  # by kid; refetched when a new key appears
    claims = jwt.decode(
        token,
        key,
        algorithms=["ES256"],  # fixed here, never taken from the token
        issuer=GATEWAY,
        audience=ME,
        options={"require": ["iss", "aud", "sub", "iat", "exp"]},
    )
    # A user is (idp, sub): the same sub from two identity providers is two people.
    return (claims["idp"], claims["sub"]), claims["email"], set(claims["groups"])
"""


@dataclass(frozen=True, slots=True)
class _Minted:
    token: str
    exp: int
    reuse_until: float


class AssertionMinter:
    """Mints X-Tabiji-Assertion JWTs, one per (identity facts, audience, key, device) and reused.

    Claims: iss (the gateway's public URL), aud (the route's origin), idp (the user's identity
    provider: users are (idp, sub), never sub alone), sub, email, email_verified, name, groups,
    amr (sorted lists), sid (the session hash), device_id, device_trust, iat, exp (≤ 5 min), jti,
    and device_posture_at when the request's device has reported its posture.

    UPSTREAM_EXAMPLE below shows an upstream app verifying it (README; tested as written).

    Accept the header only on connections from the gateway (bind to it, or mTLS): the
    assertion proves who the user is, the network path proves it came through the gateway.
    """

    def __init__(
        self,
        key_ring: AssertionKeyRing,
        issuer: str,
        lifetime: float = 120.0,
        reuse_margin: float = 30.0,
        cache_size: int = 10_000,
    ) -> None:
        if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
            raise ValueError(f"assertion lifetime must be in (0, {MAX_ASSERTION_LIFETIME:.0f}] s")
        if not 0 <= reuse_margin < lifetime:
            raise ValueError("reuse_margin must be ≥ 0 and shorter than the lifetime")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._ring = key_ring
        self._issuer = issuer
        self._lifetime = int(lifetime)
        self._margin = reuse_margin
        self._cache_size = cache_size
        self._cache: dict[tuple[object, ...], _Minted] = {}
        self.signatures = 0  # assertions actually signed (metrics, tests)

    def mint(
        self,
        identity: Identity,
        audience: str,
        now: float,
        *,
        device_id: str | None = None,
        device_trust: str | None = None,
        device_posture_at: int | None = None,
    ) -> str:
        """The assertion for this user at this route; ValueError if the identity has expired.

        `device_id` defaults to the identity's bound device; the pipeline passes the device it
        verified for *this* request (UpstreamAssertions). `device_trust` is where its key lives
        ("tpm" only when attested, "tpm-claimed", "software"), `device_posture_at` when its
        latest posture report was accepted (the claim is present only when there is one).
        """
        key = self._ring.signing_key(now)
        if device_id is None:
            device_id = identity.device_id
        # Keyed by everything the claims say, so a change (groups after a token refresh, a new
        # device trust level, a new key) never reuses an assertion that says something else. Not
        # by the identity's end, which an idle timeout may move on every request: an assertion
        # that would outlive the identity is simply not reused.
        cache_key = (
            identity.issuer,
            identity.subject,
            identity.method,
            identity.session_hash,
            identity.email,
            identity.email_verified,
            identity.name,
            identity.groups,
            identity.amr,
            audience,
            key.kid,
            device_id,
            device_trust,
            device_posture_at,
        )
        minted = self._cache.get(cache_key)
        if minted is not None and now < minted.reuse_until and minted.exp <= identity.expires_at:
            return minted.token
        iat = math.floor(now)
        exp = min(iat + self._lifetime, math.floor(identity.expires_at))
        if exp <= iat:
            raise ValueError("the identity has expired: no assertion is minted for it")
        claims = {
            "iss": self._issuer,
            "aud": audience,
            "idp": identity.issuer,
            "sub": identity.subject,
            "email": identity.email,
            "email_verified": identity.email_verified,
            "name": identity.name,
            "groups": sorted(identity.groups),
            "amr": sorted(identity.amr),
            "sid": identity.session_hash,
            "device_id": device_id,
            "device_trust": device_trust,
            "iat": iat,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
        }
        if device_posture_at is not None:
            claims["device_posture_at"] = device_posture_at
        token = sign_jwt(claims, key.private_key, key.kid)
        self.signatures += 1
        # Reused until `reuse_margin` before exp, so the upstream always gets some lifetime —
        # unless exp was capped by the identity's own end, where a new one could be no longer.
        capped = exp < iat + self._lifetime
        reuse_until = exp if capped else exp - self._margin
        cache = self._cache
        if minted is None and len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # oldest insertion first: O(1)
        cache[cache_key] = _Minted(token, exp, reuse_until)
        return token


class UpstreamAssertions:
    """The pipeline's assertion stage: one signed X-Tabiji-Assertion per (user, route, device
    state), reused; plus the unsigned convenience headers on routes that ask for them."""

    def __init__(self, minter: AssertionMinter) -> None:
        self._minter = minter
        self._header = ASSERTION_HEADER.decode()

    def upstream_headers(
        self, identity: Identity, route: Route, now: float, device: DeviceContext | None = None
    ) -> list[tuple[str, str]]:
        if device is None:
            if identity.device_id is not None:
                # A binding the device stage did not accept now (expired, registry stale):
                # never asserted on trust.
                identity = replace(identity, device_id=None)
            token = self._minter.mint(identity, route.origin, now)
        else:
            posture_at = device.posture_at
            token = self._minter.mint(
                identity,
                route.origin,
                now,
                device_id=device.id,
                device_trust=device.key_storage,
                device_posture_at=math.floor(posture_at) if posture_at is not None else None,
            )
        headers = [(self._header, token)]
        if route.identity_headers:
            headers.extend((k.decode(), v.decode()) for k, v in convenience_headers(identity))
        return headers


# RFC 8187 attr-char: what may stand unencoded in an encoded value.
_ATTR_CHAR_SAFE: Final = "!#$&+-.^_`|~"
# Plain values: visible ASCII except the characters our encoding and lists give meaning to
# (% ' , " \), with inner spaces. Everything else is sent as UTF-8''<percent-encoded>.
_PLAIN: Final = re.compile(r"[!#$&(-+\--\[\]-~]+(?: [!#$&(-+\--\[\]-~]+)*")


def _header_value(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return value
    # RFC 8187 §3.2 ext-value: no CR/LF/control character or non-latin-1 byte reaches the wire.
    return "UTF-8''" + quote(value, safe=_ATTR_CHAR_SAFE, encoding="utf-8")


def convenience_headers(identity: Identity) -> list[tuple[bytes, bytes]]:
    """Unsigned X-Tabiji-User/-Email/-Name/-Groups for simple upstreams (per route, optional).

    Values outside plain visible ASCII are sent RFC 8187 style (UTF-8''%E5%BD%B9...), each
    group on its own, so no value can inject a header or forge a list entry. The pipeline must
    strip these names (and X-Tabiji-Assertion) from every incoming request.
    """
    headers = [(b"x-tabiji-user", _header_value(identity.subject).encode("ascii"))]
    if identity.email is not None:
        headers.append((b"x-tabiji-email", _header_value(identity.email).encode("ascii")))
    if identity.name is not None:
        headers.append((b"x-tabiji-name", _header_value(identity.name).encode("ascii")))
    groups = ",".join(_header_value(group) for group in sorted(identity.groups))
    headers.append((b"x-tabiji-groups", groups.encode("ascii")))
    return headers
