"""The shipped example policy sets lint clean and pass their own test cases."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from policies.cases import compile_cases, run_case
from policies.loader import load_directory

EXAMPLES = Path(__file__).parents[2] / "policies" / "examples"


@pytest.mark.parametrize("name", ["minimal", "town"])
def test_example_cases_pass(name: str) -> None:
    """Every test case of the example set decides as it expects."""
    loaded = load_directory(EXAMPLES / name)
    cases, errors = compile_cases(loaded.cases, loaded.policy_set, datetime.now(UTC))
    assert errors == []
    assert cases
    results = [run_case(case, loaded.policy_set) for case in cases]
    failures = [(r.case.name, r.problems) for r in results if not r.passed]
    assert failures == []


def test_town_set_has_the_three_layers_auditors_and_break_glass() -> None:
    """The town set defines the three network layers, the auditors' policy and break-glass."""
    names = load_directory(EXAMPLES / "town").policy_set.names()
    assert {"mynumber", "lgwan", "internet", "audit", "break-glass"} <= set(names)
