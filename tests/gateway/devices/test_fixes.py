"""DeviceAdvisor: the device-* reasons the routes' policies give a device for its owner (YAML
policy in → reasons out), and their titles and fixes from the catalogue in ja and en."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from device_agent.report import PostureFacts
from gateway.decide import PolicyHolder
from gateway.devices.fixes import DeviceAdvisor, PolicyTarget
from gateway.devices.model import DeviceRecord
from gateway.web.catalogue import load_catalogue
from policies.loader import load_policy_dir

NOW = 1_790_000_000.0
GOOD = PostureFacts(os="linux", disk_encrypted=True, firewall=True, auto_update=True)
STAFF = """
policies:
  - name: wiki
    allow:
      - name: admins-anywhere
        group: it-admins
      - name: staff-on-good-device
        all:
          - group: staff
          - device:
              approved: true
              posture: {disk_encrypted: true, firewall: true, max_age: 1h}
"""


def make_record(**changes: Any) -> DeviceRecord:
    fields: dict[str, Any] = {
        "id": "dev-1",
        "owner_issuer": "https://idp.town.example",
        "owner_subject": "u-sato",
        "owner_email": "sato@town.example",
        "key_thumbprint": "t",
        "public_key_pem": "",
        "key_storage": "software",
        "status": "approved",
        "created_at": NOW - 86400,
        "posture": GOOD,
        "posture_at": NOW - 60,
    }
    fields.update(changes)
    return DeviceRecord(**fields)


def advisor(tmp_path: Path, policies: str = STAFF, *targets: PolicyTarget) -> DeviceAdvisor:
    (tmp_path / "policies.yaml").write_text(policies, encoding="utf-8")
    return DeviceAdvisor(
        holder=PolicyHolder(load_policy_dir(tmp_path)),
        targets=list(targets) or [PolicyTarget("wiki", "wiki.town.example", "wiki")],
        catalogue=load_catalogue(),
        clock=lambda: NOW,
    )


def test_a_compliant_device_has_nothing_to_fix(tmp_path: Path) -> None:
    """A device meeting the device criteria gets no reasons, though the owner's groups are
    unknown to the registry."""
    assert advisor(tmp_path).reasons(make_record()) == ()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"posture": PostureFacts(disk_encrypted=False, firewall=True)},
            ("device-disk-unencrypted",),
        ),
        (
            {"posture": PostureFacts(disk_encrypted=False, firewall=False)},
            ("device-disk-unencrypted", "device-firewall-off"),
        ),
        ({"posture": PostureFacts(firewall=True)}, ("device-posture-unknown",)),
        ({"posture": None, "posture_at": None}, ("device-posture-unknown",)),
        ({"posture_at": NOW - 7200}, ("device-posture-stale",)),
        ({"status": "pending"}, ("device-not-approved",)),
        ({"status": "revoked"}, ("device-revoked",)),
    ],
)
def test_the_device_reasons_of_the_staff_rule(
    tmp_path: Path, changes: dict[str, Any], expected: tuple[str, ...]
) -> None:
    """Each failing device fact gives its reason, in priority order, and only device-* ones."""
    assert advisor(tmp_path).reasons(make_record(**changes)) == expected


def test_meeting_one_rules_device_criteria_is_enough(tmp_path: Path) -> None:
    """With two rules (TPM key, or encrypted disk), meeting either needs no fix; failing both
    gives the reasons of the rule that is closest."""
    policies = """
policies:
  - name: wiki
    allow:
      - name: hardware-key
        device: {key_storage: [tpm]}
      - name: encrypted-laptop
        device: {posture: {disk_encrypted: true, firewall: true}}
"""
    advice = advisor(tmp_path, policies)
    assert advice.reasons(make_record()) == ()
    bad = PostureFacts(disk_encrypted=False, firewall=False)
    assert advice.reasons(make_record(posture=bad)) == ("device-key-storage-weak",)


def test_a_deny_rule_on_the_device_is_reported(tmp_path: Path) -> None:
    """A deny rule that fires on a device fact gives its reason too."""
    policies = """
policies:
  - name: wiki
    deny:
      - name: updates-required
        none:
          - device: {posture: {auto_update: true}}
    allow:
      - name: anyone
        authenticated: true
"""
    advice = advisor(tmp_path, policies)
    assert advice.reasons(make_record()) == ()
    off = PostureFacts(disk_encrypted=True, firewall=True, auto_update=False)
    assert advice.reasons(make_record(posture=off)) == ("device-auto-update-off",)


def test_a_device_criterion_that_must_not_hold_is_no_fix(tmp_path: Path) -> None:
    """Under `none:` a failing device criterion is what the rule wants: nothing to fix."""
    policies = """
policies:
  - name: wiki
    allow:
      - name: not-kiosks
        all:
          - authenticated: true
          - none:
              - device: {tags: [kiosk]}
"""
    assert advisor(tmp_path, policies).reasons(make_record()) == ()


def test_policies_without_device_rules_or_unknown_give_nothing(tmp_path: Path) -> None:
    """A policy that never looks at devices, or one that does not exist, adds no reasons."""
    policies = """
policies:
  - name: staff-only
    allow:
      group: staff
"""
    advice = advisor(
        tmp_path,
        policies,
        PolicyTarget("a", "a.example", "staff-only"),
        PolicyTarget("b", "b.example", "no-such-policy"),
    )
    assert advice.reasons(make_record(status="pending")) == ()


def test_reasons_from_several_routes_are_merged(tmp_path: Path) -> None:
    """Two routes with different device rules: the union, without duplicates, in priority order."""
    policies = """
policies:
  - name: disk
    allow:
      device: {posture: {disk_encrypted: true}}
  - name: firewall
    allow:
      device: {approved: true, posture: {firewall: true}}
"""
    targets = [
        PolicyTarget("a", "a.example", "firewall"),
        PolicyTarget("b", "b.example", "disk"),
        PolicyTarget("c", "c.example", "disk"),
    ]
    advice = advisor(tmp_path, policies, *targets)
    bad = make_record(status="pending", posture=PostureFacts(disk_encrypted=False, firewall=False))
    assert advice.reasons(bad) == (
        "device-not-approved",
        "device-disk-unencrypted",
        "device-firewall-off",
    )


def test_targets_may_be_read_at_each_call(tmp_path: Path) -> None:
    """A callable target list is read at each evaluation (routes change on reload)."""
    (tmp_path / "policies.yaml").write_text(STAFF, encoding="utf-8")
    current: list[PolicyTarget] = []
    advice = DeviceAdvisor(
        holder=PolicyHolder(load_policy_dir(tmp_path)),
        targets=lambda: current,
        catalogue=load_catalogue(),
        clock=lambda: NOW,
    )
    pending = make_record(status="pending")
    assert advice.reasons(pending) == ()
    current.append(PolicyTarget("wiki", "wiki.town.example", "wiki"))
    assert advice.reasons(pending) == ("device-not-approved",)


def test_fixes_carry_titles_and_fixes_in_both_languages(tmp_path: Path) -> None:
    """Each reason becomes {code, title{ja,en}, fix{ja,en}} from the catalogue."""
    catalogue = load_catalogue()
    [fix] = advisor(tmp_path).fixes(["device-firewall-off"])
    assert fix == {
        "code": "device-firewall-off",
        "title": {
            "ja": catalogue.get("device-firewall-off", "ja").title,
            "en": catalogue.get("device-firewall-off", "en").title,
        },
        "fix": {
            "ja": catalogue.get("device-firewall-off", "ja").fix,
            "en": catalogue.get("device-firewall-off", "en").fix,
        },
    }
    assert "ファイアウォール" in fix["title"]["ja"]  # type: ignore[index]
