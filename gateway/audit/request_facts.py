"""Encodes a finished request straight to its canonical audit bytes, with no AuditEvent built.

Byte for byte `canonical(chain_id, seq, redactor.apply(request_event(outcome)))`:
trail.request_event stays the spec; tests/gateway/test_audit_request_facts.py proves the equality
with hypothesis. Facts that repeat between requests (an identity, a device, a path, a detail)
are cached in small bounded maps. Pure; must not import gateway.settings or gateway.pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import orjson

from gateway.audit.record import (
    _MIN_SECRET,
    CANONICAL_VERSION,
    MAX_TEXT,
    _clean_detail,
    escape_controls,
    redact_path,
    redact_query,
)
from gateway.audit.redact import Redactor, audit_session_hash, pseudonym, truncate_ip

CACHE_SIZE: Final = 4096  # entries per cache; a full cache is emptied (an attacker's spray of
# unique paths costs us a re-computation, never memory)
_DECISIONS: Final = {"allow": "allow", "deny": "deny"}
_SORT: Final = orjson.OPT_SORT_KEYS


# AuditEvent copies `detail` into a clean dict of its own: these are never handed out mutable.
_VIA: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {"session": MappingProxyType({"via": "session"}), "bearer": MappingProxyType({"via": "bearer"})}
)
_NO_DETAIL: Final[Mapping[str, str]] = MappingProxyType({})


def request_detail(identity: Any, device: Any, ctx: Any) -> Mapping[str, str]:
    """How the user proved who they are ("via": session or bearer) and how the device was proved
    ("device_via": proof, certificate or session binding). Not "auth…": detail keys that look
    like credentials (auth*, *token*…) are redacted, which made such a name useless."""
    channel = ctx.device_channel if device is not None else None
    if channel is None:
        return _VIA[identity.method] if identity is not None else _NO_DETAIL
    if identity is None:
        return {"device_via": channel}
    return {"device_via": channel, "via": identity.method}


def _esc(value: str | None) -> str | None:
    return None if value is None else escape_controls(value)


def _esc_list(values: tuple[str, ...]) -> list[str]:
    # As AuditEvent: groups and reasons are kept whole when all printable (no cut), else each
    # is escaped and cut.
    if "".join(values).isprintable():
        return list(values)
    return [escape_controls(str(v)) for v in values]


class RequestEncoder:
    """One per chain (writer): `encode(seq, outcome)` -> the record's canonical bytes."""

    def __init__(self, chain_id: str, redactor: Redactor) -> None:
        self.chain_id = chain_id
        self._r = redactor
        self._plain_ip = redactor.client_ip == "keep"
        # Keyed by the facts themselves, not the objects: the identity stage makes a new
        # Identity per request (from its cached session), with the same strings inside.
        self._idents: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._devices: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._paths: dict[str, str] = {}
        self._details: dict[tuple[str | None, str | None], dict[str, Any]] = {}

    # ---------------------------------------------------------------- cached facts

    def _identity(self, identity: Any) -> tuple[Any, ...]:
        """(issuer, subject, email, groups, session hash) as stored: escaped, then redacted."""
        key = (
            identity.issuer,
            identity.subject,
            identity.email,
            identity.groups,
            identity.session_hash,
        )
        hit = self._idents.get(key)
        if hit is not None:
            return hit
        r = self._r
        subject = escape_controls(identity.subject)
        email = _esc(identity.email)
        if r.user_subject != "keep":
            subject = pseudonym("user_subject", subject) if r.user_subject == "hash" else None  # type: ignore[assignment]  # None: dropped
        if r.user_email != "keep" and email is not None:
            email = pseudonym("user_email", email) if r.user_email == "hash" else None
        session = _esc(identity.session_hash)
        if session:
            session = audit_session_hash(session)
        facts = (
            escape_controls(identity.issuer),
            subject,
            email,
            _esc_list(tuple(sorted(identity.groups))),
            session,
        )
        if len(self._idents) >= CACHE_SIZE:
            self._idents.clear()
        self._idents[key] = facts
        return facts

    def _device_id(self, value: str | None) -> str | None:
        value = _esc(value)
        mode = self._r.device_id
        if mode != "keep" and value is not None:
            return pseudonym("device_id", value) if mode == "hash" else None
        return value

    def _device(self, device: Any) -> tuple[Any, ...]:
        """(device id, posture summary, posture_at) as stored."""
        key = (device.id, device.posture_summary, device.posture_at)
        hit = self._devices.get(key)
        if hit is not None:
            return hit
        posture = None if self._r.posture == "drop" else _esc(device.posture_summary)
        facts = (self._device_id(device.id), posture, device.posture_at)
        if len(self._devices) >= CACHE_SIZE:
            self._devices.clear()
        self._devices[key] = facts
        return facts

    def _path(self, path: str) -> str:
        if len(path) < _MIN_SECRET and path.isprintable():
            return path
        out = self._paths.get(path)
        if out is None:
            out = redact_path(path)
            if len(self._paths) >= CACHE_SIZE:
                self._paths.clear()
            self._paths[path] = out
        return out

    def _detail(self, identity: Any, device: Any, ctx: Any) -> dict[str, Any]:
        key = (
            identity.method if identity is not None else None,
            ctx.device_channel if device is not None else None,
        )
        out = self._details.get(key)
        if out is None:
            out = _clean_detail(request_detail(identity, device, ctx))
            self._details[key] = out  # a handful of combinations at most
        return out

    def _client_ip(self, ip: str) -> str:
        mode = self._r.client_ip
        if not ip:
            return ip
        if mode == "truncate":
            return truncate_ip(ip)
        if mode == "hash":
            return pseudonym("client_ip", ip)
        return ""

    # ---------------------------------------------------------------- the record

    def encode(self, seq: int, o: Any) -> bytes:  # noqa: PLR0912, PLR0915  # one straight pass, like request_event
        """The canonical bytes of the outcome's record at `seq` in this chain."""
        ctx = o.ctx
        if ctx is not None:
            peer = ctx.peer
            identity = ctx.identity
            device = ctx.device
            method = ctx.method
            target = ctx.target
            path = target.path
            query = (target.query or None) if ctx.route.audit_query else None
        else:
            peer = o.peer
            identity = device = None
            method = o.method
            path = o.target.path if o.target is not None else ""
            query = None
        if peer is not None:
            host, client_ip = peer.authority, peer.client_ip
        else:
            host, client_ip = "", o.client_ip
        reasons = o.reasons
        code = o.code
        if code and o.decision != "deny" and code not in reasons:
            reasons = (*reasons, code)
        started = o.started
        started_ns = o.started_ns
        finished = o.finished_ns or started_ns
        policy_hash = o.policy_hash
        if policy_hash == "-":
            policy_hash = None
        rid, route, country, rule = o.request_id, o.route, o.country, o.rule
        # The text fields that vary per request, checked in one pass (AuditEvent's fast path);
        # anything long or unprintable takes the exact per-field escape.
        joined = (
            f"{rid}{route}{method}{host}{client_ip}{country or ''}{policy_hash or ''}{rule or ''}"
        )
        if len(joined) > MAX_TEXT or not joined.isprintable():
            rid, route, method, host, client_ip = (
                escape_controls(rid),
                escape_controls(route),
                escape_controls(method),
                escape_controls(host),
                escape_controls(client_ip),
            )
            country, policy_hash, rule = _esc(country), _esc(policy_hash), _esc(rule)
        r = self._r
        if not self._plain_ip:
            client_ip = self._client_ip(client_ip)
        if r.country == "drop":
            country = None
        if query is not None:
            query = None if r.query == "drop" else redact_query(query)
        if identity is not None:
            issuer, subject, email, groups, session = self._identity(identity)
        else:
            issuer = subject = email = session = None
            groups = []
        if device is not None:
            device_id, posture, posture_at = self._device(device)
            age = max(0, int(started - posture_at)) if posture_at is not None else None
        else:
            device_id = self._device_id(o.device_id) if o.device_id is not None else None
            posture = age = None
        result = o.result
        if result is not None:
            bytes_in, bytes_out = result.bytes_in, result.bytes_out
        else:
            bytes_in = bytes_out = 0
        latency_ms = round(float((finished - started_ns) / 1_000_000) * 1000) / 1000
        return orjson.dumps(
            [
                CANONICAL_VERSION,
                self.chain_id,
                seq,
                "request",
                int(started * 1_000_000),
                rid,
                route,
                method,
                host,
                self._path(path),
                query,
                client_ip,
                country,
                issuer,
                subject,
                email,
                groups,
                session,
                device_id,
                posture,
                age,
                policy_hash,
                rule,
                _DECISIONS.get(o.decision, "error"),
                _esc_list(reasons),
                o.status,
                bytes_in,
                bytes_out,
                None,
                None,
                self._detail(identity, device, ctx),
                round(latency_ms * 1000),
            ],
            option=_SORT,
        )
