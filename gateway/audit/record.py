"""Audit values: the event the pipeline hands in, the chained record, and their canonical bytes.

Pure (hashlib, re, orjson): no I/O, no clock. Must not import gateway.settings, app or cli.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal

import orjson

Kind = Literal["request", "admin", "view"]
Decision = Literal["allow", "deny", "error", "info"]
DetailValue = str | int | float | bool | None

KINDS: Final = frozenset({"request", "admin", "view"})
DECISIONS: Final = frozenset({"allow", "deny", "error", "info"})
REDACTED: Final = "[redacted]"
CANONICAL_VERSION: Final = 1
GENESIS_PREFIX: Final = "tabiji-audit-genesis:"
_MIN_SECRET: Final = 14  # no pattern below matches a shorter string
_MIN_TOKEN: Final = 26  # the shortest _JWT match (8 + 1 + 8 + 1 + 8); _LONG_TOKEN needs 32
MAX_TEXT: Final = 2048  # longer strings are cut: a record is evidence, not a dump of the request

# --------------------------------------------------------------------------- sanitising

# A JWT / JWS compact serialisation: three base64url segments (RFC 7515 §7.1), anywhere in a value.
_JWT: Final = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# An HTTP credential (RFC 9110 §11.4): "Bearer …", "Basic …", "DPoP …", "Negotiate …".
_AUTH_SCHEME: Final = re.compile(r"(?i)\b(bearer|basic|dpop|negotiate|digest)\s+\S{8,}")
# A long run of base64/base64url/hex characters: an API key, session id or password hash.
_LONG_TOKEN: Final = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
_SECRET_NAME: Final = re.compile(
    r"(?i)^(auth.*|.*token.*|.*secret.*|.*passw.*|pwd|.*session.*|.*cookie.*|.*key|key.*"
    r"|code|.*signature|sig|jwt|assertion|ticket|otp|credential.*|nonce)$"
)


def escape_controls(value: str) -> str:
    """Escape every non-printable character (C0/C1 controls, line and paragraph separators, bidi
    and zero-width format characters) as a literal `\\uXXXX`, so a record or log line can never be
    split or visually forged (CWE-117), and cut the string at MAX_TEXT characters.

    Idempotent: the output contains only printable characters, so records read back from a store
    come out unchanged (their hashes depend on it)."""
    if len(value) > MAX_TEXT:
        value = value[:MAX_TEXT] + "…"
    if value.isprintable():  # the fast path: one C loop over the string
        return value
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in value)


def _looks_random(run: str) -> bool:
    """A long token made of mixed character classes (not a word, path or plain number)."""
    classes = (
        any(c.islower() for c in run)
        + any(c.isupper() for c in run)
        + any(c.isdigit() for c in run)
    )
    return classes >= 2


def looks_secret(value: str) -> bool:
    """True when a string looks like a credential: a JWT, an Authorization value, or a long random
    token. Digests written as "sha256:<hex>" are not secrets and are kept."""
    if len(value) < _MIN_SECRET:  # shorter than the shortest match ("basic " + 8)
        return False
    if _AUTH_SCHEME.search(value):
        return True
    if len(value) < _MIN_TOKEN:  # too short for a JWT or a long token: skip their searches
        return False
    if _JWT.search(value):
        return True
    for m in _LONG_TOKEN.finditer(value):
        start = m.start()
        if value[max(0, start - 7) : start].lower().endswith("sha256:"):
            continue
        if _looks_random(m.group()):
            return True
    return False


def is_secret_name(name: str) -> bool:
    """A query parameter or detail key whose value must never be kept (token, code, password…)."""
    return bool(_SECRET_NAME.match(name.strip()))


def redact_query(query: str | None) -> str | None:
    """The query string with the values of secret-looking parameters (and secret-looking values)
    replaced by [redacted]. Parameter order and names are kept: they say what was asked."""
    if query is None:
        return None
    parts = []
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if sep and value and (is_secret_name(name) or looks_secret(value)):
            value = REDACTED
        elif not sep and looks_secret(name):
            name = REDACTED
        parts.append(f"{name}{sep}{value}")
    return escape_controls("&".join(parts))


def redact_path(path: str) -> str:
    """The path with JWT-like or random-token segments replaced (e.g. /reset/<token>)."""
    if not looks_secret(path):
        return escape_controls(path)
    return escape_controls(
        "/".join(REDACTED if looks_secret(seg) else seg for seg in path.split("/"))
    )


def _clean_detail(detail: Mapping[str, object]) -> dict[str, DetailValue]:
    out: dict[str, DetailValue] = {}
    for key in sorted(detail):
        value = detail[key]
        k = escape_controls(str(key))
        if isinstance(value, str):
            out[k] = (
                REDACTED if (is_secret_name(k) or looks_secret(value)) else escape_controls(value)
            )
        elif value is None or isinstance(value, bool | int | float):
            out[k] = REDACTED if (is_secret_name(k) and value is not None) else value
        else:  # a caller handed something else (bytes, an object): never store its repr blindly
            out[k] = REDACTED
    return out


def _opt(value: str | None) -> str | None:
    return None if value is None else escape_controls(value)


# --------------------------------------------------------------------------- the event


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One decision or action, as the pipeline (or an admin command) hands it in.

    There is no field for headers or cookies on purpose: secrets have no way in. String fields are
    escaped at construction; the query and `detail` values are redacted when they look secret.
    """

    kind: Kind
    time_us: int  # UTC microseconds since the epoch
    request_id: str = ""
    route: str = ""
    method: str = ""
    host: str = ""
    path: str = ""  # normalised
    query: str | None = None  # only when the route opts in
    client_ip: str = ""
    country: str | None = None
    user_issuer: str | None = None
    user_subject: str | None = None
    user_email: str | None = None
    groups: tuple[str, ...] = ()
    session_hash: str | None = None  # sha256 of the session id; re-hashed again when sealed
    device_id: str | None = None
    posture: str | None = None  # short summary, e.g. "linux 6.1 disk=on fw=on"
    posture_age_s: int | None = None
    policy_hash: str | None = None
    rule: str | None = None
    decision: Decision = "info"
    reasons: tuple[str, ...] = ()
    status: int = 0  # the status the client got (upstream's, or the gateway's refusal)
    latency_ms: float = 0.0  # kept to the microsecond
    bytes_in: int = 0
    bytes_out: int = 0
    action: str | None = None  # "session.revoke", "policy.reload", "audit.view", "login"…
    actor: str | None = None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"audit kind must be one of {sorted(KINDS)}, not {self.kind!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"audit decision must be one of {sorted(DECISIONS)}")
        s = object.__setattr__
        texts = _GET_TEXTS(self)
        groups, reasons = self.groups, self.reasons
        # Fast path (the hot one): every text field, group and reason a plain str (or None)
        # and all of them together short and printable -> nothing to escape or cut. One C-level
        # pass each; anything else takes the exact per-field path below.
        if type(groups) is tuple and type(reasons) is tuple:
            items = (*texts, *groups, *reasons)
            if _TEXT_TYPES.issuperset(map(type, items)):
                joined = "".join(filter(None, items))
                clean = len(joined) <= MAX_TEXT and joined.isprintable()
            else:
                clean = False
        else:
            clean = False
        if not clean:
            self._escape_each(texts)
        if len(self.path) >= _MIN_SECRET or not self.path.isprintable():
            s(self, "path", redact_path(self.path))
        if self.query is not None:
            s(self, "query", redact_query(self.query))
        # One representation for the latency: whole microseconds, so encoding is unambiguous.
        s(self, "latency_ms", round(float(self.latency_ms) * 1000) / 1000)
        if type(self.time_us) is not int:
            s(self, "time_us", int(self.time_us))
        s(self, "detail", _clean_detail(self.detail) if self.detail else {})

    def _escape_each(self, texts: tuple[object, ...]) -> None:
        """The exact path: each text field, group and reason escaped (and cut) on its own."""
        s = object.__setattr__
        for name, value in zip(_TEXT_FIELDS, texts, strict=True):
            if value is not None or name in _REQUIRED_TEXT:
                s(self, name, escape_controls(str("" if value is None else value)))
        groups, reasons = self.groups, self.reasons
        if type(groups) is not tuple or not _printable_strs(groups):
            s(self, "groups", tuple(escape_controls(str(g)) for g in groups))
        if type(reasons) is not tuple or not _printable_strs(reasons):
            s(self, "reasons", tuple(escape_controls(str(r)) for r in reasons))

    def evolve(self, **changes: object) -> AuditEvent:
        """A copy with some fields replaced by values that are ALREADY clean (hashes, pseudonyms,
        truncated networks, None): skips __post_init__, which is the hot path's main cost."""
        new = object.__new__(AuditEvent)
        values = list(_GET_ALL(self))  # every field in one C call
        for name, value in changes.items():
            values[_FIELD_INDEX[name]] = value
        for put, value in zip(
            _SETTERS, values, strict=True
        ):  # slot descriptors: no frozen __setattr__
            put(new, value)
        return new

    @property
    def latency_us(self) -> int:
        """The latency in whole microseconds (the canonical form)."""
        return round(self.latency_ms * 1000)

    @property
    def user(self) -> str | None:
        """Who, for people: the e-mail when known, else the subject."""
        return self.user_email or self.user_subject


_REQUIRED_TEXT: Final = ("request_id", "route", "method", "host", "client_ip")
_TEXT_FIELDS: Final = (
    *_REQUIRED_TEXT,
    "country",
    "user_issuer",
    "user_subject",
    "user_email",
    "session_hash",
    "device_id",
    "posture",
    "policy_hash",
    "rule",
    "action",
    "actor",
)
_FIELD_NAMES: Final = tuple(f.name for f in fields(AuditEvent))
_FIELD_INDEX: Final = {name: i for i, name in enumerate(_FIELD_NAMES)}
_GET_ALL: Final = operator.attrgetter(*_FIELD_NAMES)
_SETTERS: Final[tuple[Any, ...]] = tuple(AuditEvent.__dict__[n].__set__ for n in _FIELD_NAMES)
_GET_TEXTS: Final = operator.attrgetter(*_TEXT_FIELDS)
_TEXT_TYPES: Final = frozenset({str, type(None)})


def _printable_strs(values: tuple[object, ...]) -> bool:
    """Every element a plain str, and all of them printable."""
    return all(type(v) is str for v in values) and "".join(values).isprintable()  # type: ignore[arg-type]  # all str: checked just before


# The canonical field order: NEVER reorder or rename — old records' hashes depend on it.
# New fields are appended and bump CANONICAL_VERSION.
EVENT_FIELDS: Final[tuple[str, ...]] = (
    *(f.name for f in fields(AuditEvent) if f.name != "latency_ms"),
    "latency_us",
)


def event_values(event: AuditEvent) -> list[Any]:
    """The event's values in EVENT_FIELDS order (lists for tuples, a key-sorted dict for detail)."""
    e = event
    return [
        e.kind,
        e.time_us,
        e.request_id,
        e.route,
        e.method,
        e.host,
        e.path,
        e.query,
        e.client_ip,
        e.country,
        e.user_issuer,
        e.user_subject,
        e.user_email,
        list(e.groups),
        e.session_hash,
        e.device_id,
        e.posture,
        e.posture_age_s,
        e.policy_hash,
        e.rule,
        e.decision,
        list(e.reasons),
        e.status,
        e.bytes_in,
        e.bytes_out,
        e.action,
        e.actor,
        dict(e.detail),
        e.latency_us,
    ]


def event_from_values(values: Mapping[str, Any]) -> AuditEvent:
    """Rebuild an event from a mapping keyed by EVENT_FIELDS (lists for tuples, detail dict)."""
    return AuditEvent(
        kind=values["kind"],
        time_us=int(values["time_us"]),
        request_id=values["request_id"],
        route=values["route"],
        method=values["method"],
        host=values["host"],
        path=values["path"],
        query=values["query"],
        client_ip=values["client_ip"],
        country=values["country"],
        user_issuer=values["user_issuer"],
        user_subject=values["user_subject"],
        user_email=values["user_email"],
        groups=tuple(values["groups"]),
        session_hash=values["session_hash"],
        device_id=values["device_id"],
        posture=values["posture"],
        posture_age_s=values["posture_age_s"],
        policy_hash=values["policy_hash"],
        rule=values["rule"],
        decision=values["decision"],
        reasons=tuple(values["reasons"]),
        status=int(values["status"]),
        latency_ms=int(values["latency_us"]) / 1000,
        bytes_in=int(values["bytes_in"]),
        bytes_out=int(values["bytes_out"]),
        action=values["action"],
        actor=values["actor"],
        detail=dict(values["detail"]),
    )


def canonical(chain_id: str, seq: int, event: AuditEvent) -> bytes:
    """The bytes a record's hash covers: a JSON array [version, chain_id, seq, *EVENT_FIELDS values]
    in the fixed order above (orjson: UTF-8, no whitespace, detail keys sorted; integers only
    for times and latency, so no float formatting ambiguity in the core fields)."""
    return orjson.dumps(
        [CANONICAL_VERSION, chain_id, seq, *event_values(event)], option=orjson.OPT_SORT_KEYS
    )


def genesis_hash(chain_id: str) -> str:
    """The prev_hash of a chain's first record: sha256("tabiji-audit-genesis:" + chain_id)."""
    return hashlib.sha256((GENESIS_PREFIX + chain_id).encode()).hexdigest()


def chain_hash(prev_hash: str, chain_id: str, seq: int, event: AuditEvent) -> str:
    """sha256(prev_hash bytes || canonical bytes), hex."""
    h = hashlib.sha256(bytes.fromhex(prev_hash))
    h.update(canonical(chain_id, seq, event))
    return h.hexdigest()


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An event sealed into a chain: (chain_id, seq) names it; hash covers prev_hash + event."""

    event: AuditEvent
    chain_id: str
    seq: int  # 1-based position in its chain
    prev_hash: str
    hash: str

    def computed_hash(self) -> str:
        """The hash this record's contents imply (verify compares it with `hash`)."""
        return chain_hash(self.prev_hash, self.chain_id, self.seq, self.event)

    # Human-facing shortcuts for the view and the CLI.
    @property
    def kind(self) -> str:
        return self.event.kind

    @property
    def time_us(self) -> int:
        return self.event.time_us

    @property
    def decision(self) -> str:
        return self.event.decision

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.event.reasons

    @property
    def user(self) -> str | None:
        return self.event.user

    @property
    def route(self) -> str:
        return self.event.route

    @property
    def refused(self) -> bool:
        """A request the gateway did not let through (deny or error)."""
        return self.event.decision in ("deny", "error")

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready form (chain fields first); the inverse of `record_from_dict`."""
        out: dict[str, Any] = {
            "chain_id": self.chain_id,
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }
        out.update(zip(EVENT_FIELDS, event_values(self.event), strict=True))
        return out


def record_from_dict(d: Mapping[str, Any]) -> AuditRecord:
    """Rebuild a record from `AuditRecord.to_dict()` output (spool lines, JSONL exports)."""
    return AuditRecord(
        event=event_from_values(d),
        chain_id=str(d["chain_id"]),
        seq=int(d["seq"]),
        prev_hash=str(d["prev_hash"]),
        hash=str(d["hash"]),
    )


def with_event(record: AuditRecord, event: AuditEvent) -> AuditRecord:
    """A copy of the record with another event (tests build tampered records with it)."""
    return replace(record, event=event)
