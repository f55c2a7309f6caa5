"""Compile policies once, then decide requests: deny overrides allow, no matching allow means deny.

Logic is three-valued: a criterion whose fact is missing is UNKNOWN. An allow rule needs TRUE; a
deny rule fires on TRUE or UNKNOWN (fail closed), so a missing fact never grants access, even
through `none:` or `unless:`. Pure: imports only the standard library; `now` is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final, Literal

from policies.criteria import (
    REGISTRY,
    STATES,
    CompileContext,
    Criterion,
    Facts,
    PathKey,
    state_of,
    suggest,
)
from policies.model import (
    FALSE,
    TRUE,
    UNKNOWN,
    AccessRequest,
    Decision,
    RuleTrace,
    TraceNode,
    Tri,
)
from policies.reasons import Reason, by_priority

BLOCKS: Final = ("all", "any", "none")
"""all: every item holds · any: at least one item holds · none: not a single item holds."""
RULE_KEYS: Final = ("name", "description", "unless", "reason")
POLICY_KEYS: Final = ("name", "description", "allow", "deny")
BUILT_IN: Final = ("accept", "reject")

Probe = Callable[[Facts], tuple[Reason, ...]]
Why = Callable[[Facts], tuple[Tri, frozenset[Reason]]]
_NO: Final = (Reason.NO_RULE_MATCHED,)  # a FALSE outcome on the fast path (no reasons kept)
_MAYBE: Final = (Reason.POLICY_ERROR,)  # an UNKNOWN outcome on the fast path


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """A compiled piece of a rule: a criterion, a block of items, or `X unless Y`."""

    kind: str  # a criterion name, "all" / "any" / "none", or "unless"
    words: str
    probe: Probe  # the fast path: () when the node holds, else a tuple whose state_of tells
    children: tuple[Node, ...] = ()
    criterion: Criterion | None = None
    why: Why = field(init=False, repr=False)  # the outcome and every reason behind it

    def __post_init__(self) -> None:
        object.__setattr__(self, "why", _why_of(self))


def why(node: Node, f: Facts) -> tuple[Tri, frozenset[Reason]]:
    """The three-valued outcome of `node` and the reasons behind it (the same as the `reasons`
    of `explain_node`, without building a trace)."""
    return node.why(f)


_FAILED: dict[tuple[Reason, ...], tuple[Tri, frozenset[Reason]]] = {}


def _failed(reasons: tuple[Reason, ...]) -> tuple[Tri, frozenset[Reason]]:
    """A criterion's failure as (state, reasons); criteria return a few constant tuples."""
    found = _FAILED.get(reasons)
    if found is None:
        found = (state_of(reasons), frozenset(reasons))
        if len(_FAILED) < 4096:
            _FAILED[reasons] = found
    return found


def _why_of(node: Node) -> Why:
    """`why` for `node`, built once from its children's: every child is evaluated, since the
    reasons of a block are those of all its children with the deciding outcome."""
    criterion = node.criterion
    if criterion is not None:
        check, held = criterion.check, (TRUE, frozenset((criterion.denied,)))

        def why_criterion(f: Facts) -> tuple[Tri, frozenset[Reason]]:
            failed = check(f)
            return _failed(failed) if failed else held

        return why_criterion
    whys = tuple(child.why for child in node.children)
    if node.kind == "unless":
        return _unless_why(*whys)
    kind = node.kind

    def why_block(f: Facts) -> tuple[Tri, frozenset[Reason]]:
        split: tuple[list[frozenset[Reason]], ...] = ([], [], [])  # by FALSE, TRUE, UNKNOWN
        for child in whys:
            state, reasons = child(f)
            split[state].append(reasons)
        falses, trues, unknowns = split
        if kind == "all":
            state = FALSE if falses else UNKNOWN if unknowns else TRUE
            pick = split[state]
        elif kind == "any":
            state = TRUE if trues else UNKNOWN if unknowns else FALSE
            pick = split[state]
        elif trues:  # none: a child that holds makes it false, and is why
            state, pick = FALSE, trues
        else:
            state, pick = (UNKNOWN, unknowns) if unknowns else (TRUE, falses)
        return state, pick[0] if len(pick) == 1 else frozenset().union(*pick)

    return why_block


def _unless_why(base_why: Why, exception_why: Why) -> Why:
    def why_unless(f: Facts) -> tuple[Tri, frozenset[Reason]]:
        base, reasons = base_why(f)
        if base == FALSE:
            return FALSE, reasons
        exception, exception_reasons = exception_why(f)
        if exception == TRUE:
            return FALSE, exception_reasons
        if base == TRUE and exception == FALSE:
            return TRUE, reasons | exception_reasons
        if base == UNKNOWN and exception == UNKNOWN:
            return UNKNOWN, reasons | exception_reasons
        return UNKNOWN, reasons if base == UNKNOWN else exception_reasons

    return why_unless


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    """One allow or deny rule of a policy."""

    effect: Literal["allow", "deny"]
    name: str
    node: Node
    description: str = ""
    reason: Reason | None = None  # a deny rule's own reason code, when IT set one
    scope: tuple[Probe, ...] = ()  # the rule's top-level method/path criteria


INDEXED: Final = ("group", "method", "path")
"""The criteria whose `keys` the rule index uses (see `Criterion.keys`)."""
INDEX_MIN_RULES: Final = 4
"""Below this many allow rules, trying each rule is as cheap as consulting an index."""


class RuleIndex:
    """Which of a policy's allow rules can hold for a request, as a bit mask (bit i: rule i).

    Built from criteria every rule needs: a rule requiring `group: [a, b]` cannot hold unless the
    user is in a or b; likewise for the method and the first path segment. The index only rules
    rules *out*; every rule it leaves is still evaluated in full, in the policy's order.
    """

    __slots__ = (
        "full",
        "group_free",
        "group_names",
        "groups",
        "method_free",
        "methods",
        "path_free",
        "paths",
    )

    def __init__(self, needs: Sequence[Sequence[Criterion]]) -> None:
        self.full = (1 << len(needs)) - 1
        tables: dict[str, dict[str, int]] = {kind: {} for kind in INDEXED}
        free = dict.fromkeys(INDEXED, self.full)  # rules not constrained by that fact
        for number, criteria in enumerate(needs):
            bit = 1 << number
            for kind in INDEXED:
                keys = next((c.keys for c in criteria if c.kind == kind and c.keys), None)
                if keys is None:
                    continue
                free[kind] &= ~bit
                table = tables[kind]
                for key in keys:
                    table[key] = table.get(key, 0) | bit
        for kind, table in tables.items():
            for key in table:
                table[key] |= free[kind]
        self.groups: Mapping[str, int] = tables["group"]
        self.group_names = frozenset(self.groups)
        self.group_free = free["group"]
        self.methods: Mapping[str, int] = tables["method"]
        self.method_free = free["method"]
        self.paths: Mapping[str, int] = tables["path"]
        self.path_free = free["path"]

    def mask(self, request: AccessRequest) -> int:
        """The rules that may hold for `request` (a superset of those that do)."""
        try:
            found = self.full
            if self.groups:
                subject = request.subject
                member = self.group_free
                if subject is not None:
                    groups = self.groups
                    for name in self.group_names.intersection(subject.groups):
                        member |= groups[name]
                found &= member
            resource = request.resource
            if self.methods:
                found &= self.methods.get(resource.method.upper(), self.method_free)
            if self.paths:
                path = resource.path
                if path[:1] == "/":  # the same as path_segment, without the call
                    found &= self.paths.get(path.split("/", 2)[1], self.path_free)
        except Exception:  # odd facts: rule nothing out, and let the rules themselves decide
            return self.full
        return found


def _bits(mask: int) -> Iterator[int]:
    """The numbers of the bits set in `mask`, lowest first (rule order)."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _needs(node: Node) -> Iterator[Criterion]:
    """Criteria that must hold for `node` to hold."""
    if node.criterion is not None:
        yield node.criterion
    elif node.kind == "all" or (node.kind == "any" and len(node.children) == 1):
        for child in node.children:
            yield from _needs(child)
    elif node.kind == "unless":
        yield from _needs(node.children[0])


def _scope_criteria(node: Node) -> tuple[Criterion, ...]:
    """The rule's top-level method and path criteria: those that must hold for it to apply."""
    items = node.children if node.kind == "all" else (node,)
    return tuple(
        item.criterion
        for item in items
        if item.kind in {"method", "path"} and item.criterion is not None
    )


def _index(rules: Iterable[Sequence[Criterion]], count: int) -> RuleIndex | None:
    return RuleIndex(list(rules)) if count >= INDEX_MIN_RULES else None


@dataclass(frozen=True, slots=True, eq=False)
class CompiledPolicy:
    """A policy ready to decide: its deny rules, then its allow rules.

    Beside the rules it keeps what deciding needs ready-made: the allow rules' index, the
    index of their method/path scope, their fast paths and the Decision each of them gives.
    """

    name: str
    description: str
    deny: tuple[Rule, ...]
    allow: tuple[Rule, ...]
    allow_index: RuleIndex | None = field(init=False, repr=False)
    scope_index: RuleIndex | None = field(init=False, repr=False)
    allow_decisions: tuple[Decision, ...] = field(init=False, repr=False)
    allow_probes: tuple[Probe, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        count = len(self.allow)
        allow_index = _index((tuple(_needs(r.node)) for r in self.allow), count)
        scope_index = _index((_scope_criteria(r.node) for r in self.allow), count)
        decisions = tuple(Decision(True, self.name, rule.name, ()) for rule in self.allow)
        object.__setattr__(self, "allow_index", allow_index)
        object.__setattr__(self, "scope_index", scope_index)
        object.__setattr__(self, "allow_decisions", decisions)
        object.__setattr__(self, "allow_probes", tuple(rule.node.probe for rule in self.allow))

    def rules(self) -> tuple[Rule, ...]:
        """Every rule, deny rules first (the order they are tried in)."""
        return self.deny + self.allow


@dataclass(frozen=True, slots=True, eq=False)
class PolicySet:
    """Every compiled policy of a directory, by name, with the hash of the content it came from."""

    policies: Mapping[str, CompiledPolicy]
    content_hash: str
    sources: tuple[str, ...] = ()
    _names: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def of(
        cls,
        policies: Mapping[str, CompiledPolicy],
        content_hash: str,
        sources: tuple[str, ...] = (),
    ) -> PolicySet:
        """A set holding `policies` plus the built-in `accept` and `reject`."""
        table = {"accept": ACCEPT, "reject": REJECT, **policies}
        return cls(MappingProxyType(table), content_hash, sources, tuple(sorted(table)))

    def policy(self, name: str) -> CompiledPolicy | None:
        """The compiled policy called `name`, or None (one dict lookup)."""
        return self.policies.get(name)

    def names(self) -> tuple[str, ...]:
        """Every policy name, built-ins included, sorted."""
        return self._names

    def evaluate(
        self, name: str, request: AccessRequest, now: datetime, *, trace: bool = False
    ) -> Decision:
        """Decide with the policy called `name`; an unknown name denies with `policy-unknown`."""
        policy = self.policies.get(name)
        if policy is None:
            return Decision(False, name, None, (Reason.POLICY_UNKNOWN,))
        return evaluate(policy, request, now, trace=trace)


# --- compiling ---------------------------------------------------------------------------------


def _criterion_node(criterion: Criterion) -> Node:
    return Node(criterion.kind, criterion.words, criterion.check, criterion=criterion)


def _accept_node() -> Node:
    return _criterion_node(Criterion("accept", lambda _f: (), "always", Reason.REJECTED))


ACCEPT: Final = CompiledPolicy(
    "accept",
    "every request is allowed (a public route)",
    (),
    (Rule("allow", "accept", _accept_node()),),
)
"""The built-in policy behind a route's `public: true`: always allow, with no reasons."""

REJECT: Final = CompiledPolicy("reject", "every request is denied", (), ())
"""The built-in policy that denies everything (no allow rule)."""


def _block_node(kind: str, children: tuple[Node, ...]) -> Node:
    probes = tuple(child.probe for child in children)
    known = STATES.get
    if kind == "all":
        words = "all of"
        if len(probes) == 1:
            return Node(kind, words, probes[0], children)

        def probe(f: Facts) -> tuple[Reason, ...]:
            result: tuple[Reason, ...] = ()
            for p in probes:
                reasons = p(f)
                if reasons:
                    state = known(reasons)
                    if state is None:
                        state = state_of(reasons)
                    if state == FALSE:
                        return _NO
                    result = _MAYBE
            return result

    elif kind == "any":
        words = "at least one of"

        def probe(f: Facts) -> tuple[Reason, ...]:
            result = _NO
            for p in probes:
                reasons = p(f)
                if not reasons:
                    return ()
                state = known(reasons)
                if state == UNKNOWN or (state is None and state_of(reasons) == UNKNOWN):
                    result = _MAYBE
            return result

    else:
        words = "none of"

        def probe(f: Facts) -> tuple[Reason, ...]:
            result: tuple[Reason, ...] = ()
            for p in probes:
                reasons = p(f)
                if not reasons:
                    return _NO
                state = known(reasons)
                if state == UNKNOWN or (state is None and state_of(reasons) == UNKNOWN):
                    result = _MAYBE
            return result

    return Node(kind, words, probe, children)


def _unless_node(base: Node, exception: Node) -> Node:
    base_probe, exception_probe = base.probe, exception.probe

    def probe(f: Facts) -> tuple[Reason, ...]:
        first = state_of(base_probe(f))
        if first == FALSE:
            return _NO
        second = state_of(exception_probe(f))
        if second == TRUE:
            return _NO
        return () if first == TRUE and second == FALSE else _MAYBE

    return Node("unless", "unless", probe, (base, exception))


class _Compiler:
    def __init__(self, ctx: CompileContext) -> None:
        self.ctx = ctx
        self.items = (*BLOCKS, *REGISTRY)

    def item(self, data: object, path: PathKey, *, extra: tuple[str, ...] = ()) -> Node | None:
        """One item: a criterion or a block, optionally with `unless:`."""
        ctx = self.ctx
        if not isinstance(data, dict) or not data:
            ctx.error(
                path,
                f"expected a criterion or all/any/none, found {_type_word(data)}",
                "for example: - group: staff",
            )
            return None
        ok = True
        heads = []
        for key in data:
            if key in self.items:
                heads.append(key)
            elif key != "unless" and key not in extra:
                ok = False
                hint = suggest(str(key), self.items)
                ctx.error((*path, key), f"unknown criterion '{key}'", hint, key=True)
        if not ok:
            return None
        if len(heads) != 1:
            if not heads:
                ctx.error(path, "expected one criterion or all/any/none here, found none")
            else:
                ctx.error(
                    (*path, heads[1]),
                    f"one criterion per item, found '{heads[0]}' and '{heads[1]}'",
                    "make each its own list item under 'all:' (every one must hold) or 'any:'",
                    key=True,
                )
            return None
        head = heads[0]
        node = self.block(head, data[head], (*path, head)) if head in BLOCKS else None
        if head not in BLOCKS:
            criterion = REGISTRY[head].compile(data[head], ctx, (*path, head))
            node = None if criterion is None else _criterion_node(criterion)
        if "unless" in data:
            exception = self.item(data["unless"], (*path, "unless"))
            if node is None or exception is None:
                return None
            return _unless_node(node, exception)
        return node

    def block(self, kind: str, data: object, path: PathKey) -> Node | None:
        if not isinstance(data, list) or not data:
            self.ctx.error(
                path,
                f"'{kind}:' needs a list of items, found {_type_word(data)}",
                "write each item on its own line starting with '- '",
            )
            return None
        children = [self.item(child, (*path, index)) for index, child in enumerate(data)]
        if any(child is None for child in children):
            return None
        return _block_node(kind, tuple(c for c in children if c is not None))

    def rules(
        self, effect: Literal["allow", "deny"], data: object, path: PathKey
    ) -> tuple[Rule, ...] | None:
        single = isinstance(data, dict)
        raw = [data] if single else data
        if not isinstance(raw, list) or not raw:
            self.ctx.error(path, f"'{effect}:' needs a rule or a list of rules")
            return None
        rules: list[Rule] = []
        names: dict[str, PathKey] = {}
        ok = True
        for index, item in enumerate(raw):
            where = path if single else (*path, index)
            rule = self.rule(effect, item, where, effect if single else f"{effect}[{index + 1}]")
            if rule is None:
                ok = False
                continue
            if rule.name in names:
                self.ctx.error(where, f"rule name '{rule.name}' is used twice in this policy")
                ok = False
            names[rule.name] = where
            rules.append(rule)
        return tuple(rules) if ok else None

    def rule(
        self, effect: Literal["allow", "deny"], data: object, path: PathKey, default: str
    ) -> Rule | None:
        node = self.item(data, path, extra=RULE_KEYS)
        if not isinstance(data, dict) or node is None:
            return None
        name = data.get("name", default)
        description = data.get("description", "")
        if not isinstance(name, str) or not name:
            self.ctx.error((*path, "name"), "a rule name is text")
            return None
        if not isinstance(description, str):
            self.ctx.error((*path, "description"), "a description is text")
            return None
        reason: Reason | None = None
        if "reason" in data:
            if effect != "deny":
                self.ctx.error((*path, "reason"), "only a deny rule names its reason", key=True)
                return None
            try:
                reason = Reason(data["reason"])
            except ValueError:
                hint = suggest(str(data["reason"]), [r.value for r in Reason])
                self.ctx.error((*path, "reason"), f"unknown reason code '{data['reason']}'", hint)
                return None
        return Rule(effect, name, node, description, reason, _scope(node))

    def policy(self, data: object, path: PathKey) -> CompiledPolicy | None:
        ctx = self.ctx
        if not isinstance(data, dict):
            ctx.error(path, f"a policy is a mapping with 'name:', found {_type_word(data)}")
            return None
        ok = True
        for key in data:
            if key not in POLICY_KEYS:
                ok = False
                hint = suggest(str(key), POLICY_KEYS) or "a policy has: " + ", ".join(POLICY_KEYS)
                ctx.error((*path, key), f"unknown key '{key}' in a policy", hint, key=True)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            ctx.error(path, "a policy needs 'name:'", "for example: name: lgwan-apps")
            return None
        if name in BUILT_IN:
            ctx.error((*path, "name"), f"'{name}' is a built-in policy; choose another name")
            ok = False
        description = data.get("description", "")
        if not isinstance(description, str):
            ctx.error((*path, "description"), "a description is text")
            ok = False
        if "allow" not in data:
            ctx.error(
                path,
                f"policy '{name}' has no 'allow:', so it would deny every request",
                "add an allow rule, or use the built-in policy 'reject'",
            )
            ok = False
        allow = self.rules("allow", data["allow"], (*path, "allow")) if "allow" in data else ()
        deny = self.rules("deny", data["deny"], (*path, "deny")) if "deny" in data else ()
        if not ok or allow is None or deny is None:
            return None
        return CompiledPolicy(name, str(description), deny, allow)


def _scope(node: Node) -> tuple[Probe, ...]:
    """The method and path criteria that must hold for a rule to apply at all."""
    items = node.children if node.kind == "all" else (node,)
    return tuple(item.probe for item in items if item.kind in {"method", "path"})


def _type_word(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "nothing" if value is None else f"'{value}'"


def compile_policy(data: object, ctx: CompileContext, path: PathKey) -> CompiledPolicy | None:
    """Compile one policy mapping; report every problem through `ctx` and return None if any."""
    return _Compiler(ctx).policy(data, path)


# --- deciding ----------------------------------------------------------------------------------


def evaluate(
    policy: CompiledPolicy, request: AccessRequest, now: datetime, *, trace: bool = False
) -> Decision:
    """Decide `request` at `now` (timezone-aware) under `policy`; never raises.

    Deny rules are tried first and override; then the first allow rule that holds allows. With
    no allow rule holding, the reasons say what the closest allow rule still needs.
    """
    try:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        f = Facts(request, now)
        for rule in policy.deny:
            reasons = rule.node.probe(f)
            if not reasons or state_of(reasons) != FALSE:
                return _denied(policy, rule, f, trace)
        probes = policy.allow_probes
        index = policy.allow_index
        if index is None:
            for number, probe in enumerate(probes):
                if not probe(f):
                    return _allowed(policy, number, f) if trace else policy.allow_decisions[number]
        else:
            mask = index.mask(request)  # the rules that may hold; lowest bit first = rule order
            while mask:
                low = mask & -mask
                number = low.bit_length() - 1
                if not probes[number](f):
                    return _allowed(policy, number, f) if trace else policy.allow_decisions[number]
                mask ^= low
        return _unmatched(policy, f, trace)
    except Exception:
        return Decision(False, policy.name, None, (Reason.POLICY_ERROR,))


def _allowed(policy: CompiledPolicy, number: int, f: Facts) -> Decision:
    """Allowed by allow rule `number`, with the trace (without one, the decision is ready-made)."""
    return Decision(True, policy.name, policy.allow[number].name, (), _full_trace(policy, f))


def _denied(policy: CompiledPolicy, rule: Rule, f: Facts, trace: bool) -> Decision:
    if rule.reason is not None:
        reasons: tuple[Reason, ...] = (rule.reason,)
    else:
        reasons = _ordered(rule.node.why(f)[1], (Reason.DENY_RULE_MATCHED,), ())
    return Decision(False, policy.name, rule.name, reasons, _full_trace(policy, f) if trace else ())


def _unmatched(policy: CompiledPolicy, f: Facts, trace: bool) -> Decision:
    found = _ordered(_closest(policy, f) or frozenset(), (), (Reason.NO_RULE_MATCHED,))
    return Decision(False, policy.name, None, found, _full_trace(policy, f) if trace else ())


_ORDERED: dict[
    tuple[frozenset[Reason], tuple[Reason, ...], tuple[Reason, ...]], tuple[Reason, ...]
] = {}


def _ordered(
    reasons: frozenset[Reason], empty: tuple[Reason, ...], then: tuple[Reason, ...]
) -> tuple[Reason, ...]:
    """`reasons` in priority order (`empty` if there are none), followed by `then`; the few
    combinations a policy set gives are remembered, since sorting costs more than a lookup."""
    key = (reasons, empty, then)
    found = _ORDERED.get(key)
    if found is None:
        found = (*(by_priority(reasons) or empty), *then)
        if len(_ORDERED) < 4096:
            _ORDERED[key] = found
    return found


def _in_scope(policy: CompiledPolicy, f: Facts, tally: list[int] | None = None) -> Iterator[Rule]:
    """The allow rules whose top-level method and path criteria hold, in order."""
    allow = policy.allow
    index = policy.scope_index
    numbers = range(len(allow)) if index is None else _bits(index.mask(f.request))
    for number in numbers:
        rule = allow[number]
        for probe in rule.scope:
            if tally is not None:
                tally[0] += 1
            if probe(f):
                break
        else:
            yield rule


def _closest(
    policy: CompiledPolicy, f: Facts, tally: list[int] | None = None
) -> frozenset[Reason] | None:
    """The reasons of the allow rule that needs the fewest, the first such one on a tie.

    Only rules meant for this method and path can tell the user what to fix: the user cannot
    change the address they asked for. With none of them, every rule is considered. A rule that
    does not hold always has at least one reason, so a rule with one ends the search.
    """
    best: frozenset[Reason] | None = None
    for rules in (_in_scope(policy, f, tally), policy.allow):
        for rule in rules:
            if tally is not None:
                tally[0] += _why_count(rule.node, f)
            reasons = rule.node.why(f)[1]
            if best is None or len(reasons) < len(best):
                best = reasons
                if len(best) == 1:
                    return best
        if best is not None:
            return best
    return best


def _why_count(node: Node, f: Facts) -> int:
    """How many criteria `node.why` checks (all but an `unless:` whose base already failed)."""
    if node.criterion is not None:
        return 1
    if node.kind == "unless":
        base, exception = node.children
        skipped = base.why(f)[0] == FALSE
        return _why_count(base, f) + (0 if skipped else _why_count(exception, f))
    return sum(_why_count(child, f) for child in node.children)


def _combine(kind: str, states: set[Tri]) -> tuple[Tri, Tri]:
    """A block's outcome from its children's, and which children's reasons explain it."""
    if kind == "all":
        state: Tri = FALSE if FALSE in states else UNKNOWN if UNKNOWN in states else TRUE
        return state, state
    if kind == "any":
        state = TRUE if TRUE in states else UNKNOWN if UNKNOWN in states else FALSE
        return state, state
    state = FALSE if TRUE in states else UNKNOWN if UNKNOWN in states else TRUE
    return state, TRUE if state == FALSE else UNKNOWN if state == UNKNOWN else FALSE


def _full_trace(policy: CompiledPolicy, f: Facts) -> tuple[RuleTrace, ...]:
    out = []
    for rule in policy.rules():
        node = explain_node(rule.node, f)
        fired = node.state != FALSE if rule.effect == "deny" else node.state == TRUE
        out.append(RuleTrace(rule.effect, rule.name, fired, node))
    return tuple(out)


def _union(nodes: Iterator[TraceNode]) -> tuple[Reason, ...]:
    return by_priority(r for node in nodes for r in node.reasons)


def explain_node(node: Node, f: Facts, *, full: bool = True) -> TraceNode:
    """Evaluate `node` again, keeping why; `full=False` skips what the fast path skips."""
    if node.criterion is not None:
        failed = node.criterion.check(f)
        outcome = state_of(failed)
        if outcome == TRUE:
            failed = (node.criterion.denied,)
        return TraceNode(node.kind, node.words, outcome, failed)
    if node.kind == "unless":
        base = explain_node(node.children[0], f, full=full)
        if base.state == FALSE and not full:
            return TraceNode(
                "unless", node.words, FALSE, base.reasons, (base, _skipped(node.children[1]))
            )
        exception = explain_node(node.children[1], f, full=full)
        children = (base, exception)
        if base.state == FALSE:
            return TraceNode("unless", node.words, FALSE, base.reasons, children)
        if exception.state == TRUE:
            return TraceNode("unless", node.words, FALSE, exception.reasons, children)
        state: Tri = TRUE if base.state == TRUE and exception.state == FALSE else UNKNOWN
        if state == TRUE:
            reasons = _union(iter(children))
        else:
            reasons = _union(c for c in children if c.state == UNKNOWN)
        return TraceNode("unless", node.words, state, reasons, children)
    return _explain_block(node, f, full)


def _explain_block(node: Node, f: Facts, full: bool) -> TraceNode:
    stop_on = FALSE if node.kind == "all" else TRUE
    children: list[TraceNode] = []
    stopped = False
    for child in node.children:
        if stopped:
            children.append(_skipped(child))
            continue
        result = explain_node(child, f, full=full)
        children.append(result)
        if result.state == stop_on and not full:
            stopped = True
    states = {child.state for child in children if child.evaluated}
    state, pick = _combine(node.kind, states)
    reasons = _union(c for c in children if c.evaluated and c.state == pick)
    return TraceNode(node.kind, node.words, state, reasons, tuple(children))


def _skipped(node: Node) -> TraceNode:
    children = tuple(_skipped(child) for child in node.children)
    return TraceNode(node.kind, node.words, FALSE, (), children, evaluated=False)


def count_evaluated(policy: CompiledPolicy, request: AccessRequest, now: datetime) -> int:
    """How many criteria the fast path of `evaluate` checks to decide `request` (for the bench).

    The work of finding the reasons of a deny is counted by `count_explained`.
    """
    f = Facts(request, now)
    total = 0
    for rule in policy.deny:
        node = explain_node(rule.node, f, full=False)
        total += _count(node)
        if node.state != FALSE:
            return total
    index = policy.allow_index
    numbers = range(len(policy.allow)) if index is None else _bits(index.mask(request))
    for number in numbers:
        node = explain_node(policy.allow[number].node, f, full=False)
        total += _count(node)
        if node.state == TRUE:
            break
    return total


def count_explained(policy: CompiledPolicy, request: AccessRequest, now: datetime) -> int:
    """How many criteria `evaluate` checks, after deciding, to find a deny's reasons."""
    f = Facts(request, now)
    for rule in policy.deny:
        if explain_node(rule.node, f).state != FALSE:
            return 0 if rule.reason is not None else _why_count(rule.node, f)
    if any(explain_node(rule.node, f).state == TRUE for rule in policy.allow):
        return 0
    tally = [0]
    _closest(policy, f, tally)
    return tally[0]


def _count(node: TraceNode) -> int:
    if not node.evaluated:
        return 0
    if not node.children:
        return 1
    return sum(_count(child) for child in node.children)


# --- the plain reading, for tests ---------------------------------------------------------------


def reference_evaluate(policy: CompiledPolicy, request: AccessRequest, now: datetime) -> Decision:
    """Decide as the language reference reads, with no index and no shortcut; slow, for tests.

    Every rule is explained in full (`explain_node`); `evaluate` must give the same Decision.
    """
    try:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        f = Facts(request, now)
        for rule in policy.deny:
            node = explain_node(rule.node, f)
            if node.state != FALSE:
                reasons = by_priority(node.reasons) or (Reason.DENY_RULE_MATCHED,)
                if rule.reason is not None:
                    reasons = (rule.reason,)
                return Decision(False, policy.name, rule.name, reasons)
        for rule in policy.allow:
            if explain_node(rule.node, f).state == TRUE:
                return Decision(True, policy.name, rule.name, ())

        def applies(rule: Rule) -> bool:
            items = rule.node.children if rule.node.kind == "all" else (rule.node,)
            scope = [item for item in items if item.kind in {"method", "path"}]
            return all(explain_node(item, f).state == TRUE for item in scope)

        best: tuple[Reason, ...] | None = None
        for rule in [rule for rule in policy.allow if applies(rule)] or policy.allow:
            reasons = by_priority(explain_node(rule.node, f).reasons)
            if best is None or len(reasons) < len(best):
                best = reasons
        return Decision(False, policy.name, None, (*(best or ()), Reason.NO_RULE_MATCHED))
    except Exception:
        return Decision(False, policy.name, None, (Reason.POLICY_ERROR,))
