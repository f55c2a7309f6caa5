"""The loader: every problem in every file, with file:line:column and a hint, word for word."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import NOW, make_request, make_subject

from policies.engine import evaluate
from policies.loader import load_policy_dir
from policies.yaml_source import SourceErrors


def _errors(tmp_path: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(SourceErrors) as caught:
        load_policy_dir(tmp_path)
    return [str(error).replace(str(tmp_path) + "/", "") for error in caught.value.errors]


BROKEN = """\
lists:
  office: [192.0.2.0/24]
policies:
  - name: x
    allwo: {}
    allow:
      all:
        - gruop: staff
        - source_ip: $ofice
        - mfa: false
        - device: {posture: {os_version: "<= 10", max_age: 15}}
        - country: [NO]
        - group: staff
          mfa: true
        - time: {zone: Asia/Tokio, hours: "25:00-26:00"}
        - path: /admin
        - source_ip: [10.0.0.1/8]
        - time: {dates: {from: 2025-05-01, until: 2025-04-01}}
        - claim: {name: dept, matches: "("}
  - name: x
    allow: {accept: true}
"""


def test_every_error_is_reported_with_place_and_hint(tmp_path: Path) -> None:
    """A file full of mistakes yields each mistake's exact message, place and fix."""
    assert _errors(tmp_path, {"p.yaml": BROKEN}) == [
        "p.yaml:5:5: unknown key 'allwo' in a policy — did you mean 'allow'?",
        "p.yaml:8:11: unknown criterion 'gruop' — did you mean 'group'?",
        "p.yaml:9:22: unknown list '$ofice' — did you mean '$office'?",
        "p.yaml:10:16: 'mfa: false' is not allowed — write 'mfa: true', or put it under 'none:' "
        "to require the opposite",
        "p.yaml:11:42: '<= 10' is not a minimum version — only a minimum can be required: "
        "write '>= 1.2' or just '1.2'",
        "p.yaml:11:60: '15' is not a duration — write a positive number and a unit: "
        "30s, 15m, 2h or 7d",
        "p.yaml:12:21: expected text, found true/false — quote it: YAML reads yes/no/on/off as "
        "true/false",
        "p.yaml:14:11: one criterion per item, found 'group' and 'mfa' — make each its own list "
        "item under 'all:' (every one must hold) or 'any:'",
        "p.yaml:15:24: unknown time zone 'Asia/Tokio' — did you mean 'Asia/Tokyo'?",
        "p.yaml:15:43: '25:00-26:00' is not a range of hours — write '08:30-17:15'",
        "p.yaml:16:17: 'path' needs a mapping: exact, prefix or glob — for example: "
        "path: {prefix: /api}",
        "p.yaml:17:23: '10.0.0.1/8' is not an IP network — did you mean '10.0.0.0/8'?",
        "p.yaml:18:25: 'from' 2025-05-01 is after 'until' 2025-04-01",
        "p.yaml:19:40: '(' is not a valid pattern: missing ), unterminated subpattern at "
        "position 0",
        "p.yaml:20:11: policy 'x' is defined twice — it is already defined at p.yaml:4:11; "
        "rename or remove one",
    ]


def test_errors_across_files_and_yaml_problems(tmp_path: Path) -> None:
    """Duplicate keys, bad YAML, unknown top-level keys and missing allow in several files."""
    assert _errors(
        tmp_path,
        {
            "a.yaml": "policies:\n  - name: a\n    name: b\n    allow: {accept: true}\n",
            "b.yaml": "polices: []\n",
            "c.yaml": "policies: [\n",
            "d.yaml": "policies:\n  - name: d\n    deny: {accept: true}\n",
            "e.yaml": "policies:\n  - {name: accept, allow: {accept: true}}\n",
        },
    ) == [
        "a.yaml:3:5: duplicate key 'name' — it is already set at line 2; keep one",
        "b.yaml:1:1: unknown top-level key 'polices' — did you mean 'policies'?",
        "c.yaml:2:1: invalid YAML: did not find expected node content",
        "d.yaml:2:5: policy 'd' has no 'allow:', so it would deny every request — add an allow "
        "rule, or use the built-in policy 'reject'",
        "e.yaml:2:12: 'accept' is a built-in policy; choose another name",
    ]


def test_lists_travel_windows_and_holidays_are_checked(tmp_path: Path) -> None:
    """Bad list entries, trips and holidays are errors with their places."""
    assert _errors(
        tmp_path,
        {
            "data.yaml": (
                "lists:\n  empty: []\n  nested: [$other]\n"
                "holidays: ['2025-13-01']\n"
                "travel_windows:\n  - {user: a@x.jp, countries: [USA], from: 2025-01-01, "
                "until: 2025-01-02}\n  - {user: b@x.jp, contries: [US]}\n"
            ),
            "p.yaml": "policies:\n  - {name: p, allow: {group: $empty}}\n",
        },
    ) == [
        "data.yaml:2:3: list 'empty' is empty — give it values",
        "data.yaml:3:12: a list cannot refer to another list — write the values out",
        "data.yaml:4:12: '2025-13-01' is not a date — write a list of dates (YYYY-MM-DD), or of "
        "{date: YYYY-MM-DD, name: 祝日名}",
        "data.yaml:6:31: 'countries' are two-letter codes — such as US",
        "data.yaml:7:5: a trip needs 'countries:'",
        "data.yaml:7:5: a trip needs 'from:'",
        "data.yaml:7:5: a trip needs 'until:'",
        "data.yaml:7:20: unknown key 'contries' in a trip — did you mean 'countries'?",
        "p.yaml:2:30: an empty list matches nothing — write at least one value",
    ]


def test_lists_are_shared_across_files(tmp_path: Path) -> None:
    """A list defined in one file can be used by a policy in another."""
    (tmp_path / "lists.yaml").write_text("lists:\n  staff_groups: [staff, 職員]\n")
    (tmp_path / "p.yml").write_text("policies:\n  - {name: p, allow: {group: $staff_groups}}\n")
    policy = load_policy_dir(tmp_path).policy("p")
    assert policy is not None
    request = make_request(subject=make_subject(groups={"職員"}))
    assert evaluate(policy, request, NOW).allowed


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    """A directory without YAML files, or no directory at all, is an error."""
    with pytest.raises(SourceErrors) as empty:
        load_policy_dir(tmp_path)
    assert str(empty.value) == f"{tmp_path}:1:1: no policy files (*.yaml) in this directory"
    with pytest.raises(SourceErrors) as caught:
        load_policy_dir(tmp_path / "missing")
    assert caught.value.errors[0].message == "not a directory"


def test_an_impossible_date_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """YAML's own date parsing failing (month 13) is reported like any other problem."""
    assert _errors(tmp_path, {"h.yaml": "holidays: [2025-13-01]\n"}) == [
        "h.yaml:1:12: invalid YAML: invalid value '2025-13-01' (month must be in 1..12)"
    ]
