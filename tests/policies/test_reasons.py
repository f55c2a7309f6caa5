"""The reason catalogue: stable kebab-case codes, each with a description."""

from __future__ import annotations

import re

from policies.reasons import ALL_REASONS, DESCRIPTIONS, UNKNOWN_FACT, Reason, by_priority


def test_every_code_is_kebab_case_and_described() -> None:
    """Each code is lowercase kebab-case and has a short English description."""
    for reason in ALL_REASONS:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", reason.value)
        assert DESCRIPTIONS[reason]
    assert set(DESCRIPTIONS) == set(Reason)


def test_priority_puts_sign_in_before_device_and_catch_alls_last() -> None:
    """Sorting by priority puts the sign-in reason first and no-rule-matched last."""
    mixed = [Reason.NO_RULE_MATCHED, Reason.DEVICE_UNENROLLED, Reason.USER_UNAUTHENTICATED]
    assert by_priority(mixed) == (
        Reason.USER_UNAUTHENTICATED,
        Reason.DEVICE_UNENROLLED,
        Reason.NO_RULE_MATCHED,
    )


def test_missing_fact_reasons_are_marked() -> None:
    """The reasons that mean "a fact is missing" include sign-in, device and GeoIP."""
    assert {Reason.USER_UNAUTHENTICATED, Reason.DEVICE_UNENROLLED, Reason.COUNTRY_UNKNOWN} <= (
        UNKNOWN_FACT
    )
