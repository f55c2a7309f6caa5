"""The decision engine: deny overrides, default deny, fail-closed unknowns, never raising."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import NOW, decide, load_text, make_device, make_request, make_subject

from policies.engine import ACCEPT, REJECT, PolicySet, count_evaluated, evaluate
from policies.model import AccessRequest, Device, Posture, Resource, Subject
from policies.reasons import Reason

STAFF = """
policies:
  - name: staff
    deny:
      - {name: blocked, group: suspended}
    allow:
      - name: staff-with-device
        all:
          - group: staff
          - device: {approved: true, posture: {disk_encrypted: true, max_age: 15m}}
"""


def test_accept_and_reject_are_built_in() -> None:
    """Every policy set has `accept` (allow, no reasons) and `reject` (deny)."""
    policy_set = load_text(STAFF)
    request = make_request()
    assert policy_set.policy("accept") is ACCEPT
    assert evaluate(ACCEPT, request, NOW).allowed
    assert evaluate(ACCEPT, request, NOW).reasons == ()
    assert evaluate(REJECT, request, NOW).reasons == (Reason.NO_RULE_MATCHED,)
    assert set(policy_set.names()) == {"accept", "reject", "staff"}


def test_unknown_policy_name_denies() -> None:
    """Asking a set for a policy it lacks denies with `policy-unknown`."""
    decision = load_text(STAFF).evaluate("nope", make_request(), NOW)
    assert not decision.allowed
    assert decision.reasons == (Reason.POLICY_UNKNOWN,)


def test_facts_absent_fire_the_deny_rule_with_the_login_reason() -> None:
    """Without identity a deny rule on groups cannot be decided, so it fires: sign in first."""
    decision = decide(STAFF, "staff", make_request())
    assert not decision.allowed
    assert decision.rule == "blocked"
    assert decision.reasons == (Reason.USER_UNAUTHENTICATED,)


def test_no_allow_lists_what_the_closest_rule_needs() -> None:
    """With no device, the deny names the device reason the allow rule is missing."""
    decision = decide(STAFF, "staff", make_request(subject=make_subject(groups={"staff"})))
    assert decision.rule is None
    assert decision.reasons == (Reason.DEVICE_UNENROLLED, Reason.NO_RULE_MATCHED)


def test_naive_now_is_a_policy_error() -> None:
    """A `now` without a time zone cannot be decided and denies with `policy-error`."""
    request = make_request(subject=make_subject(groups={"staff"}), device=make_device())
    decision = decide(STAFF, "staff", request, now=datetime(2025, 4, 1, 10, 0))
    assert decision.reasons == (Reason.POLICY_ERROR,)


def test_trace_shows_every_rule_and_criterion() -> None:
    """With trace=True the decision lists each rule and each criterion's outcome."""
    request = make_request(subject=make_subject(groups={"staff"}), device=make_device())
    decision = decide(STAFF, "staff", request, trace=True)
    assert decision.allowed
    assert decision.rule == "staff-with-device"
    assert [(t.effect, t.rule, t.fired) for t in decision.trace] == [
        ("deny", "blocked", False),
        ("allow", "staff-with-device", True),
    ]
    assert [c.kind for c in decision.trace[1].node.children] == ["group", "device"]


def test_count_evaluated_follows_short_circuits() -> None:
    """The bench's criteria count stops where the fast path stops."""
    policy = load_text(STAFF).policy("staff")
    assert policy is not None
    outsider = make_request(subject=make_subject(groups={"visitors"}))
    assert count_evaluated(policy, outsider, NOW) == 2  # the deny's group, then allow's group


def test_content_hash_is_stable_and_ignores_comments() -> None:
    """The same content gives the same hash; comments do not count; a change does."""
    first = load_text(STAFF).content_hash
    assert load_text(STAFF).content_hash == first
    assert load_text("# 注釈\n" + STAFF).content_hash == first
    assert load_text(STAFF.replace("suspended", "banned")).content_hash != first
    assert len(first) == 64


# --- property tests ---------------------------------------------------------------------------

GROUPS = st.frozensets(st.sampled_from(["staff", "suspended", "auditors", "x"]))
TEXT = st.text(max_size=12)
subjects = st.none() | st.builds(
    Subject,
    issuer=TEXT,
    subject=TEXT,
    email=st.none() | TEXT,
    email_verified=st.booleans(),
    groups=GROUPS,
    amr=st.frozensets(st.sampled_from(["pwd", "mfa", "hwk"])),
    acr=st.none() | TEXT,
    claims=st.dictionaries(TEXT, st.one_of(TEXT, st.integers(), st.lists(TEXT), st.none())),
)
postures = st.none() | st.builds(
    Posture,
    os=st.none() | st.sampled_from(["windows", "macos", "linux", ""]),
    os_version=st.none() | TEXT,
    disk_encrypted=st.none() | st.booleans(),
    firewall=st.none() | st.booleans(),
    screen_lock_timeout=st.none() | st.integers(-10, 10**6),
    auto_update=st.none() | st.booleans(),
    patch_age_days=st.none() | st.integers(-5, 10**4),
    agent_version=st.none() | TEXT,
    reported_at=st.none()
    | st.datetimes(timezones=st.just(NOW.tzinfo))
    | st.datetimes(),  # naive ones too
)
devices = st.none() | st.builds(
    Device,
    id=TEXT,
    enrolled=st.booleans(),
    approved=st.booleans(),
    owner=st.none() | TEXT,
    tags=st.frozensets(st.sampled_from(["lgwan", "kiosk"])),
    key_storage=st.none() | TEXT,
    posture=postures,
)
requests = st.builds(
    AccessRequest,
    resource=st.builds(Resource, route=TEXT, host=TEXT, path=TEXT, method=TEXT),
    subject=subjects,
    device=devices,
    source_ip=st.none() | TEXT | st.ip_addresses().map(str),
    country=st.none() | TEXT | st.sampled_from(["JP", "US"]),
)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.timezones()
)

EVERYTHING = """
lists:
  office: [192.0.2.0/24, "2001:db8::/32"]
travel_windows:
  - {user: u@x.jp, countries: [US], from: 2025-01-01, until: 2025-12-31}
policies:
  - name: everything
    deny:
      - name: d1
        any:
          - group: suspended
          - {country: {not_in: [JP]}, unless: {travel_window: true}}
    allow:
      - name: a1
        all:
          - authenticated: true
          - email: {matches: '.*@x\\.jp'}
          - email_domain: [x.jp]
          - claim: {name: dept, starts_with: 総}
          - mfa: true
          - method: [GET]
          - path: {glob: '/a/**'}
          - source_ip: $office
          - time: {hours: '08:00-18:00', weekdays: mon-fri, holidays: exclude}
          - device: {approved: true, tags: [lgwan], owned_by_user: true, key_storage: [tpm],
                     posture: {os: [windows], os_version: '10', disk_encrypted: true,
                               firewall: true,
                               screen_lock: 5m, auto_update: true, patch_age: 7d,
                               agent_version: '0.1', max_age: 15m}}
          - client_certificate: {san: {ends_with: .x.jp}}
      - name: a2
        any: [{group: staff}, {none: [{group: x}]}, {user: {contains: a}}]
"""
_SET: PolicySet = load_text(EVERYTHING)
_WITHOUT_A2: PolicySet = load_text(EVERYTHING.split("      - name: a2", maxsplit=1)[0])


@settings(max_examples=300, deadline=None)
@given(request=requests, now=moments)
def test_random_facts_never_raise(request: AccessRequest, now: datetime) -> None:
    """Any facts at any moment give a Decision, never an exception."""
    policy = _SET.policy("everything")
    assert policy is not None
    decision = evaluate(policy, request, now, trace=True)
    assert isinstance(decision.allowed, bool)
    assert all(isinstance(r, Reason) for r in decision.reasons)
    assert decision.allowed == (decision.reasons == ())


@settings(max_examples=300, deadline=None)
@given(request=requests, now=moments)
def test_deny_always_overrides(request: AccessRequest, now: datetime) -> None:
    """Whenever a deny rule fires, the decision is deny, whatever the allow rules say."""
    policy = _SET.policy("everything")
    assert policy is not None
    decision = evaluate(policy, request, now, trace=True)
    if any(step.fired for step in decision.trace if step.effect == "deny"):
        assert not decision.allowed
        assert decision.rule == "d1"


@settings(max_examples=300, deadline=None)
@given(request=requests, now=moments)
def test_removing_an_allow_never_grants(request: AccessRequest, now: datetime) -> None:
    """A policy with one allow rule fewer allows nothing the full policy denies."""
    full, fewer = _SET.policy("everything"), _WITHOUT_A2.policy("everything")
    assert full is not None
    assert fewer is not None
    if evaluate(fewer, request, now).allowed:
        assert evaluate(full, request, now).allowed


@settings(max_examples=200, deadline=None)
@given(request=requests, now=moments)
def test_missing_facts_never_allow_through_none(request: AccessRequest, now: datetime) -> None:
    """`none:` over a criterion whose fact is missing never allows."""
    policy = load_text("policies:\n  - {name: n, allow: {none: [{group: x}]}}\n").policy("n")
    assert policy is not None
    decision = evaluate(policy, request, now)
    if request.subject is None:
        assert not decision.allowed
        assert decision.reasons[0] == Reason.USER_UNAUTHENTICATED


def test_stale_posture_reason_when_the_report_is_old() -> None:
    """A posture report older than max_age gives `device-posture-stale`."""
    old = make_device(posture=Posture(disk_encrypted=True, reported_at=NOW - timedelta(hours=1)))
    request = make_request(subject=make_subject(groups={"staff"}), device=old)
    decision = decide(STAFF, "staff", request)
    assert decision.reasons == (Reason.DEVICE_POSTURE_STALE, Reason.NO_RULE_MATCHED)
