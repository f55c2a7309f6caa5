"""Request facts and test cases written in YAML: parse them, run them, report pass or fail.

Used by `tabiji-policy test` and `explain` (and the test suite). Reads plain data that
`policies.loader` / `policies.yaml_source` produced; every problem carries file:line:column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Final

from policies.criteria import PathKey, suggest
from policies.engine import PolicySet, evaluate
from policies.loader import RawCase
from policies.model import (
    AccessRequest,
    ClientCertificate,
    Decision,
    Device,
    Posture,
    Resource,
    Subject,
)
from policies.reasons import Reason
from policies.yaml_source import Position, SourceError, YamlDocument

REQUEST_KEYS: Final = (
    "resource",
    "subject",
    "device",
    "source_ip",
    "country",
    "client_certificate",
)
CASE_KEYS: Final = ("name", "policy", "now", "request", "expect", "rule", "reasons")
_FIELDS: Final[Mapping[str, Mapping[str, str]]] = {
    "resource": {"route": "text", "host": "text", "path": "text", "method": "text"},
    "subject": {
        "issuer": "text",
        "subject": "text",
        "email": "text",
        "email_verified": "bool",
        "name": "text",
        "groups": "texts",
        "amr": "texts",
        "acr": "text",
        "claims": "mapping",
    },
    "device": {
        "id": "text",
        "enrolled": "bool",
        "approved": "bool",
        "revoked": "bool",
        "owner": "text",
        "tags": "texts",
        "key_storage": "text",
        "posture": "mapping",
    },
    "posture": {
        "os": "text",
        "os_version": "text",
        "disk_encrypted": "bool",
        "firewall": "bool",
        "screen_lock_timeout": "int",
        "auto_update": "bool",
        "patch_age_days": "int",
        "agent_version": "text",
        "reported_at": "time",
    },
    "client_certificate": {"fingerprint_sha256": "text", "subject": "text", "san": "texts"},
}


@dataclass(frozen=True, slots=True)
class Case:
    """One test case: a request under a policy at a moment, and the decision expected."""

    name: str
    policy: str
    now: datetime
    request: AccessRequest
    allow: bool
    rule: str | None
    reasons: tuple[Reason, ...] | None
    position: Position


@dataclass(frozen=True, slots=True)
class CaseResult:
    """How one case came out."""

    case: Case
    decision: Decision
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """Whether the decision was the expected one."""
        return not self.problems


class _Reader:
    """Turns plain YAML data into model values, collecting every problem with its place."""

    def __init__(self, doc: YamlDocument, errors: list[SourceError]) -> None:
        self.doc = doc
        self.errors = errors

    def error(self, path: PathKey, message: str, hint: str = "", *, key: bool = False) -> None:
        self.errors.append(SourceError(self.doc.position_of(path, key=key), message, hint))

    def fields(self, data: object, path: PathKey, kind: str) -> dict[str, object] | None:
        spec = _FIELDS[kind]
        if not isinstance(data, dict):
            self.error(path, f"'{kind}' needs a mapping", "its keys: " + ", ".join(spec))
            return None
        out: dict[str, object] = {}
        ok = True
        for key, value in data.items():
            where = (*path, key)
            kind_of = spec.get(str(key))
            if kind_of is None:
                hint = suggest(str(key), spec) or "its keys: " + ", ".join(spec)
                self.error(where, f"unknown key '{key}' in '{kind}'", hint, key=True)
                ok = False
            elif kind_of == "text" and isinstance(value, str | int | float):
                out[key] = str(value)
            elif _fits(kind_of, value):
                out[key] = value
            elif kind_of == "texts" and isinstance(value, list):
                out[key] = frozenset(str(v) for v in value)
            elif kind_of == "mapping" and isinstance(value, dict):
                out[key] = value
            elif kind_of == "time" and (moment := _moment(value)) is not None:
                out[key] = moment
            else:
                self.error(where, f"'{key}' must be {_KIND_WORDS[kind_of]}")
                ok = False
        return out if ok else None

    def request(self, data: object, path: PathKey) -> AccessRequest | None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(path, "request facts are a mapping", "its keys: " + ", ".join(REQUEST_KEYS))
            return None
        ok = True
        for key in data:
            if key not in REQUEST_KEYS:
                hint = suggest(str(key), REQUEST_KEYS) or "its keys: " + ", ".join(REQUEST_KEYS)
                self.error((*path, key), f"unknown fact '{key}'", hint, key=True)
                ok = False
        resource = self.fields(data.get("resource", {}), (*path, "resource"), "resource")
        subject = device = certificate = None
        if "subject" in data:
            subject = self.subject(data["subject"], (*path, "subject"))
            ok = ok and subject is not None
        if "device" in data:
            device = self.device(data["device"], (*path, "device"))
            ok = ok and device is not None
        if "client_certificate" in data:
            fields = self.fields(
                data["client_certificate"], (*path, "client_certificate"), "client_certificate"
            )
            if fields is None:
                return None
            certificate = ClientCertificate(
                _text(fields, "fingerprint_sha256") or "",
                _text(fields, "subject") or "",
                tuple(sorted(_texts(fields, "san"))),
            )
        for key in ("source_ip", "country"):
            if key in data and not isinstance(data[key], str):
                self.error((*path, key), f"'{key}' must be text", "quote it")
                ok = False
        if resource is None or not ok:
            return None
        return AccessRequest(
            resource=Resource(
                _text(resource, "route") or "test",
                _text(resource, "host") or "app.example.jp",
                _text(resource, "path") or "/",
                _text(resource, "method") or "GET",
            ),
            subject=subject,
            device=device,
            source_ip=data.get("source_ip"),
            country=data.get("country"),
            client_certificate=certificate,
        )

    def subject(self, data: object, path: PathKey) -> Subject | None:
        fields = self.fields(data, path, "subject")
        if fields is None:
            return None
        claims = fields.get("claims")
        return Subject(
            issuer=_text(fields, "issuer") or "https://idp.example.jp",
            subject=_text(fields, "subject") or "user",
            email=_text(fields, "email"),
            email_verified=fields.get("email_verified") is True,
            name=_text(fields, "name"),
            groups=_texts(fields, "groups"),
            amr=_texts(fields, "amr"),
            acr=_text(fields, "acr"),
            claims={str(k): v for k, v in claims.items()} if isinstance(claims, dict) else {},
        )

    def device(self, data: object, path: PathKey) -> Device | None:
        fields = self.fields(data, path, "device")
        if fields is None:
            return None
        posture = None
        if "posture" in fields:
            p = self.fields(fields["posture"], (*path, "posture"), "posture")
            if p is None:
                return None
            reported = p.get("reported_at")
            posture = Posture(
                os=_text(p, "os"),
                os_version=_text(p, "os_version"),
                disk_encrypted=_flag(p, "disk_encrypted"),
                firewall=_flag(p, "firewall"),
                screen_lock_timeout=_int(p, "screen_lock_timeout"),
                auto_update=_flag(p, "auto_update"),
                patch_age_days=_int(p, "patch_age_days"),
                agent_version=_text(p, "agent_version"),
                reported_at=reported if isinstance(reported, datetime) else None,
            )
        return Device(
            id=_text(fields, "id") or "device",
            enrolled=fields.get("enrolled", True) is True,
            approved=fields.get("approved") is True,
            revoked=fields.get("revoked") is True,
            owner=_text(fields, "owner"),
            tags=_texts(fields, "tags"),
            key_storage=_text(fields, "key_storage"),
            posture=posture,
        )


def _text(fields: Mapping[str, object], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def _texts(fields: Mapping[str, object], key: str) -> frozenset[str]:
    value = fields.get(key)
    return (
        frozenset(v for v in value if isinstance(v, str))
        if isinstance(value, frozenset)
        else frozenset()
    )


def _flag(fields: Mapping[str, object], key: str) -> bool | None:
    value = fields.get(key)
    return value if isinstance(value, bool) else None


def _int(fields: Mapping[str, object], key: str) -> int | None:
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fits(kind: str, value: object) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    return kind == "int" and isinstance(value, int) and not isinstance(value, bool)


_KIND_WORDS: Final = {
    "text": "text",
    "bool": "true or false",
    "int": "a whole number",
    "texts": "a list",
    "mapping": "a mapping",
    "time": "a date and time with an offset, such as 2025-04-01T10:00:00+09:00",
}


def _moment(value: object) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value
    return None


def parse_request(
    doc: YamlDocument, data: object, path: PathKey, errors: list[SourceError]
) -> AccessRequest | None:
    """Read request facts (the `request:` of a case, or a facts file for `explain`)."""
    return _Reader(doc, errors).request(data, path)


def parse_now(
    doc: YamlDocument, value: object, path: PathKey, errors: list[SourceError]
) -> datetime | None:
    """Read a moment with its UTC offset; a date alone or a naive time is an error."""
    moment = _moment(value)
    if moment is None or (isinstance(value, date) and not isinstance(value, datetime)):
        errors.append(
            SourceError(
                doc.position_of(path),
                f"'{value}' is not a date and time with an offset",
                "write 2025-04-01T10:00:00+09:00",
            )
        )
        return None
    return moment


def compile_cases(
    raw_cases: tuple[RawCase, ...], policy_set: PolicySet, default_now: datetime
) -> tuple[list[Case], list[SourceError]]:
    """Turn raw cases into Cases; unknown policies, facts and reason codes are errors."""
    errors: list[SourceError] = []
    cases: list[Case] = []
    for raw in raw_cases:
        case = _compile_case(raw, policy_set, default_now, errors)
        if case is not None:
            cases.append(case)
    return cases, errors


def _compile_case(  # noqa: PLR0911, PLR0912 — each malformed part is reported, then given up
    raw: RawCase, policy_set: PolicySet, default_now: datetime, errors: list[SourceError]
) -> Case | None:
    doc, path, data = raw.document, raw.path, raw.data
    reader = _Reader(doc, errors)
    if not isinstance(data, dict):
        reader.error(path, "a test case is a mapping", "its keys: " + ", ".join(CASE_KEYS))
        return None
    bad = False
    for key in data:
        if key not in CASE_KEYS:
            hint = suggest(str(key), CASE_KEYS) or "its keys: " + ", ".join(CASE_KEYS)
            reader.error((*path, key), f"unknown key '{key}' in a test case", hint, key=True)
            bad = True
    for key in ("name", "policy", "expect"):
        if key not in data:
            reader.error(path, f"a test case needs '{key}:'")
            bad = True
    if bad:
        return None
    name, policy = str(data["name"]), str(data["policy"])
    if policy_set.policy(policy) is None:
        hint = suggest(policy, policy_set.names())
        reader.error((*path, "policy"), f"unknown policy '{policy}'", hint)
        return None
    if data["expect"] not in {"allow", "deny"}:
        reader.error((*path, "expect"), "'expect' is allow or deny")
        return None
    now = default_now
    if "now" in data:
        parsed = parse_now(doc, data["now"], (*path, "now"), errors)
        if parsed is None:
            return None
        now = parsed
    request = parse_request(doc, data.get("request"), (*path, "request"), errors)
    if request is None:
        return None
    reasons: tuple[Reason, ...] | None = None
    if "reasons" in data:
        codes = data["reasons"]
        if not isinstance(codes, list):
            reader.error((*path, "reasons"), "'reasons' is a list of reason codes")
            return None
        found = []
        for index, code in enumerate(codes):
            try:
                found.append(Reason(code))
            except ValueError:
                hint = suggest(str(code), [r.value for r in Reason])
                reader.error((*path, "reasons", index), f"unknown reason code '{code}'", hint)
                return None
        reasons = tuple(found)
    rule = data.get("rule")
    return Case(
        name,
        policy,
        now,
        request,
        data["expect"] == "allow",
        None if rule is None else str(rule),
        reasons,
        doc.position_of(path),
    )


def run_case(case: Case, policy_set: PolicySet) -> CaseResult:
    """Decide the case's request and compare with what it expects."""
    policy = policy_set.policy(case.policy)
    if policy is None:
        decision = Decision(False, case.policy, None, (Reason.POLICY_UNKNOWN,))
    else:
        decision = evaluate(policy, case.request, case.now)
    problems = []
    if decision.allowed != case.allow:
        problems.append("expected " + ("allow" if case.allow else "deny"))
    if case.rule is not None and decision.rule != case.rule:
        problems.append(f"expected rule '{case.rule}', got '{decision.rule}'")
    if case.reasons is not None and decision.reasons != case.reasons:
        want = ", ".join(case.reasons) or "none"
        got = ", ".join(decision.reasons) or "none"
        problems.append(f"expected reasons [{want}], got [{got}]")
    return CaseResult(case, decision, tuple(problems))
