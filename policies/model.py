"""The values the decision engine works on: the facts of a request in, a Decision out.

Frozen dataclasses only; imports only the standard library (no YAML, no pydantic, no I/O).
Every fact is optional: a missing fact makes the criteria that need it unknown, never an allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from types import MappingProxyType
from typing import Literal

from policies.reasons import Reason

_NO_CLAIMS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Subject:
    """The signed-in user, as the identity provider described them (OIDC Core §5.1 claims)."""

    issuer: str
    subject: str
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    groups: frozenset[str] = frozenset()
    amr: frozenset[str] = frozenset()
    acr: str | None = None
    claims: Mapping[str, object] = field(default_factory=lambda: _NO_CLAIMS)


@dataclass(frozen=True, slots=True)
class Posture:
    """The latest signed posture report of a device; None in a field means "not reported"."""

    os: str | None = None
    os_version: str | None = None
    disk_encrypted: bool | None = None
    firewall: bool | None = None
    screen_lock_timeout: int | None = None  # seconds; 0 or less means the screen never locks
    auto_update: bool | None = None
    patch_age_days: int | None = None
    agent_version: str | None = None
    reported_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """The device the request was proved to come from."""

    id: str
    enrolled: bool = True
    approved: bool = False
    revoked: bool = False  # IT withdrew the enrolment: refused everywhere a device is checked
    owner: str | None = None  # the owner's email or subject id
    tags: frozenset[str] = frozenset()
    key_storage: str | None = None  # "tpm", "secure-enclave", "software", …
    posture: Posture | None = None


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A client certificate the gateway (or its trusted ingress) has already verified."""

    fingerprint_sha256: str  # hex, any case, colons allowed
    subject: str = ""
    san: tuple[str, ...] = ()  # DNS names, emails and URIs from subjectAltName


@dataclass(frozen=True, slots=True)
class Resource:
    """What is being asked for: the route, and the request line with an already normalised path."""

    route: str
    host: str
    path: str
    method: str = "GET"


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """All the facts the gateway has about one request."""

    resource: Resource
    subject: Subject | None = None
    device: Device | None = None
    source_ip: str | None = None
    country: str | None = None  # ISO 3166-1 alpha-2, from GeoIP
    client_certificate: ClientCertificate | None = None


@dataclass(frozen=True, slots=True)
class TravelWindow:
    """IT's approval for one user to work from given countries between two dates (inclusive)."""

    user: str  # email or subject id, compared case-insensitively
    countries: frozenset[str]
    start: date
    end: date
    note: str = ""


Tri = Literal[0, 1, 2]
"""A three-valued truth: FALSE, TRUE, or UNKNOWN (a needed fact is missing)."""
FALSE: Tri = 0
TRUE: Tri = 1
UNKNOWN: Tri = 2


@dataclass(frozen=True, slots=True)
class TraceNode:
    """One evaluated (or skipped) node of a rule: a criterion, `all`/`any`/`none`, or `unless`."""

    kind: str
    words: str
    state: Tri
    reasons: tuple[Reason, ...]
    children: tuple[TraceNode, ...] = ()
    evaluated: bool = True

    @property
    def matched(self) -> bool:
        """Whether this node held for certain."""
        return self.state == TRUE


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """How one rule of the policy came out."""

    effect: Literal["allow", "deny"]
    rule: str
    fired: bool
    node: TraceNode


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer: allowed or not, which rule decided, why, and (on request) a trace."""

    allowed: bool
    policy: str
    rule: str | None
    reasons: tuple[Reason, ...]
    trace: tuple[RuleTrace, ...] = ()
