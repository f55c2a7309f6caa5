"""`tabiji-policy lint | test | explain | who-can`: IT's and auditors' tools for policy sets.

Exit 0 ok, 1 a check failed, 2 a usage error. Every sentence comes from MESSAGES so it can move
into the project's message catalogue. Reads files only through `policies.loader`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from policies.cases import compile_cases, parse_now, parse_request, run_case
from policies.engine import evaluate
from policies.explain import decision_json, decision_text, who_can_json, who_can_text
from policies.loader import LoadedDirectory, load_directory
from policies.yaml_source import SourceError, SourceErrors, read_yaml

OK: Final = 0
FAILED: Final = 1
USAGE: Final = 2

MESSAGES: Final[dict[str, str]] = {
    "description": (
        "Check, test and explain Tabiji access policies. A policy directory holds YAML files "
        "with lists:, policies:, holidays:, travel_windows: and tests:."
    ),
    "lint-help": "check every file of a policy directory; print each problem with file:line:col",
    "test-help": "run the test cases (tests:) of a policy directory and print a table",
    "explain-help": "decide one request from a facts file and show why, criterion by criterion",
    "who-can-help": "say in plain words who can get through a policy, and under what conditions",
    "dir-help": "the policy directory",
    "policies-help": "the policy directory",
    "request-help": "a YAML file of request facts (subject, device, resource, source_ip, …)",
    "policy-help": "the policy to use (default: the facts file's 'policy:')",
    "now-help": "the moment to decide at, e.g. 2025-04-01T10:00:00+09:00 (default: now)",
    "test-now-help": "the moment for cases without 'now:' (default: the current time)",
    "json-help": "print JSON for machines instead of text",
    "who-can-policy-help": "the policy name",
    "lint-ok": "ok: {policies} policies, {cases} test cases in {path} (content hash {hash})",
    "problems": "{count} problem(s) found",
    "test-row": "{result:<4}  {policy:<20}  {name}",
    "test-header": "{result:<4}  {policy:<20}  {name}",
    "test-detail": "      {problem}",
    "test-summary": "{passed} passed, {failed} failed",
    "test-none": "no test cases found (add 'tests:' to a file in {path})",
    "no-policy": "say which policy: give --policy NAME or write 'policy:' in the facts file",
    "unknown-policy": "unknown policy '{name}'; the policies are: {names}",
    "bad-now": "--now needs a date and time with an offset, such as 2025-04-01T10:00:00+09:00",
    "facts-not-mapping": "{path}: the facts file must be a mapping",
    "not-a-directory": "{path}: not a policy directory",
    "config-help": "a gateway config: take the policy directory and the route's policy from it",
    "route-help": "with --config: the route whose policy to explain",
    "who-can-usage": "give a POLICY and --policies DIR, or --config FILE and --route NAME",
    "config-unreadable": "{path}: not a readable gateway config with routes",
    "config-no-policies": "{path}: the config has no 'policies: {{dir: …}}'",
    "unknown-route": "unknown route '{name}'; the routes are: {names}",
    "route-uses": "route '{route}' is decided by policy '{policy}':",
}


def say(key: str, **values: object) -> str:
    """The sentence `key` of MESSAGES with `values` filled in."""
    return MESSAGES[key].format(**values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tabiji-policy", description=say("description"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lint = commands.add_parser("lint", help=say("lint-help"), description=say("lint-help"))
    lint.add_argument("dir", type=Path, help=say("dir-help"))
    lint.add_argument("--json", action="store_true", help=say("json-help"))
    test = commands.add_parser("test", help=say("test-help"), description=say("test-help"))
    test.add_argument("dir", type=Path, help=say("dir-help"))
    test.add_argument("--now", help=say("test-now-help"))
    test.add_argument("--json", action="store_true", help=say("json-help"))
    explain = commands.add_parser(
        "explain", help=say("explain-help"), description=say("explain-help")
    )
    explain.add_argument("--policies", type=Path, required=True, help=say("policies-help"))
    explain.add_argument("--request", type=Path, required=True, help=say("request-help"))
    explain.add_argument("--policy", help=say("policy-help"))
    explain.add_argument("--now", help=say("now-help"))
    explain.add_argument("--json", action="store_true", help=say("json-help"))
    who = commands.add_parser("who-can", help=say("who-can-help"), description=say("who-can-help"))
    who.add_argument("policy", nargs="?", help=say("who-can-policy-help"))
    who.add_argument("--policies", type=Path, help=say("policies-help"))
    who.add_argument("--config", type=Path, help=say("config-help"))
    who.add_argument("--route", help=say("route-help"))
    who.add_argument("--json", action="store_true", help=say("json-help"))
    return parser


def main(  # noqa: PLR0911 — one exit per outcome, each a documented exit code
    argv: Sequence[str] | None = None, out: TextIO | None = None
) -> int:
    """Run `tabiji-policy` with `argv`; return the exit code."""
    stdout = out or sys.stdout
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:  # argparse: --help exits 0, a usage error exits 2
        return int(stop.code or 0)
    if args.command == "who-can":
        resolved = _who_can_target(args)
        if resolved is None:
            return USAGE
        args.policies, args.policy = resolved
    directory: Path = args.dir if args.command in {"lint", "test"} else args.policies
    if not directory.is_dir():
        print(say("not-a-directory", path=directory), file=sys.stderr)
        return USAGE
    try:
        loaded = load_directory(directory)
    except SourceErrors as problem:
        return _report(problem.errors, args.json, stdout)
    if args.command == "lint":
        return _lint(loaded, directory, args.json, stdout)
    if args.command == "test":
        now = _now_option(args.now)
        if now is None:
            print(say("bad-now"), file=sys.stderr)
            return USAGE
        return _test(loaded, directory, now, args.json, stdout)
    if args.command == "explain":
        return _explain(loaded, args, stdout)
    return _who_can(loaded, args.policy, args.json, stdout)


def _report(errors: list[SourceError], as_json: bool, out: TextIO) -> int:
    if as_json:
        rows = [
            {
                "file": e.position.source,
                "line": e.position.line,
                "column": e.position.column,
                "message": e.message,
                "hint": e.hint,
            }
            for e in errors
        ]
        print(json.dumps({"ok": False, "problems": rows}, ensure_ascii=False, indent=2), file=out)
    else:
        for error in errors:
            print(str(error), file=out)
        print(say("problems", count=len(errors)), file=out)
    return FAILED


def _lint(loaded: LoadedDirectory, directory: Path, as_json: bool, out: TextIO) -> int:
    _cases, errors = compile_cases(loaded.cases, loaded.policy_set, datetime.now(UTC))
    if errors:
        return _report(errors, as_json, out)
    policy_set = loaded.policy_set
    count = len(policy_set.names()) - 2  # not counting the built-in accept and reject
    if as_json:
        data = {
            "ok": True,
            "policies": count,
            "cases": len(loaded.cases),
            "content_hash": policy_set.content_hash,
        }
        print(json.dumps(data, indent=2), file=out)
    else:
        hash_ = policy_set.content_hash[:12]
        print(
            say("lint-ok", policies=count, cases=len(loaded.cases), path=directory, hash=hash_),
            file=out,
        )
    return OK


def _now_option(text: str | None) -> datetime | None:
    """The --now option: an ISO date and time with an offset; the current time if not given."""
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _test(
    loaded: LoadedDirectory, directory: Path, now: datetime, as_json: bool, out: TextIO
) -> int:
    cases, errors = compile_cases(loaded.cases, loaded.policy_set, now)
    if errors:
        return _report(errors, as_json, out)
    if not cases:
        print(say("test-none", path=directory), file=out)
        return FAILED
    results = [run_case(case, loaded.policy_set) for case in cases]
    failed = sum(not r.passed for r in results)
    if as_json:
        rows = [
            {
                "name": r.case.name,
                "policy": r.case.policy,
                "passed": r.passed,
                "problems": list(r.problems),
                "allowed": r.decision.allowed,
                "rule": r.decision.rule,
                "reasons": [str(x) for x in r.decision.reasons],
                "where": str(r.case.position),
            }
            for r in results
        ]
        summary = {"passed": len(results) - failed, "failed": failed, "cases": rows}
        print(json.dumps(summary, ensure_ascii=False, indent=2), file=out)
    else:
        print(say("test-header", result="", policy="policy", name="case"), file=out)
        for r in results:
            mark = "ok" if r.passed else "FAIL"
            print(say("test-row", result=mark, policy=r.case.policy, name=r.case.name), file=out)
            for problem in r.problems:
                print(say("test-detail", problem=f"{r.case.position}: {problem}"), file=out)
        print(say("test-summary", passed=len(results) - failed, failed=failed), file=out)
    return FAILED if failed else OK


def _explain(  # noqa: PLR0911 — one exit per outcome, each a documented exit code
    loaded: LoadedDirectory, args: argparse.Namespace, out: TextIO
) -> int:
    try:
        doc = read_yaml(args.request)
    except SourceErrors as problem:
        return _report(problem.errors, args.json, out)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        print(say("facts-not-mapping", path=args.request), file=sys.stderr)
        return USAGE
    facts = {k: v for k, v in data.items() if k not in {"policy", "now"}}
    errors: list[SourceError] = []
    now = _now_option(args.now)
    if now is None:
        print(say("bad-now"), file=sys.stderr)
        return USAGE
    if args.now is None and "now" in data:
        parsed = parse_now(doc, data["now"], ("now",), errors)
        now = parsed or now
    request = parse_request(doc, facts, (), errors)
    if errors or request is None:
        return _report(errors, args.json, out)
    name = args.policy or data.get("policy")
    if not isinstance(name, str):
        print(say("no-policy"), file=sys.stderr)
        return USAGE
    policy = loaded.policy_set.policy(name)
    if policy is None:
        names = ", ".join(loaded.policy_set.names())
        print(say("unknown-policy", name=name, names=names), file=sys.stderr)
        return USAGE
    decision = evaluate(policy, request, now, trace=True)
    if args.json:
        print(json.dumps(decision_json(decision), ensure_ascii=False, indent=2), file=out)
    else:
        print(decision_text(decision), file=out)
    return OK


def _who_can_target(args: argparse.Namespace) -> tuple[Path, str] | None:  # noqa: PLR0911 — one exit per misuse
    """(policy directory, policy name) from POLICY + --policies, or from a gateway config's route.

    The gateway's config is read here as plain YAML (policies never import the gateway): only
    `policies.dir` and the route's `public` / `policy` keys matter.
    """
    if args.config is None:
        if args.policy is None or args.policies is None or args.route is not None:
            print(say("who-can-usage"), file=sys.stderr)
            return None
        return args.policies, args.policy
    if args.route is None or args.policy is not None:
        print(say("who-can-usage"), file=sys.stderr)
        return None
    try:
        data = read_yaml(args.config).data
    except SourceErrors as problem:
        print("\n".join(str(error) for error in problem.errors), file=sys.stderr)
        return None
    routes = data.get("routes") if isinstance(data, dict) else None
    if not isinstance(routes, list):
        print(say("config-unreadable", path=args.config), file=sys.stderr)
        return None
    named = {r.get("name"): r for r in routes if isinstance(r, dict)}
    route = named.get(args.route)
    if route is None:
        names = ", ".join(str(name) for name in named)
        print(say("unknown-route", name=args.route, names=names), file=sys.stderr)
        return None
    policies = data.get("policies")
    folder = policies.get("dir") if isinstance(policies, dict) else None
    if not isinstance(folder, str):
        print(say("config-no-policies", path=args.config), file=sys.stderr)
        return None
    # As in the gateway: `public: true` is the accept policy; no policy at all means nobody.
    name = "accept" if route.get("public") is True else str(route.get("policy") or "reject")
    print(say("route-uses", route=args.route, policy=name), file=sys.stderr)
    return (args.config.parent / folder).resolve(), name


def _who_can(loaded: LoadedDirectory, name: str, as_json: bool, out: TextIO) -> int:
    policy = loaded.policy_set.policy(name)
    if policy is None:
        names = ", ".join(loaded.policy_set.names())
        print(say("unknown-policy", name=name, names=names), file=sys.stderr)
        return USAGE
    if as_json:
        print(json.dumps(who_can_json(policy), ensure_ascii=False, indent=2), file=out)
    else:
        print(who_can_text(policy), file=out)
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
