"""The decide stage: facts the pipeline has become the engine's request; its verdict comes back."""

from __future__ import annotations

from pathlib import Path

from factories import make_ctx, make_peer, make_route

from gateway.decide import NO_POLICY_HASH, PolicyDecider, PolicyHolder, empty_policy_set
from policies.loader import load_policy_dir

POLICIES = """\
lists:
  office: [198.51.100.0/24]
policies:
  - name: office-only
    allow:
      source_ip: $office
  - name: staff-only
    allow:
      group: staff
"""


def holder_for(tmp_path: Path, text: str = POLICIES) -> PolicyHolder:
    (tmp_path / "policies.yaml").write_text(text, encoding="utf-8")
    return PolicyHolder(load_policy_dir(tmp_path))


def test_public_route_is_allowed_by_accept(tmp_path: Path) -> None:
    """`public: true` means the built-in accept policy, and the set's hash still travels."""
    holder = holder_for(tmp_path)
    verdict = PolicyDecider(holder).decide(make_ctx(route=make_route(public=True)))
    assert verdict.allowed
    assert verdict.policy == "accept"
    assert verdict.policy_hash == holder.current.content_hash


def test_route_without_policy_is_denied() -> None:
    """Default deny: a route naming no policy is refused with a reason of its own."""
    decider = PolicyDecider(PolicyHolder(empty_policy_set()))
    verdict = decider.decide(make_ctx(route=make_route(public=False, policy=None)))
    assert not verdict.allowed
    assert verdict.reasons == ("route-not-public",)
    assert verdict.policy_hash == NO_POLICY_HASH


def test_client_ip_reaches_the_policy(tmp_path: Path) -> None:
    """The peer's client IP is the source_ip fact: inside the office list allows, outside denies."""
    decider = PolicyDecider(holder_for(tmp_path))
    route = make_route(public=False, policy="office-only")
    inside = decider.decide(make_ctx(route=route, peer=make_peer("198.51.100.20")))
    outside = decider.decide(make_ctx(route=route, peer=make_peer("203.0.113.5")))
    assert inside.allowed
    assert not outside.allowed
    assert "source-ip-not-allowed" in outside.reasons


def test_identity_facts_are_absent_so_identity_rules_deny(tmp_path: Path) -> None:
    """Until identity exists, a group rule denies with user-unauthenticated, never allows."""
    decider = PolicyDecider(holder_for(tmp_path))
    verdict = decider.decide(make_ctx(route=make_route(public=False, policy="staff-only")))
    assert not verdict.allowed
    assert verdict.reasons[0] == "user-unauthenticated"


def test_a_policy_missing_from_the_set_denies(tmp_path: Path) -> None:
    """A route whose policy is not in the set in force is refused (policy-unknown)."""
    decider = PolicyDecider(holder_for(tmp_path))
    verdict = decider.decide(make_ctx(route=make_route(public=False, policy="gone")))
    assert not verdict.allowed
    assert verdict.reasons == ("policy-unknown",)


def test_swapping_the_holder_changes_decisions(tmp_path: Path) -> None:
    """The decider always reads the set in force, so a reload applies to the next request."""
    holder = holder_for(tmp_path)
    decider = PolicyDecider(holder)
    route = make_route(public=False, policy="office-only")
    assert not decider.decide(make_ctx(route=route, peer=make_peer("203.0.113.5"))).allowed
    holder.current = load_policy_dir(
        _write(tmp_path / "v2", POLICIES.replace("198.51.100.0/24", "203.0.113.0/24"))
    )
    assert decider.decide(make_ctx(route=route, peer=make_peer("203.0.113.5"))).allowed


def _write(directory: Path, text: str) -> Path:
    directory.mkdir()
    (directory / "policies.yaml").write_text(text, encoding="utf-8")
    return directory


def test_a_changed_identity_is_decided_on_its_new_facts(tmp_path: Path) -> None:
    """The per-identity subject cache never answers for another Identity: a user whose groups
    changed (a refresh makes a new Identity) is decided on the new groups at once."""
    from dataclasses import replace

    from gateway.identity.model import Identity

    decider = PolicyDecider(holder_for(tmp_path))
    route = make_route(public=False, policy="staff-only")
    staff = Identity(
        issuer="https://idp.example",
        subject="u1",
        method="session",
        provider="town",
        groups=frozenset({"staff"}),
    )
    assert decider.decide(replace(make_ctx(route=route), identity=staff)).allowed
    assert decider.decide(replace(make_ctx(route=route), identity=staff)).allowed
    visitor = replace(staff, groups=frozenset({"visitors"}))
    verdict = decider.decide(replace(make_ctx(route=route), identity=visitor))
    assert not verdict.allowed
    assert "group-missing" in verdict.reasons
