"""Audit records: contents per kind of decision, the canonical encoding, and what never gets in."""

from __future__ import annotations

import dataclasses
import hashlib

import orjson
import pytest
from audit_helpers import T0, deny_event, error_event, make_event, malformed_event

from gateway.audit.chain import Chain, new_chain_id
from gateway.audit.record import (
    EVENT_FIELDS,
    REDACTED,
    AuditEvent,
    AuditRecord,
    canonical,
    event_values,
    genesis_hash,
    record_from_dict,
)
from gateway.audit.redact import Redactor, audit_session_hash, truncate_ip

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1LTEyMyIsImV4cCI6MX0.c2lnbmF0dXJlLWJ5dGVzLWhlcmU"


def seal(event: AuditEvent) -> AuditRecord:
    return Chain("host:1:1").seal(Redactor().apply(event))


def test_audit_allow_record_carries_every_fact() -> None:
    """An allowed request's record holds who, what, from which device, which rule, and timings."""
    rec = seal(make_event())
    e = rec.event
    assert (rec.kind, rec.decision, rec.reasons, rec.route) == ("request", "allow", (), "wiki")
    assert (e.method, e.host, e.path, e.status) == (
        "GET",
        "wiki.town.example",
        "/pages/budget",
        200,
    )
    assert (e.user_issuer, e.user_subject, e.user_email) == (
        "https://idp.town.example",
        "u-123",
        "sato@town.example",
    )
    assert e.groups == ("staff", "finance")
    assert (e.device_id, e.posture_age_s, e.rule) == ("dev-42", 30, "staff-wiki")
    assert (e.bytes_in, e.bytes_out, e.client_ip, e.country) == (512, 2048, "192.0.2.10", "JP")
    assert e.latency_ms == 12.346
    assert e.latency_us == 12346
    assert rec.time_us == T0
    assert rec.seq == 1
    assert rec.prev_hash == genesis_hash("host:1:1")
    assert rec.refused is False


def test_audit_deny_error_and_malformed_records() -> None:
    """Refusals keep their reason codes and status; a malformed request needs no route or user."""
    deny, err, bad = seal(deny_event()), seal(error_event()), seal(malformed_event())
    assert (deny.decision, deny.reasons, deny.event.status, deny.refused) == (
        "deny",
        ("device-posture-stale",),
        403,
        True,
    )
    assert (err.decision, err.reasons, err.event.status, err.refused) == (
        "error",
        ("upstream-unreachable",),
        502,
        True,
    )
    assert (bad.decision, bad.reasons, bad.event.status) == ("deny", ("rejected",), 400)
    assert bad.route == ""
    assert bad.user is None
    assert bad.event.device_id is None


def test_audit_session_id_is_hashed_again() -> None:
    """The stored session hash is not the live store's key: sha256("audit:" + value)[:32]."""
    rec = seal(make_event(session_hash="ab" * 32))
    assert rec.event.session_hash == hashlib.sha256(b"audit:" + b"ab" * 32).hexdigest()[:32]
    assert rec.event.session_hash != "ab" * 32
    assert audit_session_hash("x") != audit_session_hash("y")


def test_audit_canonical_encoding_is_stable() -> None:
    """The canonical bytes of a fixed event are exactly the documented array (golden hash)."""
    event = make_event(detail={"b": 2, "a": "x"})
    data = canonical("host:1:1", 7, event)
    decoded = orjson.loads(data)
    assert decoded[:3] == [1, "host:1:1", 7]
    assert dict(zip(EVENT_FIELDS, decoded[3:], strict=True))["latency_us"] == 12346
    assert b'"detail"' not in data
    assert b'{"a":"x","b":2}' in data
    assert data == (
        b'[1,"host:1:1",7,"request",1790000000000000,"01J9ZQ3K7Y8W","wiki","GET",'
        b'"wiki.town.example","/pages/budget",null,"192.0.2.10","JP","https://idp.town.example",'
        b'"u-123","sato@town.example",["staff","finance"],"' + b"ab" * 32 + b'","dev-42",'
        b'"linux 6.1 disk=on fw=on",30,"sha256:' + b"cd" * 32 + b'","staff-wiki","allow",[],'
        b'200,512,2048,null,null,{"a":"x","b":2},12346]'
    )
    assert hashlib.sha256(data).hexdigest() == (
        "58b74708c21dffb34839d155a1c1c0cf95811504a1222b8e5604c9caa1d4e133"
    )


def test_audit_field_order_matches_values() -> None:
    """EVENT_FIELDS and event_values agree, so a record round-trips through a dict unchanged."""
    rec = seal(deny_event(detail={"n": 1.5, "flag": True, "none": None}, query="a=1"))
    assert len(EVENT_FIELDS) == len(event_values(rec.event))
    again = record_from_dict(orjson.loads(orjson.dumps(rec.to_dict())))
    assert again == rec
    assert again.computed_hash() == rec.hash


def test_audit_control_characters_are_escaped() -> None:
    """CR, LF, NUL, ESC, U+2028 and bidi overrides become literal \\uXXXX text in every field."""
    nasty = "a\r\nb\x00c\x1b[31md\u2028e\u202ef"
    rec = seal(
        make_event(
            path="/" + nasty,
            user_email=nasty,
            groups=(nasty,),
            reasons=(nasty,),
            detail={nasty: nasty},
            host=nasty,
            rule=nasty,
        )
    )
    text = orjson.dumps(rec.to_dict()).decode()
    for ch in "\r\n\x00\x1b\u2028\u202e":
        assert ch not in text
        assert ch not in repr(rec.event)
        assert all(ch not in str(v) for v in event_values(rec.event))
    assert rec.event.user_email == "a\\u000d\\u000ab\\u0000c\\u001b[31md\\u2028e\\u202ef"
    assert dataclasses.replace(rec.event) == rec.event  # idempotent: hashes survive reads


def test_audit_secrets_never_reach_a_record() -> None:
    """Tokens in the query, detail values that look like JWTs, bearer values or random keys, and
    secret-named detail keys are replaced by [redacted]."""
    event = make_event(
        query=f"page=2&token=abc&code=xyz&access_token={JWT}&Password=hunter2&authState=1"
        f"&next={JWT}&q=budget",
        path=f"/reset/{JWT}/done",
        detail={
            "note": f"Bearer {JWT}",
            "api": "sk_live_4eC39HqLyjWDarjtT1zdp7dc9x",
            "client_secret": "s",
            "reason": "ok",
            "policy": "sha256:" + "ab" * 32,
            "count": 3,
        },
    )
    rec = seal(event)
    text = orjson.dumps(rec.to_dict()).decode()
    assert JWT not in text
    assert "hunter2" not in text
    assert "abc" not in text
    assert "4eC39HqLyjWDarjtT1zdp7dc9x" not in text
    assert rec.event.query == (
        f"page=2&token={REDACTED}&code={REDACTED}&access_token={REDACTED}&Password={REDACTED}"
        f"&authState={REDACTED}&next={REDACTED}&q=budget"
    )
    assert rec.event.path == f"/reset/{REDACTED}/done"
    assert rec.event.detail == {
        "api": REDACTED,
        "client_secret": REDACTED,
        "count": 3,
        "note": REDACTED,
        "policy": "sha256:" + "ab" * 32,
        "reason": "ok",
    }


def test_audit_event_has_no_field_for_headers_or_cookies() -> None:
    """There is no way to hand headers, cookies or Authorization to an event."""
    names = {f.name for f in dataclasses.fields(AuditEvent)}
    assert not names & {"headers", "cookies", "cookie", "authorization", "token"}
    with pytest.raises(TypeError):
        AuditEvent(kind="request", time_us=T0, headers={"cookie": "x"})  # type: ignore[call-arg]


def test_audit_event_rejects_unknown_kind_and_decision() -> None:
    """A typo in kind or decision is a bug, refused at construction."""
    with pytest.raises(ValueError, match="kind"):
        make_event(kind="requests")
    with pytest.raises(ValueError, match="decision"):
        make_event(decision="permit")


def test_audit_redactor_applies_town_options() -> None:
    """IPs keep their /24 (or /48), e-mails become stable pseudonyms, the query is dropped."""
    r = Redactor(client_ip="truncate", user_email="hash", query="drop", country="drop")
    a = r.apply(make_event(query="a=1"))
    b = r.apply(make_event(request_id="other"))
    assert a.client_ip == "192.0.2.0/24"
    assert a.query is None
    assert a.country is None
    assert a.user_email is not None
    assert a.user_email.startswith("h:")
    assert a.user_email == b.user_email
    assert "sato" not in a.user_email
    assert truncate_ip("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert Redactor(client_ip="drop").apply(make_event()).client_ip == ""


def test_audit_chain_links_each_record_to_the_previous() -> None:
    """seq counts up and each prev_hash is the hash before it; chain ids are per process."""
    chain = Chain("host:1:1")
    recs = [chain.seal(make_event(request_id=str(i))) for i in range(3)]
    assert [r.seq for r in recs] == [1, 2, 3]
    assert recs[1].prev_hash == recs[0].hash
    assert recs[2].prev_hash == recs[1].hash
    assert all(r.computed_hash() == r.hash for r in recs)
    assert new_chain_id(5).endswith(":5")
    assert new_chain_id(5).count(":") == 2


_ONE_FIELD = (
    "request_id",
    "route",
    "method",
    "host",
    "client_ip",
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


@pytest.mark.parametrize("name", [*_ONE_FIELD, "groups", "reasons"])
def test_audit_one_unprintable_field_among_clean_ones_is_escaped(name: str) -> None:
    """A single control character in any one text field, group or reason is escaped even when
    every other field is clean (the one-pass fast check must not let it through)."""
    nasty = "ok\x1b[2Jforged\nline"
    value: object = (nasty,) if name in ("groups", "reasons") else nasty
    event = make_event(**{name: value})
    got = getattr(event, name)
    text = "".join(got) if isinstance(got, tuple) else got
    assert "\x1b" not in text
    assert "\n" not in text
    assert "\\u001b" in text


def test_audit_one_overlong_field_is_cut() -> None:
    """A text field longer than MAX_TEXT is cut even when it is printable and all else is clean."""
    event = make_event(rule="r" * 5000)
    assert event.rule is not None
    assert len(event.rule) == 2048 + 1
    assert event.rule.endswith("…")


def test_audit_evolve_replaces_only_the_named_fields() -> None:
    """evolve() copies every field and replaces only those named (redaction relies on it)."""
    event = make_event()
    copy = event.evolve(session_hash="0" * 32, client_ip="")
    assert copy.session_hash == "0" * 32
    assert copy.client_ip == ""
    assert dataclasses.replace(
        copy, session_hash=event.session_hash, client_ip=event.client_ip
    ) == (event)
