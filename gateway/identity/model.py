"""Identity: who the request is from, as the session or bearer token proved it (our own type).

The gateway sees this value, never authlib's or pyjwt's dicts. Imports only policies.model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from policies.model import Subject

_NO_CLAIMS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified user. Users are keyed by (issuer, subject), never by e-mail alone."""

    issuer: str
    subject: str
    method: Literal["session", "bearer"]
    provider: str  # the configured provider (or bearer issuer) name
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    groups: frozenset[str] = frozenset()
    groups_overage: bool = False  # Entra ID sent _claim_names/hasgroups instead of the groups
    amr: frozenset[str] = frozenset()
    acr: str | None = None
    claims: Mapping[str, object] = field(default_factory=lambda: _NO_CLAIMS)
    session_hash: str | None = None  # sha256 hex of the session id: safe to log and audit
    idp_sid: str | None = None  # the provider's session id (`sid`), for back-channel logout
    device_id: str | None = None  # the device bound to the session (device trust, #6)
    expires_at: float = 0.0  # unix seconds: session end or token `exp`

    @property
    def key(self) -> tuple[str, str]:
        """The user's identity across providers: (issuer, subject)."""
        return (self.issuer, self.subject)

    def subject_fact(self) -> Subject:
        """The policy engine's view of this user."""
        return Subject(
            issuer=self.issuer,
            subject=self.subject,
            email=self.email,
            email_verified=self.email_verified,
            name=self.name,
            groups=self.groups,
            amr=self.amr,
            acr=self.acr,
            claims=self.claims,
        )
