"""The decide stage: the facts gathered so far become the engine's AccessRequest; it decides.

Only the policy engine allows; this module only translates. Must not import gateway.settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.context import RequestContext
from gateway.identity.model import Identity
from policies.engine import PolicySet, evaluate
from policies.geoip import GeoIP
from policies.model import AccessRequest, Resource, Subject

NO_POLICY_HASH = "none"
SUBJECT_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision plus the policy set it came from (its content hash travels with every record)."""

    allowed: bool
    policy: str
    rule: str | None
    reasons: tuple[str, ...]
    policy_hash: str
    country: str | None = None  # the client's country, when GeoIP knows it (for the audit record)


class PolicyHolder:
    """The policy set in force. The reloader replaces it whole; one attribute read is atomic."""

    def __init__(self, policy_set: PolicySet) -> None:
        self.current = policy_set


class PolicyDecider:
    """Decides every request with its route's policy, on the facts the pipeline has gathered."""

    def __init__(self, holder: PolicyHolder, geoip: GeoIP | None = None) -> None:
        self.holder = holder
        self.geoip = geoip
        self._public: tuple[PolicySet, Verdict] | None = None
        # The policy's view of a user, made once per Identity object: sessions and bearer
        # tokens hand out the same (frozen) Identity on every request until it changes.
        # Keyed by id(); the value holds the Identity itself, so the id cannot be reused
        # by another object while the entry lives.
        self._subjects: dict[int, tuple[Identity, Subject]] = {}

    def _subject(self, identity: Identity) -> Subject:
        cached = self._subjects.get(id(identity))
        if cached is not None and cached[0] is identity:
            return cached[1]
        subject = identity.subject_fact()
        if len(self._subjects) >= SUBJECT_CACHE_SIZE:
            self._subjects.clear()  # bounded; refilled by the users still active
        self._subjects[id(identity)] = (identity, subject)
        return subject

    def _public_verdict(self, policy_set: PolicySet) -> Verdict:
        # The same for every request until a reload: made once per set, not per request.
        cached = self._public
        if cached is None or cached[0] is not policy_set:
            cached = (policy_set, Verdict(True, "accept", "public", (), policy_set.content_hash))
            self._public = cached
        return cached[1]

    def decide(self, ctx: RequestContext) -> Verdict:
        route = ctx.route
        policy_set = self.holder.current  # read once: a reload mid-request cannot mix two sets
        if route.public:
            return self._public_verdict(policy_set)
        if route.policy is None:
            # Default deny: a route that names no policy refuses everything.
            return Verdict(False, "-", None, ("route-not-public",), policy_set.content_hash)
        policy = policy_set.policy(route.policy)
        if policy is None:
            return Verdict(False, route.policy, None, ("policy-unknown",), policy_set.content_hash)
        client_ip = ctx.peer.client_ip
        country = self.geoip.country(client_ip) if self.geoip is not None else None
        identity = ctx.identity
        device = ctx.device
        request = AccessRequest(
            resource=Resource(route.name, ctx.peer.authority, ctx.target.path, ctx.method),
            subject=self._subject(identity) if identity is not None else None,
            # The device the request was proved to come from (gateway.devices.stage): its
            # status, tags, key storage and latest posture, as the registry knows them now.
            device=device.fact if device is not None else None,
            source_ip=client_ip,
            country=country,
        )
        decision = evaluate(policy, request, datetime.now(UTC))
        reasons: tuple[str, ...] = tuple(decision.reasons)
        if (
            not decision.allowed
            and identity is not None
            and identity.groups_overage
            and "group-missing" in reasons
        ):
            # Entra ID sent "too many groups" instead of the list: say so rather than blame the
            # user for a group they may well have (the fix is on the provider's side).
            reasons = (*reasons, "groups-overage")
        return Verdict(
            decision.allowed,
            decision.policy,
            decision.rule,
            reasons,
            policy_set.content_hash,
            country,
        )


def empty_policy_set() -> PolicySet:
    """The set in force when no policy directory is configured: only `accept` and `reject`."""
    return PolicySet.of({}, NO_POLICY_HASH)
