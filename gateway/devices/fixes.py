"""What a device must change to satisfy the gateway's policies, and how, in Japanese and English.

The agent holds no copy of the policies (issue #6 point 4): the gateway answers each accepted
report with the device-* reasons its routes' policies give this device for its owner, each with
the catalogue's title and fix. Used by the report endpoint and the IT admin page. Pure: no I/O.
Must not import gateway.settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway.decide import PolicyHolder
from gateway.devices.model import DeviceRecord
from gateway.web.catalogue import LANGUAGES, Catalogue
from policies.model import FALSE, TRUE, AccessRequest, Resource, RuleTrace, Subject, TraceNode
from policies.reasons import Reason, by_priority

DEVICE_PREFIX: Final = "device-"
_DEVICE_CRITERION: Final = "device"
# Blocks under which a failing device criterion is *wanted* (a `none:` item, an `unless:`
# exception): their reasons say what would refuse, not what to fix.
_NEGATING: Final = frozenset({"none"})


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    """One protected route as the advisor evaluates it: its name, host and policy."""

    route: str
    host: str
    policy: str


def _device_leaves(node: TraceNode, negated: bool = False) -> Iterator[TraceNode]:
    """The evaluated `device` criteria of a rule that must hold for the rule to allow."""
    if not node.evaluated:
        return
    if node.kind == _DEVICE_CRITERION and not node.children:
        if not negated:
            yield node
        return
    if node.kind == "unless":
        base = node.children[0] if node.children else None
        if base is not None:
            yield from _device_leaves(base, negated)
        return  # the exception: a device it names is refused, so nothing there is a fix
    for child in node.children:
        yield from _device_leaves(child, negated or node.kind in _NEGATING)


def _device_reasons(reasons: Iterable[str]) -> set[str]:
    return {str(reason) for reason in reasons if str(reason).startswith(DEVICE_PREFIX)}


class DeviceAdvisor:
    """The device-* reasons of a device under the routes' policies, and their localised fixes.

    Evaluation uses the device's own facts and its owner as the subject. The owner's groups are
    not known from the registry, so allow rules are judged on their device criteria alone: the
    device's reasons are those of the allow rule whose device part it is closest to meeting
    (none when it meets one fully), plus those of a deny rule that fired.
    """

    def __init__(
        self,
        *,
        holder: PolicyHolder,
        targets: Sequence[PolicyTarget] | Callable[[], Sequence[PolicyTarget]],
        catalogue: Catalogue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._holder = holder
        self._targets = targets
        self._catalogue = catalogue
        self._clock = clock

    def _current_targets(self) -> Sequence[PolicyTarget]:
        return self._targets() if callable(self._targets) else self._targets

    @staticmethod
    def subject_of(record: DeviceRecord) -> Subject:
        """The owner as the policy sees them: the e-mail was the IdP's at enrolment."""
        return Subject(
            issuer=record.owner_issuer,
            subject=record.owner_subject,
            email=record.owner_email,
            email_verified=record.owner_email is not None,
        )

    def reasons(self, record: DeviceRecord, *, now: float | None = None) -> tuple[str, ...]:
        """The device-* codes the policies give this device, most important first."""
        moment = datetime.fromtimestamp(self._clock() if now is None else now, UTC)
        policy_set = self._holder.current
        subject = self.subject_of(record)
        device = record.policy_fact()
        found: set[str] = set()
        seen: set[tuple[str, str, str]] = set()
        for target in self._current_targets():
            key = (target.route, target.host, target.policy)
            if key in seen:
                continue
            seen.add(key)
            request = AccessRequest(
                resource=Resource(target.route, target.host, "/", "GET"),
                subject=subject,
                device=device,
            )
            decision = policy_set.evaluate(target.policy, request, moment, trace=True)
            if decision.allowed:
                continue
            if decision.rule is not None:  # a deny rule fired: its device reasons count
                found |= _device_reasons(decision.reasons)
            found |= self._closest_allow(decision.trace)
        return tuple(str(r) for r in by_priority(Reason(code) for code in found if _known(code)))

    @staticmethod
    def _closest_allow(trace: Sequence[RuleTrace]) -> set[str]:
        """The device reasons of the allow rule whose device criteria fail least (none when the
        device fully meets one rule's device criteria; none when no rule looks at devices)."""
        best: set[str] | None = None
        for rule in trace:
            if rule.effect != "allow":
                continue
            leaves = list(_device_leaves(rule.node))
            if not leaves:
                continue
            failing = {
                str(reason)
                for leaf in leaves
                if leaf.state != TRUE
                for reason in leaf.reasons
                if str(reason).startswith(DEVICE_PREFIX)
            }
            if not failing and all(leaf.state == TRUE for leaf in leaves):
                return set()
            if not failing and any(leaf.state == FALSE for leaf in leaves):
                continue  # failed for a reason that is not the device's (the owner): skip
            if best is None or len(failing) < len(best):
                best = failing
        return best or set()

    def fixes(self, reasons: Iterable[str]) -> list[dict[str, object]]:
        """Each reason with its title and fix in every language (the agent prints these)."""
        out: list[dict[str, object]] = []
        for code in reasons:
            messages = {lang: self._catalogue.get(code, lang) for lang in LANGUAGES}
            out.append(
                {
                    "code": code,
                    "title": {lang: message.title for lang, message in messages.items()},
                    "fix": {lang: message.fix for lang, message in messages.items()},
                }
            )
        return out


def _known(code: str) -> bool:
    try:
        Reason(code)
    except ValueError:
        return False
    return True
