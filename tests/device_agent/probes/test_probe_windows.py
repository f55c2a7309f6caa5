"""Windows probes: parsers against Microsoft's documented outputs, and whole PCs replayed."""

from __future__ import annotations

import time
from datetime import datetime

from probe_replay import Answer, ReplayRunner, fixture

from device_agent.probes.windows import (
    BITLOCKER_SCRIPT,
    DEFENDER_SCRIPT,
    DESKTOP_KEY,
    DESKTOP_POLICY_KEY,
    FIREWALL_SCRIPT,
    HOTFIX_SCRIPT,
    SYSTEM_POLICY_KEY,
    parse_bitlocker_protection,
    parse_defender,
    parse_firewall_profiles,
    parse_format_list,
    parse_iso_date,
    parse_manage_bde,
    parse_netsh_allprofiles,
    parse_reg_query,
    parse_ver,
    powershell,
    windows_prober,
    windows_screen_lock,
)
from device_agent.report import PostureFacts

W = "windows/"
NOT_FOUND = Answer("", fixture(W + "reg-not-found.stderr"), 1)


def test_ver() -> None:
    """`ver` gives the build (os_version), the full version with revision, and its line."""
    assert parse_ver(fixture(W + "ver-win11.txt")) == (
        "10.0.22631",
        "10.0.22631.3880",
        "Microsoft Windows [Version 10.0.22631.3880]",
    )
    assert parse_ver(fixture(W + "ver-win10.txt")) == (
        "10.0.19045",
        "10.0.19045.4529",
        "Microsoft Windows [Version 10.0.19045.4529]",
    )
    assert parse_ver("") is None
    assert parse_ver("'ver' is not recognized") is None


def test_bitlocker_shell_property() -> None:
    """Only protection on (1, 6) is encrypted; off and suspended are not; empty is unknown."""
    assert parse_bitlocker_protection(fixture(W + "bitlocker-protection-1.txt")) is True
    assert parse_bitlocker_protection(fixture(W + "bitlocker-protection-2.txt")) is False
    assert parse_bitlocker_protection(fixture(W + "bitlocker-protection-5.txt")) is False
    assert parse_bitlocker_protection(fixture(W + "bitlocker-protection-empty.txt")) is None
    assert parse_bitlocker_protection("7") is None


def test_manage_bde() -> None:
    """Protection On with the volume encrypted counts; off or still encrypting does not;
    the access-denied answer a standard user gets is unknown."""
    assert parse_manage_bde(fixture(W + "manage-bde-status-on.txt")) is True
    assert parse_manage_bde(fixture(W + "manage-bde-status-off.txt")) is False
    assert parse_manage_bde(fixture(W + "manage-bde-status-encrypting.txt")) is False
    assert parse_manage_bde(fixture(W + "manage-bde-status-denied.txt")) is None


def test_firewall_profiles() -> None:
    """All three profiles on is a firewall; one off is not; missing profiles are unknown."""
    assert parse_firewall_profiles(fixture(W + "netfirewallprofile-all-on.txt")) is True
    assert parse_firewall_profiles(fixture(W + "netfirewallprofile-private-off.txt")) is False
    assert parse_firewall_profiles("Name    : Domain\r\nEnabled : True\r\n") is None
    assert parse_netsh_allprofiles(fixture(W + "netsh-allprofiles-on.txt")) is True
    assert parse_netsh_allprofiles(fixture(W + "netsh-allprofiles-public-off.txt")) is False
    assert parse_netsh_allprofiles("The following command was not found") is None


def test_format_list_records() -> None:
    """Format-List output splits into records at blank lines, CRLF or not."""
    records = parse_format_list(fixture(W + "netfirewallprofile-all-on.txt"))
    assert [record["Name"] for record in records] == ["Domain", "Private", "Public"]


def test_registry_values() -> None:
    """reg query values by name; DWORDs as decimal; other keys' headers ignored."""
    desktop = parse_reg_query(fixture(W + "reg-desktop.txt"))
    assert desktop["ScreenSaveActive"] == "1"
    assert desktop["ScreenSaveTimeOut"] == "600"
    assert desktop["CaretTimeout"] == "5000"
    assert desktop["SCRNSAVE.EXE"] == r"C:\Windows\system32\scrnsave.scr"
    assert desktop["Pattern Upgrade"] == "TRUE"
    assert parse_reg_query(fixture(W + "reg-inactivity-900.txt")) == {
        "InactivityTimeoutSecs": "900"
    }
    assert parse_reg_query(fixture(W + "reg-not-found.stderr")) == {}


def test_screen_lock_rules() -> None:
    """A secure screen saver or the inactivity limit locks, whichever is earlier; policy wins."""
    user = parse_reg_query(fixture(W + "reg-desktop.txt"))
    insecure = parse_reg_query(fixture(W + "reg-desktop-insecure.txt"))
    policy = parse_reg_query(fixture(W + "reg-desktop-policy.txt"))
    assert windows_screen_lock(user, {}, 0) == (True, 600)
    assert windows_screen_lock(user, policy, 0) == (True, 300)
    assert windows_screen_lock(user, {}, 900) == (True, 600)
    assert windows_screen_lock(insecure, {}, 0) == (False, None)
    assert windows_screen_lock(insecure, {}, 900) == (True, 900)
    assert windows_screen_lock(insecure, policy, 0) == (True, 300)
    assert windows_screen_lock(insecure, {}, None) == (None, None)
    assert windows_screen_lock(None, {}, 0) == (None, None)


def test_defender_and_hotfix_date() -> None:
    """Defender protects only with service, antivirus and real-time protection all on."""
    assert parse_defender(fixture(W + "mpcomputerstatus-on.txt")) is True
    assert parse_defender(fixture(W + "mpcomputerstatus-realtime-off.txt")) is False
    assert parse_defender("") is None
    assert parse_defender("AntivirusEnabled : True\r\n") is None
    assert parse_iso_date(fixture(W + "hotfix-latest.txt")) == datetime(2024, 7, 10)
    assert parse_iso_date("10/07/2024") is None


def _reg(*argv: str) -> tuple[str, ...]:
    return ("reg", "query", *argv)


def test_replayed_healthy_pc() -> None:
    """A managed Windows 11 PC's outputs give every Windows fact, in language-free forms."""
    runner = ReplayRunner(
        {
            ("cmd", "/c", "ver"): Answer(fixture(W + "ver-win11.txt")),
            powershell(BITLOCKER_SCRIPT): Answer(fixture(W + "bitlocker-protection-1.txt")),
            powershell(FIREWALL_SCRIPT): Answer(fixture(W + "netfirewallprofile-all-on.txt")),
            _reg(DESKTOP_KEY): Answer(fixture(W + "reg-desktop.txt")),
            _reg(DESKTOP_POLICY_KEY): Answer(fixture(W + "reg-desktop-policy.txt")),
            _reg(SYSTEM_POLICY_KEY, "/v", "InactivityTimeoutSecs"): Answer(
                fixture(W + "reg-inactivity-900.txt")
            ),
            powershell(DEFENDER_SCRIPT): Answer(fixture(W + "mpcomputerstatus-on.txt")),
            powershell(HOTFIX_SCRIPT): Answer(fixture(W + "hotfix-latest.txt")),
        }
    )
    facts = windows_prober(runner=runner, environ={"SystemDrive": "C:"}).collect(10)
    assert not runner.ran("manage-bde")
    assert not runner.ran("netsh")
    assert facts == PostureFacts(
        os="windows",
        os_version="10.0.22631",
        os_name="Microsoft Windows [Version 10.0.22631.3880]",
        kernel="10.0.22631.3880",
        disk_encrypted=True,
        firewall=True,
        screen_lock=True,
        screen_lock_timeout=300,
        antivirus=True,
        patch_age_days=int((time.time() - datetime(2024, 7, 10).timestamp()) // 86400),
    )


def test_replayed_pc_without_powershell_answers_falls_back() -> None:
    """When PowerShell gives nothing, manage-bde and netsh answer (English output); a standard
    user's manage-bde refusal leaves the disk unknown."""
    runner = ReplayRunner(
        {
            ("manage-bde", "-status", "D:"): Answer(fixture(W + "manage-bde-status-off.txt")),
            ("netsh", "advfirewall", "show", "allprofiles", "state"): Answer(
                fixture(W + "netsh-allprofiles-public-off.txt")
            ),
            _reg(DESKTOP_KEY): Answer(fixture(W + "reg-desktop-insecure.txt")),
            _reg(DESKTOP_POLICY_KEY): NOT_FOUND,
            _reg(SYSTEM_POLICY_KEY, "/v", "InactivityTimeoutSecs"): NOT_FOUND,
        }
    )
    facts = windows_prober(runner=runner, environ={"SystemDrive": "D:"}).collect(10)
    assert facts == PostureFacts(
        os="windows", disk_encrypted=False, firewall=False, screen_lock=False
    )
    denied = ReplayRunner(
        {
            ("manage-bde", "-status", "C:"): Answer(
                fixture(W + "manage-bde-status-denied.txt"), "", 0
            )
        }
    )
    assert windows_prober(runner=denied, environ={}).collect(10).disk_encrypted is None
