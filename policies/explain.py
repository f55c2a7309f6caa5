"""Put decisions and policies into words: the trace behind `explain`, the summary behind `who-can`.

Both come as plain data (for `--json`) and as indented English text. Imports only the standard
library and the policy core.
"""

from __future__ import annotations

from typing import Final

from policies.engine import CompiledPolicy, Node, Rule
from policies.model import FALSE, TRUE, Decision, TraceNode
from policies.reasons import describe

_STATE_WORDS: Final = {TRUE: "yes", FALSE: "no"}
_BLOCK_WORDS: Final = {
    "all": "ALL of these hold:",
    "any": "AT LEAST ONE of these holds:",
    "none": "NOT ONE of these holds:",
}

JsonValue = object


def _state(node: TraceNode) -> str:
    if not node.evaluated:
        return "skipped"
    return _STATE_WORDS.get(node.state, "unknown")


def trace_json(node: TraceNode) -> dict[str, JsonValue]:
    """One trace node as JSON-ready data."""
    out: dict[str, JsonValue] = {
        "kind": node.kind,
        "words": node.words,
        "result": _state(node),
        "reasons": [str(r) for r in node.reasons],
    }
    if node.children:
        out["children"] = [trace_json(child) for child in node.children]
    return out


def decision_json(decision: Decision) -> dict[str, JsonValue]:
    """A decision, its reasons and its trace as JSON-ready data."""
    return {
        "allowed": decision.allowed,
        "policy": decision.policy,
        "rule": decision.rule,
        "reasons": [str(r) for r in decision.reasons],
        "trace": [
            {
                "effect": step.effect,
                "rule": step.rule,
                "fired": step.fired,
                "node": trace_json(step.node),
            }
            for step in decision.trace
        ],
    }


def _trace_lines(node: TraceNode, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    result = _state(node)
    if node.kind in _BLOCK_WORDS:
        out.append(f"{pad}[{result}] {_BLOCK_WORDS[node.kind]}")
    elif node.kind == "unless":
        out.append(f"{pad}[{result}] the first holds UNLESS the second holds:")
    else:
        shown = ""
        if node.evaluated and node.state != TRUE and node.reasons:
            shown = " — " + "; ".join(f"{r} ({describe(r)})" for r in node.reasons)
        out.append(f"{pad}[{result}] {node.kind}: {node.words}{shown}")
    for child in node.children:
        _trace_lines(child, depth + 1, out)


def decision_text(decision: Decision) -> str:
    """A decision and its trace as indented English lines."""
    verdict = "ALLOW" if decision.allowed else "DENY"
    lines = [f"{verdict} by policy '{decision.policy}'" + _rule_words(decision.rule)]
    for reason in decision.reasons:
        lines.append(f"  reason: {reason} — {describe(reason)}")
    for step in decision.trace:
        fired = "fired" if step.fired else "did not fire"
        lines.append(f"{step.effect} rule '{step.rule}': {fired}")
        _trace_lines(step.node, 1, lines)
    return "\n".join(lines)


def _rule_words(rule: str | None) -> str:
    return f", rule '{rule}'" if rule else ""


def _node_lines(node: Node, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    if node.kind in _BLOCK_WORDS:
        out.append(f"{pad}{_BLOCK_WORDS[node.kind]}")
        for child in node.children:
            _node_lines(child, depth + 1, out)
    elif node.kind == "unless":
        _node_lines(node.children[0], depth, out)
        out.append(f"{pad}  unless:")
        _node_lines(node.children[1], depth + 2, out)
    else:
        out.append(f"{pad}- {node.words}")


def _node_json(node: Node) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {"kind": node.kind, "words": node.words}
    if node.children:
        out["children"] = [_node_json(child) for child in node.children]
    return out


def _rule_lines(rule: Rule, out: list[str]) -> None:
    title = f"  rule '{rule.name}'" + (f" — {rule.description}" if rule.description else "")
    out.append(title + ":")
    _node_lines(rule.node, 2, out)
    if rule.reason is not None:
        out.append(f"    (reason given: {rule.reason} — {describe(rule.reason)})")


def who_can_text(policy: CompiledPolicy) -> str:
    """The conditions under which anyone gets through `policy`, in plain words."""
    lines = [f"Policy '{policy.name}'" + (f" — {policy.description}" if policy.description else "")]
    if not policy.allow:
        lines.append("Nobody can reach it: the policy has no allow rule.")
        return "\n".join(lines)
    lines.append("Access is allowed when at least one of these allow rules holds:")
    for rule in policy.allow:
        _rule_lines(rule, lines)
    if policy.deny:
        lines.append("… and none of these deny rules applies (a deny rule always wins,")
        lines.append("and a deny rule whose facts are missing counts as applying):")
        for rule in policy.deny:
            _rule_lines(rule, lines)
    lines.append("A fact the gateway does not have (no sign-in, no device) never counts as met.")
    return "\n".join(lines)


def who_can_json(policy: CompiledPolicy) -> dict[str, JsonValue]:
    """The same as `who_can_text`, as JSON-ready data."""

    def rule_json(rule: Rule) -> dict[str, JsonValue]:
        return {
            "rule": rule.name,
            "description": rule.description,
            "reason": None if rule.reason is None else str(rule.reason),
            "when": _node_json(rule.node),
        }

    return {
        "policy": policy.name,
        "description": policy.description,
        "allow_when_any": [rule_json(rule) for rule in policy.allow],
        "unless_any_deny": [rule_json(rule) for rule in policy.deny],
    }
