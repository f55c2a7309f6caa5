"""`tabiji-policy`: exit codes, text and JSON output of lint, test, explain and who-can."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from policies.cli import MESSAGES, main

TOWN = Path(__file__).parents[2] / "policies" / "examples" / "town"


def run(*argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return its exit code and what it printed."""
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_lint_ok() -> None:
    """A clean directory lints with exit 0 and a one-line summary."""
    code, text = run("lint", str(TOWN))
    assert code == 0
    assert text.startswith(f"ok: 5 policies, 13 test cases in {TOWN} (content hash ")


def test_lint_failure_lists_problems(tmp_path: Path) -> None:
    """A broken directory lints with exit 1, each problem with its place, as text or JSON."""
    (tmp_path / "p.yaml").write_text("policies:\n  - {name: p, allow: {gruop: x}}\n")
    code, text = run("lint", str(tmp_path))
    assert code == 1
    assert text.splitlines() == [
        f"{tmp_path}/p.yaml:2:23: unknown criterion 'gruop' — did you mean 'group'?",
        "1 problem(s) found",
    ]
    code, text = run("lint", str(tmp_path), "--json")
    assert code == 1
    assert json.loads(text)["problems"][0] == {
        "file": f"{tmp_path}/p.yaml",
        "line": 2,
        "column": 23,
        "message": "unknown criterion 'gruop'",
        "hint": "did you mean 'group'?",
    }


def test_lint_checks_test_cases_too(tmp_path: Path) -> None:
    """A test case naming an unknown policy or reason is a lint error."""
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - {name: p, allow: {accept: true}}\n"
        "tests:\n  - {name: t, policy: q, expect: allow}\n"
        "  - {name: u, policy: p, expect: deny, reasons: [grup-missing]}\n"
    )
    code, text = run("lint", str(tmp_path))
    assert code == 1
    assert text.splitlines()[:2] == [
        f"{tmp_path}/p.yaml:4:23: unknown policy 'q'",
        f"{tmp_path}/p.yaml:5:50: unknown reason code 'grup-missing' — did you mean "
        "'group-missing'?",
    ]


def test_test_command_prints_a_table_and_fails_on_a_wrong_case(tmp_path: Path) -> None:
    """`test` exits 0 when every case passes and 1, naming the case, when one fails."""
    code, text = run("test", str(TOWN))
    assert code == 0
    assert text.splitlines()[-1] == "13 passed, 0 failed"
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - {name: p, allow: {group: staff}}\n"
        "tests:\n  - {name: wrong, policy: p, request: {subject: {}}, expect: allow}\n"
    )
    code, text = run("test", str(tmp_path))
    assert code == 1
    assert "FAIL  p                     wrong" in text
    assert text.splitlines()[-1] == "0 passed, 1 failed"
    code, text = run("test", str(tmp_path), "--json")
    assert json.loads(text)["cases"][0]["reasons"] == ["group-missing", "no-rule-matched"]


def test_explain_shows_the_trace(tmp_path: Path) -> None:
    """`explain` decides a facts file and shows each criterion, in text and JSON."""
    facts = tmp_path / "facts.yaml"
    facts.write_text("policy: internet\nsubject: {subject: s1}\n")
    code, text = run("explain", "--policies", str(TOWN), "--request", str(facts))
    assert code == 0
    assert text.splitlines()[:2] == [
        "DENY by policy 'internet'",
        "  reason: device-unenrolled — the request does not come from an enrolled device",
    ]
    assert "[unknown] device: the device is enrolled — device-unenrolled" in text
    code, text = run(
        "explain", "--policies", str(TOWN), "--request", str(facts), "--policy", "accept", "--json"
    )
    assert json.loads(text)["allowed"] is True


def test_who_can_in_plain_words() -> None:
    """`who-can` lists the allow and deny rules of a policy in plain words."""
    code, text = run("who-can", "internet", "--policies", str(TOWN))
    assert code == 0
    assert "  rule 'enrolled-device':" in text
    assert "      - the device is enrolled" in text
    code, text = run("who-can", "audit", "--policies", str(TOWN), "--json")
    assert json.loads(text)["unless_any_deny"][0]["reason"] == "method-not-allowed"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """Unknown commands, missing directories and unknown policies are usage errors."""
    assert run("frobnicate")[0] == 2
    assert run("lint", str(tmp_path / "missing"))[0] == 2
    assert run("who-can", "nope", "--policies", str(TOWN))[0] == 2


def test_help_explains_and_exits_0() -> None:
    """`--help` runs as a console command, describes the tool and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "policies.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert MESSAGES["description"].split(".")[0] in " ".join(result.stdout.split())


def test_who_can_reads_a_gateway_route(tmp_path: Path) -> None:
    """`who-can --config gateway.yaml --route NAME` explains the policy that route uses."""
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "p.yaml").write_text(
        "policies:\n  - name: staff-only\n    allow: {group: staff}\n", encoding="utf-8"
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "public_url: http://gw.example\npolicies: {dir: pol}\nroutes:\n"
        "  - {name: wiki, from: http://wiki.example, to: http://127.0.0.1:9, policy: staff-only}\n"
        "  - {name: open, from: http://open.example, to: http://127.0.0.1:9, public: true}\n",
        encoding="utf-8",
    )
    out = io.StringIO()
    assert main(["who-can", "--config", str(config), "--route", "wiki"], out) == 0
    assert "the user is in group staff" in out.getvalue()
    out = io.StringIO()
    assert main(["who-can", "--config", str(config), "--route", "open", "--json"], out) == 0
    assert json.loads(out.getvalue())["policy"] == "accept"
    assert main(["who-can", "--config", str(config), "--route", "nope"], io.StringIO()) == 2
