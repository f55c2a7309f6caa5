"""TABIJI_AGENT_FACTS_FILE: the test/diagnostic hook that replaces probed facts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from device_agent.probes import FACTS_FILE_ENV, probe_for_platform
from device_agent.probes.overrides import OverridingProber, apply_overrides, read_overrides
from device_agent.report import PostureFacts

PROBED = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=True)


class FixedProber:
    """Always finds the same facts (stands in for a platform's probes)."""

    def collect(self, timeout: float) -> PostureFacts:
        return PROBED


def _prober(path: Path) -> OverridingProber:
    return OverridingProber(FixedProber(), environ={FACTS_FILE_ENV: str(path)})


def test_without_the_variable_facts_pass_through() -> None:
    """Unset, the hook changes nothing."""
    assert OverridingProber(FixedProber(), environ={}).collect(5) == PROBED


def test_file_members_replace_facts_and_null_makes_unknown(tmp_path: Path) -> None:
    """The file's members replace the probed facts; `null` turns a fact unknown; others stay."""
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"disk_encrypted": False, "firewall": None, "patch_age_days": 40}))
    assert _prober(path).collect(5) == PostureFacts(
        os="linux", os_version="12", disk_encrypted=False, patch_age_days=40
    )


def test_the_file_is_read_on_every_collection(tmp_path: Path) -> None:
    """Rewriting the file switches the next collection's answer (how the e2e test flips posture)."""
    path = tmp_path / "facts.json"
    prober = _prober(path)
    path.write_text('{"disk_encrypted": false}')
    assert prober.collect(5).disk_encrypted is False
    path.write_text('{"disk_encrypted": true}')
    assert prober.collect(5).disk_encrypted is True
    path.write_text("{}")
    assert prober.collect(5) == PROBED


def test_a_bad_member_makes_the_facts_it_names_unknown(tmp_path: Path) -> None:
    """A wrongly typed or unknown member fails validation: the facts named become unknown."""
    path = tmp_path / "facts.json"
    path.write_text('{"disk_encrypted": "yes", "os_version": "13", "bogus": 1}')
    facts = _prober(path).collect(5)
    assert facts == PostureFacts(os="linux", firewall=True)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"text"', ""])
def test_a_broken_file_makes_every_fact_unknown(tmp_path: Path, content: str) -> None:
    """A file that is not a JSON object makes every fact unknown, never a crash."""
    path = tmp_path / "facts.json"
    path.write_text(content)
    assert _prober(path).collect(5) == PostureFacts()


def test_a_missing_or_huge_file_makes_every_fact_unknown(tmp_path: Path) -> None:
    """An unreadable or oversized file is as broken as bad JSON."""
    assert _prober(tmp_path / "absent.json").collect(5) == PostureFacts()
    huge = tmp_path / "huge.json"
    huge.write_text('{"os_name": "' + "x" * 100_000 + '"}')
    assert read_overrides(huge) is None
    assert apply_overrides(PROBED, None) == PostureFacts()


def test_an_override_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each collection under an override warns, naming the file."""
    path = tmp_path / "facts.json"
    path.write_text("{}")
    with caplog.at_level(logging.WARNING, logger="device_agent.probes"):
        _prober(path).collect(5)
    assert any(str(path) in record.getMessage() for record in caplog.records)


def test_the_real_prober_honours_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """probe_for_platform's prober applies the file over the real probes of this machine."""
    path = tmp_path / "facts.json"
    path.write_text('{"disk_encrypted": true, "screen_lock": true, "screen_lock_timeout": 300}')
    monkeypatch.setenv(FACTS_FILE_ENV, str(path))
    facts = probe_for_platform("Linux").collect(15)
    assert facts.os == "linux"
    assert facts.kernel is not None
    assert (facts.disk_encrypted, facts.screen_lock, facts.screen_lock_timeout) == (True, True, 300)
    monkeypatch.delenv(FACTS_FILE_ENV)
    assert probe_for_platform("Linux").collect(15).screen_lock is None
