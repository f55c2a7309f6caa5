"""`python -m bench policy`: the decision engine's cost per decision, median of batches.

Two shapes from the issue: 1,000 rules over 200 routes (a handful of rules per route's policy,
several criteria each) and a single policy of 100 rules. Prints medians and criteria evaluated.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from policies.engine import CompiledPolicy, count_evaluated, evaluate
from policies.loader import load_policy_dir
from policies.model import AccessRequest, Device, Posture, Resource, Subject

NOW = datetime(2025, 4, 1, 1, 0, tzinfo=UTC)


def _rule(index: int, group: str) -> str:
    return f"""      - name: r{index}
        all:
          - group: {group}
          - mfa: true
          - method: [GET, POST]
          - path: {{prefix: /app{index % 7}}}
          - source_ip: $office
          - device: {{approved: true, posture: {{disk_encrypted: true, max_age: 15m}}}}
"""


def _policy(name: str, rules: int, offset: int) -> str:
    body = "".join(_rule(offset + i, f"g{offset + i}") for i in range(rules - 1))
    body += _rule(offset + rules - 1, "staff")
    return f"""  - name: {name}
    deny:
      - name: abroad
        any:
          - country: {{not_in: [JP]}}
            unless: {{travel_window: true}}
    allow:
{body}"""


def _write(directory: Path, routes: int, rules_per_route: int) -> None:
    lists = "lists:\n  office: [192.0.2.0/24, 198.51.100.0/24, '2001:db8::/32']\n"
    policies = "".join(_policy(f"p{i}", rules_per_route, i * 1000) for i in range(routes))
    (directory / "bench.yaml").write_text(lists + "policies:\n" + policies, encoding="utf-8")


def _requests(last_path: int) -> dict[str, AccessRequest]:
    subject = Subject("https://idp", "u1", groups=frozenset({"staff"}), amr=frozenset({"mfa"}))
    posture = Posture(disk_encrypted=True, reported_at=NOW - timedelta(minutes=3))
    device = Device("d1", approved=True, posture=posture)
    allowed = AccessRequest(
        Resource("r", "app.example.jp", f"/app{last_path}/x", "GET"),
        subject,
        device,
        "192.0.2.7",
        "JP",
    )
    return {
        "allow (last rule matches)": allowed,
        "deny (no allow rule matches)": AccessRequest(
            allowed.resource, subject, None, "192.0.2.7", "JP"
        ),
        "deny (deny rule fires)": AccessRequest(
            allowed.resource, subject, device, "192.0.2.7", "US"
        ),
    }


def _median_ns(policy: CompiledPolicy, request: AccessRequest, batches: int, per: int) -> float:
    medians = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(per):
            evaluate(policy, request, NOW)
        medians.append((time.perf_counter_ns() - start) / per)
    return statistics.median(medians)


def _run(title: str, routes: int, rules: int, batches: int, per: int) -> None:
    with TemporaryDirectory() as tmp:
        _write(Path(tmp), routes, rules)
        started = time.perf_counter()
        policy_set = load_policy_dir(Path(tmp))
        load_ms = (time.perf_counter() - started) * 1000
    policy = policy_set.policy(f"p{routes // 2}")
    assert policy is not None
    total = routes * (rules + 1)
    print(f"{title}: {routes} policies, {total} rules in all, compiled in {load_ms:.0f} ms")
    last = (routes // 2 * 1000 + rules - 1) % 7
    for label, request in _requests(last).items():
        decision = evaluate(policy, request, NOW)
        criteria = count_evaluated(policy, request, NOW)
        median = _median_ns(policy, request, batches, per) / 1000
        verdict = "allow" if decision.allowed else "deny"
        print(
            f"  {label:<30} {median:7.2f} µs median  ({criteria} criteria evaluated; "
            f"{verdict}, reasons: {', '.join(decision.reasons) or '-'})"
        )


def _baseline_ns() -> float:
    """The cost of one empty call, to compare figures taken on a busier or quieter machine."""

    def empty() -> None:
        return None

    medians = []
    for _ in range(15):
        start = time.perf_counter_ns()
        for _ in range(100_000):
            empty()
        medians.append((time.perf_counter_ns() - start) / 100_000)
    return statistics.median(medians)


def main(argv: list[str]) -> int:
    """Run both shapes and print the medians; always exits 0 (no thresholds here)."""
    parser = argparse.ArgumentParser(prog="python -m bench policy", description=__doc__)
    parser.add_argument("--batches", type=int, default=25, help="batches (median is taken)")
    parser.add_argument("--per-batch", type=int, default=2000, help="decisions per batch")
    args = parser.parse_args(argv)
    print(
        f"baseline: an empty Python function call costs {_baseline_ns():.0f} ns on this machine now"
    )
    _run("large set (target ≤ 10 µs)", 200, 5, args.batches, args.per_batch)
    _run("single 100-rule policy (target ≤ 50 µs)", 1, 100, args.batches, args.per_batch // 10)
    return 0
