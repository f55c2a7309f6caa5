"""Bearer tokens: `Authorization: Bearer <JWT>` from configured issuers -> a verified Identity.

Verification goes through gateway.jose (never pyjwt directly); must not import gateway.settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.identity.model import Identity
from gateway.jose import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_REQUIRED,
    KeySource,
    TokenInvalid,
    peek_claim,
    verify_jwt,
)

# A token without `typ`, a plain JWT, or an RFC 9068 access token. Logout tokens
# (logout+jwt, OIDC Back-Channel Logout §2.4) and anything else are refused as bearer tokens.
DEFAULT_BEARER_TYP: Final = frozenset({"", "jwt", "at+jwt"})


@dataclass(frozen=True, slots=True)
class BearerIssuer:
    """One trusted token issuer: its keys, accepted audiences, and an explicit alg allow-list."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    keys: KeySource
    algorithms: tuple[str, ...]
    groups_claim: str = "groups"
    expected_typ: frozenset[str] | None = None  # None: DEFAULT_BEARER_TYP
    email_claim: str = "email"
    name_claim: str = "name"
    leeway: float = 30.0
    required: tuple[str, ...] = DEFAULT_REQUIRED

    def __post_init__(self) -> None:
        # A str would pass for a tuple of one-letter audiences.
        if not self.audiences or not isinstance(self.audiences, tuple):
            raise ValueError(f"bearer issuer {self.name}: at least one audience is required")
        if not self.algorithms or not set(self.algorithms) <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(
                f"bearer issuer {self.name}: algorithms must be a non-empty subset of "
                f"{sorted(ASYMMETRIC_ALGORITHMS)} (never none or HS*), got {self.algorithms}"
            )
        if not {"exp", "iss", "sub"} <= set(self.required):
            # The cache lives until `exp`; users are keyed by (iss, sub).
            raise ValueError(f"bearer issuer {self.name}: exp, iss and sub must be required")

    @property
    def accepted_typ(self) -> frozenset[str]:
        return DEFAULT_BEARER_TYP if self.expected_typ is None else self.expected_typ


def _string_list(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    value = claims.get(name)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TokenInvalid("token-claim-invalid", f"{name} is not a list of strings")
    return frozenset(value)


def _optional_string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenInvalid("token-claim-invalid", f"{name} is not a string")
    return value


def _groups_overage(claims: Mapping[str, Any], groups_claim: str) -> bool:
    # Entra ID: too many groups for the token -> `_claim_names: {"groups": "src1"}` (JWT) or
    # `hasgroups: true` (implicit flow) instead of the list. The policy must see that the list
    # is incomplete, never an empty list that looks like "member of nothing".
    names = claims.get("_claim_names")
    if isinstance(names, Mapping) and groups_claim in names:
        return True
    return claims.get("hasgroups") is True


def identity_from_claims(issuer: BearerIssuer, claims: dict[str, Any]) -> Identity:
    """Our Identity from verified claims; malformed identity claims are refused, not guessed."""
    return Identity(
        issuer=claims["iss"],
        subject=claims["sub"],
        method="bearer",
        provider=issuer.name,
        email=_optional_string(claims, issuer.email_claim),
        # Only a JSON true counts (a string "true" is not a verified address).
        email_verified=claims.get("email_verified") is True,
        name=_optional_string(claims, issuer.name_claim),
        groups=_string_list(claims, issuer.groups_claim),
        groups_overage=_groups_overage(claims, issuer.groups_claim),
        amr=_string_list(claims, "amr"),
        acr=_optional_string(claims, "acr"),
        claims=MappingProxyType(claims),
        session_hash=None,
        idp_sid=_optional_string(claims, "sid"),
        expires_at=float(claims["exp"]),
    )


class BearerVerifier:
    """Verifies bearer JWTs from the configured issuers; a verified token is cached until `exp`.

    The cache is keyed by sha256(token): a repeat costs a hash and a dict lookup instead of a
    signature verification (≈ 75 µs for ES256).
    """

    def __init__(self, issuers: Sequence[BearerIssuer], cache_size: int = 10_000) -> None:
        self._by_issuer: dict[str, BearerIssuer] = {}
        for issuer in issuers:
            if issuer.issuer in self._by_issuer:
                raise ValueError(f"bearer issuer {issuer.issuer} is configured twice")
            self._by_issuer[issuer.issuer] = issuer
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._cache_size = cache_size
        self._cache: dict[bytes, Identity] = {}
        self.verifications = 0  # full verifications done (metrics, tests)

    def cached(self, token: str, now: float) -> Identity | None:
        """The identity of an already-verified token that has not expired; no I/O, no crypto."""
        key = hashlib.sha256(token.encode()).digest()
        identity = self._cache.get(key)
        if identity is None:
            return None
        if identity.expires_at <= now:
            # Past `exp`: dropped, never returned (RFC 7519 §4.1.4).
            self._cache.pop(key, None)
            return None
        return identity

    async def verify(self, token: str, now: float) -> Identity:
        """The token's Identity, or TokenInvalid with a stable code."""
        identity = self.cached(token, now)
        if identity is not None:
            return identity
        # The unverified `iss` only chooses which keys to try; the signature and `iss` are then
        # verified for real against that issuer's configuration.
        claimed = peek_claim(token, "iss")
        issuer = self._by_issuer.get(claimed) if isinstance(claimed, str) else None
        if issuer is None:
            raise TokenInvalid("token-wrong-issuer", f"issuer {claimed!r} is not configured")
        self.verifications += 1
        claims = await verify_jwt(
            token,
            keys=issuer.keys,
            issuer=issuer.issuer,
            audiences=issuer.audiences,
            algorithms=issuer.algorithms,
            expected_typ=issuer.accepted_typ,
            required=issuer.required,
            leeway=issuer.leeway,
            now=now,
        )
        identity = identity_from_claims(issuer, claims)
        if identity.expires_at > now:
            self._remember(hashlib.sha256(token.encode()).digest(), identity)
        return identity

    def _remember(self, key: bytes, identity: Identity) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            # Oldest insertion first (dicts keep insertion order): O(1), and the oldest entries
            # are the likeliest to be expired anyway.
            del cache[next(iter(cache))]
        cache[key] = identity
