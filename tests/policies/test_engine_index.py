"""The allow-rule index and the shortcuts of `evaluate`: same decisions as the plain reading.

`reference_evaluate` explains every rule in full, with no index and no early exit; `evaluate`
must give the very same Decision (rule and reasons included) for any policy and any request.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import NOW, load_text, make_device, make_request, make_subject

from policies.engine import (
    INDEX_MIN_RULES,
    CompiledPolicy,
    count_evaluated,
    count_explained,
    evaluate,
    reference_evaluate,
)
from policies.model import AccessRequest, Device, Posture, Resource, Subject
from policies.reasons import Reason

# --- random policies, as JSON (which YAML reads as it is) --------------------------------------

ITEMS: list[dict[str, Any]] = [
    {"group": "a"},
    {"group": ["b", "staff"]},
    {"method": ["GET"]},
    {"method": "POST"},
    {"path": {"prefix": "/a"}},
    {"path": {"prefix": "/b/x"}},
    {"path": {"exact": "/b"}},
    {"path": {"exact": ["/", "/a/x"]}},
    {"path": {"glob": "/docs/*/edit"}},
    {"path": {"glob": "/*/x"}},
    {"path": {"prefix": "/"}},
    {"path": {"prefix": "/a", "glob": "/b**"}},
    {"mfa": True},
    {"authenticated": True},
    {"country": ["JP"]},
    {"source_ip": ["192.0.2.0/24"]},
    {"device": {"enrolled": True}},
    {"device": {"approved": True, "posture": {"disk_encrypted": True}}},
    {"any": [{"group": "a"}, {"path": {"prefix": "/b"}}]},
    {"any": [{"group": "b"}]},
    {"none": [{"group": "c"}]},
    {"all": [{"group": "c"}, {"method": "GET"}]},
    {"group": "a", "unless": {"method": "POST"}},
    {"country": {"not_in": ["JP"]}, "unless": {"group": "staff"}},
]


@st.composite
def rules(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """One rule: a single item, or `all:` over a few, sometimes with `unless:`."""
    items = draw(st.lists(st.sampled_from(ITEMS), min_size=1, max_size=4))
    if len(items) == 1 and "unless" not in items[0] and draw(st.booleans()):
        return {"name": name, **items[0]}
    rule: dict[str, Any] = {"name": name, "all": items}
    if draw(st.integers(0, 5)) == 0:
        rule["unless"] = draw(st.sampled_from(ITEMS[:16]))
    return rule


@st.composite
def policies(draw: st.DrawFn) -> CompiledPolicy:
    """A policy of 1–12 allow rules (often enough to be indexed) and 0–2 deny rules."""
    allow = [draw(rules(f"a{i}")) for i in range(draw(st.integers(1, 12)))]
    deny = [draw(rules(f"d{i}")) for i in range(draw(st.integers(0, 2)))]
    own_reason: bool = draw(st.booleans())
    if deny and own_reason:
        deny[0]["reason"] = "device-denied"
    policy: dict[str, Any] = {"name": "p", "allow": allow}
    if deny:
        policy["deny"] = deny
    compiled = load_text(json.dumps({"policies": [policy]})).policy("p")
    assert compiled is not None
    return compiled


subjects = st.none() | st.builds(
    Subject,
    issuer=st.just("https://idp"),
    subject=st.sampled_from(["u1", "u2"]),
    email=st.none() | st.just("u1@x.jp"),
    email_verified=st.booleans(),
    groups=st.frozensets(st.sampled_from(["a", "b", "c", "staff", "other"])),
    amr=st.frozensets(st.sampled_from(["pwd", "mfa"])),
)
devices = st.none() | st.builds(
    Device,
    id=st.just("d1"),
    enrolled=st.booleans(),
    approved=st.booleans(),
    posture=st.none() | st.builds(Posture, disk_encrypted=st.none() | st.booleans()),
)
PATHS = ["/", "/a", "/a/x", "/ab", "/b", "/b/x", "/b/x/y", "/docs/1/edit", "/q/x", "", "a/x", "//a"]
requests = st.builds(
    AccessRequest,
    resource=st.builds(
        Resource,
        route=st.just("r"),
        host=st.just("h"),
        path=st.sampled_from(PATHS),
        method=st.sampled_from(["GET", "POST", "get", "DELETE"]),
    ),
    subject=subjects,
    device=devices,
    source_ip=st.none() | st.sampled_from(["192.0.2.5", "203.0.113.1", "nonsense"]),
    country=st.none() | st.sampled_from(["JP", "US"]),
)


@settings(max_examples=250, deadline=None)
@given(policy=policies(), batch=st.lists(requests, min_size=1, max_size=8))
def test_evaluate_matches_the_plain_reading(
    policy: CompiledPolicy, batch: list[AccessRequest]
) -> None:
    """For any policy and request, `evaluate` gives exactly the reference Decision, with or
    without a trace (allowed, rule and reasons in order)."""
    for request in batch:
        expected = reference_evaluate(policy, request, NOW)
        assert evaluate(policy, request, NOW) == expected
        traced = evaluate(policy, request, NOW, trace=True)
        assert (traced.allowed, traced.rule, traced.reasons) == (
            expected.allowed,
            expected.rule,
            expected.reasons,
        )


# --- the index, by example --------------------------------------------------------------------


def _many(rules: list[str], deny: str = "") -> CompiledPolicy:
    body = "".join(f"      - {rule}\n" for rule in rules)
    policy = load_text(f"policies:\n  - name: p\n{deny}    allow:\n{body}").policy("p")
    assert policy is not None
    return policy


def _distinct_groups(count: int) -> CompiledPolicy:
    return _many(
        [
            f"{{name: r{i}, all: [{{group: g{i}}}, {{mfa: true}}, {{method: GET}}]}}"
            for i in range(count)
        ]
    )


def test_a_hundred_rules_are_not_each_tried() -> None:
    """With 100 rules for 100 groups, deciding for a member of one group checks only its rule."""
    policy = _distinct_groups(100)
    assert policy.allow_index is not None
    request = make_request(subject=make_subject(groups={"g57", "elsewhere"}, amr={"mfa"}))
    decision = evaluate(policy, request, NOW)
    assert decision.allowed
    assert decision.rule == "r57"
    assert count_evaluated(policy, request, NOW) == 3


def test_small_policies_are_not_indexed() -> None:
    """Below INDEX_MIN_RULES allow rules every rule is simply tried in order."""
    assert _distinct_groups(INDEX_MIN_RULES - 1).allow_index is None
    assert _distinct_groups(INDEX_MIN_RULES).allow_index is not None


def test_the_first_rule_that_holds_still_decides() -> None:
    """When several rules may hold, the earliest in the policy names the decision."""
    policy = _many(
        [
            "{name: by-a, all: [{group: a}, {path: {prefix: /x}}]}",
            "{name: by-b, group: b}",
            "{name: by-method, method: [GET]}",
            "{name: by-c, group: c}",
        ]
    )
    both = make_subject(groups={"a", "b"})
    assert evaluate(policy, make_request(subject=both, path="/x/1"), NOW).rule == "by-a"
    assert evaluate(policy, make_request(subject=both, path="/y"), NOW).rule == "by-b"
    assert evaluate(policy, make_request(subject=make_subject(groups={"c"})), NOW).rule == (
        "by-method"
    )
    post = make_request(subject=make_subject(groups={"c"}), method="POST")
    assert evaluate(policy, post, NOW).rule == "by-c"


def test_the_index_never_hides_a_rule_without_indexed_criteria() -> None:
    """A rule with no group, method or path criterion is tried for every request."""
    policy = _many([f"{{name: r{i}, group: g{i}}}" for i in range(6)] + ["{name: any, mfa: true}"])
    request = make_request(subject=make_subject(amr={"mfa"}), method="PATCH", path="/z")
    assert evaluate(policy, request, NOW).rule == "any"


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("{exact: /a/b}", {"a"}),
        ("{exact: [/, /b]}", {"", "b"}),
        ("{prefix: /a/b/}", {"a"}),
        ("{glob: '/docs/*/edit'}", {"docs"}),
        ("{glob: '/*/edit'}", None),
        ("{glob: '/a**'}", None),
        ("{prefix: /}", None),
        ("{prefix: /a, exact: /b}", {"a", "b"}),
    ],
)
def test_path_keys_are_first_segments(path: str, keys: set[str] | None) -> None:
    """A path criterion is indexed by the first segment every path it holds for has."""
    policy = load_text(f"policies:\n  - name: p\n    allow: {{path: {path}}}\n").policy("p")
    assert policy is not None
    criterion = policy.allow[0].node.criterion
    assert criterion is not None
    assert criterion.keys == (None if keys is None else frozenset(keys))


# --- reasons when no allow rule holds ---------------------------------------------------------


def test_the_closest_rule_is_the_one_needing_fewest_reasons() -> None:
    """The rule that needs the fewest things wins, even after one that needs more."""
    policy = _many(
        [
            "{name: far, all: [{group: a}, {mfa: true}]}",
            "{name: near, group: b}",
            "{name: also-near, mfa: true}",
            "{name: filler, group: c}",
        ]
    )
    decision = evaluate(policy, make_request(subject=make_subject()), NOW)
    assert decision.reasons == (Reason.GROUP_MISSING, Reason.NO_RULE_MATCHED)
    assert decision == reference_evaluate(policy, make_request(subject=make_subject()), NOW)


def test_only_rules_for_this_path_explain_unless_there_are_none() -> None:
    """Rules scoped to another path do not give the reasons; with no rule in scope, all do."""
    policy = _many(
        [
            "{name: admin, all: [{path: {prefix: /admin}}, {group: admins}]}",
            "{name: app, all: [{path: {prefix: /app}}, {device: {enrolled: true}}, {mfa: true}]}",
            "{name: a, all: [{path: {prefix: /a}}, {group: x}]}",
            "{name: b, all: [{path: {prefix: /b}}, {group: y}]}",
        ]
    )
    user = make_subject(amr={"mfa"})
    app = evaluate(policy, make_request(subject=user, path="/app/1"), NOW)
    assert app.reasons == (Reason.DEVICE_UNENROLLED, Reason.NO_RULE_MATCHED)
    elsewhere = evaluate(policy, make_request(subject=user, path="/zzz"), NOW)
    assert elsewhere.reasons == (Reason.PATH_NOT_ALLOWED, Reason.NO_RULE_MATCHED)


def test_count_explained_counts_the_reasons_work() -> None:
    """An allow needs no reasons; a deny rule's reasons cost its criteria again."""
    policy = _distinct_groups(10)
    member = make_subject(groups={"g3"}, amr={"mfa"})
    assert count_explained(policy, make_request(subject=member), NOW) == 0
    outsider = make_request(subject=make_subject(groups={"x"}), device=make_device())
    assert count_explained(policy, outsider, NOW) >= 3
