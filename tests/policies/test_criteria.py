"""Every criterion and operator, as a table: YAML policy and request facts in, decision out.

The table lives in criteria_table/ (policies.yaml + tests.yaml) so it reads like IT's own tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import NOW

from policies.cases import Case, compile_cases, run_case
from policies.criteria import REGISTRY
from policies.loader import load_directory

TABLE = Path(__file__).parent / "criteria_table"
_LOADED = load_directory(TABLE)
_CASES, _ERRORS = compile_cases(_LOADED.cases, _LOADED.policy_set, NOW)


def test_the_table_itself_is_valid() -> None:
    """The table's cases all parse (no unknown facts, policies or reason codes)."""
    assert _ERRORS == []
    assert len(_CASES) > 100


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_case(case: Case) -> None:
    """The case's request gets exactly the decision, rule and reasons the table expects."""
    result = run_case(case, _LOADED.policy_set)
    assert result.problems == ()


def test_every_criterion_is_in_the_table() -> None:
    """Each criterion of the registry is exercised by at least one policy of the table."""
    text = (TABLE / "policies.yaml").read_text(encoding="utf-8")
    missing = [name for name in REGISTRY if f"{name}:" not in text]
    assert missing == []
