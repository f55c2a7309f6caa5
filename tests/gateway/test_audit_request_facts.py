"""The fast request encoder: byte for byte the canonical bytes of the reference request_event,
under every redaction option, with control characters, secret-looking paths and queries, None
vs empty, device facts and the way the device was proved; its caches never serve stale facts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from factories import make_peer, make_route
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit.record import canonical
from gateway.audit.redact import Redactor
from gateway.audit.request_facts import RequestEncoder
from gateway.audit.trail import request_event
from gateway.context import DeviceContext, RequestContext
from gateway.forward import ForwardResult
from gateway.identity.model import Identity
from gateway.pipeline import Outcome
from gateway.target import Target
from policies.model import Device

CHAIN = "host:42:1790000000000000"

# Text with what attackers and odd clients send: controls, line/paragraph separators, bidi and
# zero-width characters, non-ASCII, and long runs.
_ODD = st.sampled_from(
    ["\n", "\r", "\x00", "\x1b", "\u2028", "\u202e", "\u200b", "\x85", "é", "宿"]
)
text = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from("abcXYZ019-_./=&?%"), _ODD), max_size=60).map("".join),
    st.just(""),
    st.integers(2040, 2100).map(lambda n: "a" * n),  # around the 2,048-character cut
    st.integers(2040, 2100).map(lambda n: "a" * n + "\n"),
)
secretish = st.sampled_from(
    [
        "/reset/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "/api/keys/AbCdEf0123456789AbCdEf0123456789xyz",
        "/files/sha256:" + "ab" * 32,
        "/pages/budget",
        "/a",
        "/",
        "/über/%E5%AE%BF",
        "/x\ny",
    ]
)
query = st.one_of(
    st.sampled_from(
        [
            "",
            "q=budget&page=2",
            "token=abc&x=1",
            "code=xyz123&state=s",
            "x=Bearer abcdefghijklmnop",
            "AbCdEf0123456789AbCdEf0123456789xyz",
            "a=1&\n=2",
        ]
    ),
    text,
)
opt_text = st.one_of(st.none(), text)
ip = st.sampled_from(
    ["192.0.2.10", "2001:db8::1", "0.0.0.0", "", "not-an-ip", "10.0.0.1\n"]  # noqa: S104  # data, not a bind
)
redactors = st.builds(
    Redactor,
    client_ip=st.sampled_from(["keep", "truncate", "hash", "drop"]),
    user_email=st.sampled_from(["keep", "hash", "drop"]),
    user_subject=st.sampled_from(["keep", "hash", "drop"]),
    device_id=st.sampled_from(["keep", "hash", "drop"]),
    country=st.sampled_from(["keep", "drop"]),
    query=st.sampled_from(["keep", "drop"]),
    posture=st.sampled_from(["keep", "drop"]),
)
identities = st.one_of(
    st.none(),
    st.builds(
        Identity,
        issuer=text,
        subject=text,
        method=st.sampled_from(["session", "bearer"]),
        provider=st.just("town"),
        email=opt_text,
        groups=st.frozensets(text, max_size=4),
        session_hash=st.one_of(st.none(), st.just(""), st.just("ab" * 32), text),
    ),
)
devices = st.one_of(
    st.none(),
    st.builds(
        DeviceContext,
        id=text,
        owner=st.just(("iss", "sub")),
        fact=st.just(Device(id="d")),
        key_storage=st.just("tpm"),
        posture_summary=opt_text,
        posture_at=st.one_of(st.none(), st.floats(1.7e9, 1.8e9)),
        version=st.just(1),
    ),
)
results = st.one_of(
    st.none(),
    st.builds(
        ForwardResult,
        status=st.integers(100, 599),
        bytes_in=st.integers(0, 2**40),
        bytes_out=st.integers(0, 2**40),
        upstream_seconds=st.just(0.001),
    ),
)


@st.composite
def outcomes(draw: st.DrawFn) -> Outcome:
    """A finished request's outcome: routed (with a context) or refused before routing."""
    started = draw(st.floats(1.7e9, 1.8e9))
    started_ns = draw(st.integers(0, 2**50))
    routed = draw(st.booleans())
    peer = make_peer(draw(ip), authority=draw(text)) if routed or draw(st.booleans()) else None
    ctx = None
    if routed:
        assert peer is not None
        route = make_route(name=draw(text), audit_query=draw(st.booleans()))
        device = draw(devices)
        ctx = RequestContext(
            request_id=draw(text),
            method=draw(st.one_of(st.sampled_from(["GET", "POST"]), text)),
            peer=peer,
            target=Target(draw(st.one_of(secretish, text)), draw(query)),
            route=route,
            identity=draw(identities),
            device=device,
            device_channel=draw(st.sampled_from([None, "proof", "certificate", "session"])),
        )
    decision = draw(st.sampled_from(["allow", "deny", "error", "internal", "odd"]))
    return Outcome(
        started=started,
        started_ns=started_ns,
        request_id=draw(text),
        route=draw(st.one_of(st.just("-"), text)),
        status=draw(st.integers(0, 599)),
        decision=decision,
        code=draw(st.sampled_from(["", "target-invalid", "upstream-timeout", "policy-deny"])),
        policy_hash=draw(st.sampled_from(["-", "sha256:" + "cd" * 32, "x\ny"])),
        rule=draw(opt_text),
        reasons=tuple(
            draw(st.lists(st.one_of(st.sampled_from(["device-unenrolled"]), text), max_size=3))
        ),
        result=draw(results),
        ctx=ctx,
        peer=peer,
        country=draw(st.one_of(st.none(), st.sampled_from(["JP", ""]), text)),
        finished_ns=draw(st.one_of(st.just(0), st.integers(started_ns, started_ns + 10**12))),
        method=draw(text),
        target=draw(st.one_of(st.none(), st.builds(Target, st.one_of(secretish, text), query))),
        client_ip=draw(ip),
        device_id=draw(opt_text),
    )


def reference(redactor: Redactor, seq: int, outcome: Any) -> bytes:
    """The spec: the AuditEvent path the fast encoder replaces."""
    return canonical(CHAIN, seq, redactor.apply(request_event(outcome)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    redactor=redactors, outs=st.lists(outcomes(), min_size=1, max_size=4), seq=st.integers(1, 2**40)
)
def test_audit_fast_encoding_equals_the_reference(
    redactor: Redactor, outs: list[Outcome], seq: int
) -> None:
    """Every outcome encodes to exactly the reference bytes, also when facts repeat (caches)."""
    enc = RequestEncoder(CHAIN, redactor)
    for i, o in enumerate([*outs, *outs]):  # the second round is served from the caches
        assert enc.encode(seq + i, o) == reference(redactor, seq + i, o)


def test_audit_device_via_names_how_the_device_was_proved() -> None:
    """The record's detail says how the device was proved (proof, certificate, session) beside
    how the user signed in; no device, no device_via."""
    ident = Identity("https://idp", "u-1", "session", "town", email="a@b")
    dev = DeviceContext("dev-1", ("i", "s"), Device(id="dev-1"), "tpm", "linux", 1.7e9, 1)
    for channel in ("proof", "certificate", "session"):
        ctx = RequestContext(
            "r",
            "GET",
            make_peer(),
            Target("/", ""),
            make_route(),
            ident,
            dev,
            channel,
        )
        out = Outcome(1.7e9 + 5, 0, ctx=ctx, decision="allow")
        event = request_event(out)
        assert dict(event.detail) == {"via": "session", "device_via": channel}
        assert event.device_id == "dev-1"
        assert event.posture_age_s == 5
        data = orjson.loads(RequestEncoder(CHAIN, Redactor()).encode(1, out))
        assert data[-2] == {"device_via": channel, "via": "session"}
    ctx = RequestContext("r", "GET", make_peer(), Target("/", ""), make_route(), ident)
    assert dict(request_event(Outcome(1.7e9, 0, ctx=ctx)).detail) == {"via": "session"}


def test_audit_encoder_caches_never_serve_another_objects_facts() -> None:
    """Each user's facts are their own (the caches are keyed by the facts, not by objects whose
    ids can be reused), and a full cache is emptied rather than grown."""
    enc = RequestEncoder(CHAIN, Redactor())
    route = make_route()
    seen = set()
    for i in range(5000):
        ident = Identity("iss", f"user-{i}", "bearer", "town", email=f"u{i}@town")
        ctx = RequestContext("r", "GET", make_peer(), Target("/", ""), route, ident)
        out = Outcome(1.7e9, 0, ctx=ctx)
        data = orjson.loads(enc.encode(1, out))
        assert data[14] == f"user-{i}"
        seen.add(data[14])
    assert len(seen) == 5000
    assert len(enc._idents) <= 4096


def test_audit_encoder_matches_reference_after_outcome_edits() -> None:
    """Two outcomes differing only in one fact (status) give different bytes, each the reference."""
    ctx = RequestContext("r", "GET", make_peer(), Target("/a", ""), make_route())
    a = Outcome(1.7e9, 0, ctx=ctx, status=200, decision="allow")
    b = replace(a, status=502)
    enc = RequestEncoder(CHAIN, Redactor())
    assert enc.encode(3, a) == reference(Redactor(), 3, a)
    assert enc.encode(3, b) == reference(Redactor(), 3, b)
    assert enc.encode(3, a) != enc.encode(3, b)
