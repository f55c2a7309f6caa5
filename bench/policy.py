"""`python -m bench policy`: the decision engine's cost per decision, against the issue's targets.

Shapes: a large set (1,000 allow rules over 200 policies, five rules of six criteria each plus a
deny rule per policy) and a single policy of 100 allow rules; plus a harder 100-rule policy whose
rules all need the same group, so that the rule index can narrow them by path only. For each
shape three requests: allowed (by the last rule), a deny rule fires, and no allow rule holds.

Timing is honest on a shared machine: rounds interleave every case, each round takes the median
of its batches, and the report gives the best round (the least disturbed) and the worst. Each
decision includes the policy lookup by name, as the gateway does it. The empty-call baseline (the
same loop calling a function that does nothing) shows how fast this machine is right now.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from policies.engine import REJECT, CompiledPolicy, PolicySet, count_evaluated, count_explained
from policies.engine import evaluate as engine_evaluate
from policies.loader import load_policy_dir
from policies.model import AccessRequest, Decision, Device, Posture, Resource, Subject

NOW = datetime(2025, 4, 1, 1, 0, tzinfo=UTC)
LARGE_TARGET_US = 10.0
SINGLE_TARGET_US = 50.0
BATCH_SECONDS = 0.01  # each batch runs about this long

Evaluate = Callable[[CompiledPolicy, AccessRequest, datetime], Decision]


def _rule(index: int, group: str, claim: bool) -> str:
    dept = f"\n          - claim: {{name: dept, is: d{index}}}" if claim else ""
    return f"""      - name: r{index}
        all:
          - group: {group}
          - mfa: true{dept}
          - method: [GET, POST]
          - path: {{prefix: /app{index % 7}}}
          - source_ip: $office
          - device: {{approved: true, posture: {{disk_encrypted: true, max_age: 15m}}}}
"""


def _policy(name: str, rules: int, offset: int, *, shared_group: bool = False) -> str:
    def group(index: int) -> str:
        return "staff" if shared_group or index == rules - 1 else f"g{offset + index}"

    body = "".join(_rule(offset + i, group(i), shared_group) for i in range(rules))
    if shared_group:  # the last rule is the one for this user's department
        body = body.replace(f"is: d{offset + rules - 1}}}", "is: ops}")
    return f"""  - name: {name}
    deny:
      - name: abroad
        any:
          - country: {{not_in: [JP]}}
            unless: {{travel_window: true}}
    allow:
{body}"""


LISTS = "lists:\n  office: [192.0.2.0/24, 198.51.100.0/24, '2001:db8::/32']\n"


def _load(policies: str) -> tuple[PolicySet, float]:
    with TemporaryDirectory() as tmp:
        Path(tmp, "bench.yaml").write_text(LISTS + "policies:\n" + policies, encoding="utf-8")
        started = time.perf_counter()
        policy_set = load_policy_dir(Path(tmp))
        return policy_set, (time.perf_counter() - started) * 1000


def _requests(path_number: int) -> dict[str, AccessRequest]:
    subject = Subject(
        "https://idp",
        "u1",
        groups=frozenset({"staff", "all-staff", "tokyo"}),
        amr=frozenset({"pwd", "mfa"}),
        claims={"dept": "ops"},
    )
    posture = Posture(disk_encrypted=True, reported_at=NOW - timedelta(minutes=3))
    device = Device("d1", approved=True, posture=posture)
    resource = Resource("r", "app.example.jp", f"/app{path_number}/x", "GET")
    return {
        "allow": AccessRequest(resource, subject, device, "192.0.2.7", "JP"),
        "deny-fires": AccessRequest(resource, subject, device, "192.0.2.7", "US"),
        "no-allow-holds": AccessRequest(resource, subject, None, "192.0.2.7", "JP"),
    }


@dataclass
class Case:
    """One shape and request kind, with its timings (ns per decision, one per round)."""

    shape: str
    kind: str
    policy_set: PolicySet
    name: str
    request: AccessRequest
    per_batch: int = 1
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _batch(case: Case, evaluate: Evaluate, per: int) -> tuple[float, float]:
    """(wall, cpu) ns per decision over `per` decisions, the policy looked up by name each time."""
    lookup, name, request, now = case.policy_set.policy, case.name, case.request, NOW
    wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(per):
        evaluate(lookup(name) or REJECT, request, now)
    return (time.perf_counter_ns() - wall) / per, (time.thread_time_ns() - cpu) / per


def _empty(policy: CompiledPolicy, request: AccessRequest, now: datetime) -> Decision:
    return REJECT_DECISION


REJECT_DECISION = Decision(False, "reject", None, ())


def _round(cases: list[Case], baseline: Case, batches: int) -> None:
    for case, evaluate in [(baseline, _empty), *((c, engine_evaluate) for c in cases)]:
        times = [_batch(case, evaluate, case.per_batch) for _ in range(batches)]
        case.wall.append(statistics.median(t[0] for t in times))
        case.cpu.append(statistics.median(t[1] for t in times))


def _calibrate(case: Case, evaluate: Evaluate) -> None:
    _batch(case, evaluate, 200)  # warm the engine's small caches
    took = max(_batch(case, evaluate, 200)[0], 1.0)
    case.per_batch = max(20, int(BATCH_SECONDS * 1e9 / took))


def _cases() -> tuple[list[Case], list[str]]:
    notes = []
    large, ms = _load("".join(_policy(f"p{i}", 5, i * 1000) for i in range(200)))
    notes.append(f"large set: 200 policies, 1,000 allow + 200 deny rules, compiled in {ms:.0f} ms")
    single, ms = _load(_policy("p0", 100, 0))
    notes.append(f"100-rule policy: 100 allow + 1 deny rules, compiled in {ms:.0f} ms")
    shared, ms = _load(_policy("p0", 100, 0, shared_group=True))
    notes.append(f"100-rule, one group: every rule needs group staff, compiled in {ms:.0f} ms")
    cases = []
    for shape, policy_set, name, last in [
        ("large set", large, "p100", 100 * 1000 + 4),
        ("100-rule policy", single, "p0", 99),
        ("100-rule, one group", shared, "p0", 99),
    ]:
        for kind, request in _requests(last % 7).items():
            cases.append(Case(shape, kind, policy_set, name, request))
    return cases, notes


def _check(cases: list[Case]) -> None:
    """Fail loudly if a request does not decide the way its name says (a broken bench)."""
    for case in cases:
        decision = engine_evaluate(_policy_of(case), case.request, NOW)
        expected = case.kind == "allow"
        fired = decision.rule == "abroad"
        if decision.allowed != expected or fired != (case.kind == "deny-fires"):
            raise SystemExit(f"bench broken: {case.shape}/{case.kind} gave {decision}")


def _policy_of(case: Case) -> CompiledPolicy:
    policy = case.policy_set.policy(case.name)
    if policy is None:
        raise SystemExit(f"bench broken: no policy {case.name}")
    return policy


def _load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load unknown"
    return f"load {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} CPUs"


def main(argv: list[str]) -> int:
    """Run every case in interleaved rounds and print the medians; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(prog="python -m bench policy", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every case (best kept)")
    parser.add_argument("--batches", type=int, default=9, help="batches per case per round")
    args = parser.parse_args(argv)
    cases, notes = _cases()
    _check(cases)
    baseline = Case("baseline", "empty call", cases[0].policy_set, cases[0].name, cases[0].request)
    _calibrate(baseline, _empty)
    for case in cases:
        _calibrate(case, engine_evaluate)
    before = _load_average()
    for _ in range(args.rounds):
        _round(cases, baseline, args.batches)
    print("\n".join(notes))
    print(
        f"{args.rounds} rounds × {args.batches} batches of ~{BATCH_SECONDS * 1000:.0f} ms "
        f"per case; {before} at the start, {_load_average()} at the end"
    )
    print(
        f"baseline (the same loop calling an empty function): {min(baseline.wall):.0f} ns "
        f"best round, {max(baseline.wall):.0f} ns worst"
    )
    print()
    header = (
        f"{'shape':<20} {'request':<15} {'µs/decision':>11} {'worst round':>11} {'cpu µs':>7}  "
        "criteria decide+reasons   decision"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        policy = _policy_of(case)
        decision = engine_evaluate(policy, case.request, NOW)
        decide = count_evaluated(policy, case.request, NOW)
        explain = count_explained(policy, case.request, NOW)
        outcome = "allow" if decision.allowed else "deny: " + ", ".join(decision.reasons)
        print(
            f"{case.shape:<20} {case.kind:<15} {min(case.wall) / 1000:11.2f} "
            f"{max(case.wall) / 1000:11.2f} {min(case.cpu) / 1000:7.2f}  "
            f"{decide:>6} + {explain:<17} {outcome}"
        )
    print()
    missed = 0
    for shape, target in [("large set", LARGE_TARGET_US), ("100-rule policy", SINGLE_TARGET_US)]:
        by_kind = {c.kind: min(c.wall) / 1000 for c in cases if c.shape == shape}
        headline = by_kind["allow"]
        others = max(by_kind.values())
        verdict = "met" if headline <= target else "MISSED"
        missed += headline > target
        print(
            f"{shape}: {headline:.2f} µs (target ≤ {target:g}) — {verdict}; slowest request kind "
            f"{others:.2f} µs"
        )
    return 1 if missed else 0
