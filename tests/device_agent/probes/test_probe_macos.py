"""macOS probes: parsers against Apple's documented outputs, and whole Macs replayed."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from probe_replay import Answer, ReplayRunner, fixture

from device_agent.probes.macos import (
    INSTALL_HISTORY,
    SOCKETFILTERFW,
    SOFTWARE_UPDATE_PLIST,
    last_software_update,
    macos_prober,
    macos_screen_lock,
    parse_csrutil_status,
    parse_defaults_bool,
    parse_defaults_number,
    parse_fdesetup_status,
    parse_pmset_displaysleep,
    parse_socketfilterfw_state,
    parse_sw_vers,
    parse_sysadminctl_screenlock,
    sw_vers_facts,
)
from device_agent.report import PostureFacts

M = "macos/"
SCREENSAVER = "com.apple.screensaver"


def test_filevault_status() -> None:
    """FileVault On is encrypted; Off, deferred, or still encrypting is not; noise is unknown."""
    assert parse_fdesetup_status(fixture(M + "fdesetup-on.txt")) is True
    assert parse_fdesetup_status(fixture(M + "fdesetup-off.txt")) is False
    assert parse_fdesetup_status(fixture(M + "fdesetup-deferred.txt")) is False
    assert parse_fdesetup_status(fixture(M + "fdesetup-encrypting.txt")) is False
    assert parse_fdesetup_status("") is None
    assert parse_fdesetup_status("Error: unable to determine status") is None


def test_application_firewall_state() -> None:
    """State 1 and 2 are on, 0 is off; unexpected text is unknown."""
    assert parse_socketfilterfw_state(fixture(M + "socketfilterfw-enabled.txt")) is True
    assert parse_socketfilterfw_state(fixture(M + "socketfilterfw-block-all.txt")) is True
    assert parse_socketfilterfw_state(fixture(M + "socketfilterfw-disabled.txt")) is False
    assert parse_socketfilterfw_state("") is None


def test_sw_vers() -> None:
    """ProductVersion is os_version; the name carries product, version and build."""
    assert sw_vers_facts(parse_sw_vers(fixture(M + "sw_vers-sonoma.txt"))) == PostureFacts(
        os_version="14.5", os_name="macOS 14.5 (23F79)"
    )
    catalina = sw_vers_facts(parse_sw_vers(fixture(M + "sw_vers-catalina.txt")))
    assert catalina.os_version == "10.15.7"
    assert catalina.os_name == "Mac OS X 10.15.7 (19H2026)"
    assert sw_vers_facts(parse_sw_vers("garbage")) == PostureFacts()


def test_screen_lock_setting() -> None:
    """sysadminctl's stderr line gives the password delay; off (or -1 s) is no lock."""
    assert parse_sysadminctl_screenlock(fixture(M + "sysadminctl-screenlock-immediate.stderr")) == (
        True,
        0,
    )
    assert parse_sysadminctl_screenlock(fixture(M + "sysadminctl-screenlock-300.stderr")) == (
        True,
        300,
    )
    assert parse_sysadminctl_screenlock(fixture(M + "sysadminctl-screenlock-off.stderr")) == (
        False,
        None,
    )
    assert parse_sysadminctl_screenlock(fixture(M + "sysadminctl-screenlock-minus1.stderr")) == (
        False,
        None,
    )
    assert parse_sysadminctl_screenlock("sysadminctl: unknown option") == (None, None)


def test_defaults_and_pmset_values() -> None:
    """defaults prints numbers and 1/0 booleans; pmset gives display sleep in minutes."""
    assert parse_defaults_bool(fixture(M + "defaults-askForPassword-1.txt")) is True
    assert parse_defaults_number(fixture(M + "defaults-askForPasswordDelay-5.txt")) == 5
    assert parse_defaults_number(fixture(M + "defaults-idleTime-1200.txt")) == 1200
    assert parse_defaults_number("300.0") == 300
    assert parse_defaults_number(fixture(M + "defaults-missing.stderr")) is None
    assert parse_defaults_bool(fixture(M + "defaults-missing.stderr")) is None
    assert parse_pmset_displaysleep(fixture(M + "pmset-g.txt")) == 10
    assert parse_pmset_displaysleep(fixture(M + "pmset-g-never.txt")) == 0
    assert parse_pmset_displaysleep("") is None


def test_screen_lock_rules() -> None:
    """The lock comes at the earlier of screen saver and display sleep, plus the delay."""
    assert macos_screen_lock(True, 0, 1200, 10) == (True, 600)
    assert macos_screen_lock(True, 5, 300, 10) == (True, 305)
    assert macos_screen_lock(False, None, 1200, 10) == (False, None)
    assert macos_screen_lock(True, 0, 0, 0) == (False, None)  # nothing ever starts
    assert macos_screen_lock(True, 0, None, 10) == (True, None)  # unread screen saver time
    assert macos_screen_lock(True, 0, None, None) == (None, None)
    assert macos_screen_lock(None, None, 1200, 10) == (None, None)


def test_sip_status() -> None:
    """Only a plainly enabled SIP counts; disabled and custom configurations do not."""
    assert parse_csrutil_status(fixture(M + "csrutil-enabled.txt")) is True
    assert parse_csrutil_status(fixture(M + "csrutil-disabled.txt")) is False
    assert parse_csrutil_status(fixture(M + "csrutil-custom.txt")) is False
    assert parse_csrutil_status("csrutil: command not allowed") is None


def test_install_history() -> None:
    """The newest softwareupdated install counts; App Store installs and broken files do not."""
    data = (Path(__file__).parent / "fixtures" / M / "InstallHistory.plist").read_bytes()
    assert last_software_update(data) == datetime(2024, 5, 14, 0, 21, 5, tzinfo=UTC)
    assert last_software_update(b"not a plist") is None
    assert last_software_update(b"") is None


def _answers(**overrides: Answer) -> dict[tuple[str, ...], Answer]:
    """A healthy Sonoma Mac; keyword overrides replace single answers by short name."""
    answers = {
        "sw_vers": (("sw_vers",), Answer(fixture(M + "sw_vers-sonoma.txt"))),
        "uname": (("uname", "-r"), Answer(fixture(M + "uname-r.txt"))),
        "fdesetup": (("fdesetup", "status"), Answer(fixture(M + "fdesetup-on.txt"))),
        "firewall": (
            (SOCKETFILTERFW, "--getglobalstate"),
            Answer(fixture(M + "socketfilterfw-enabled.txt")),
        ),
        "sysadminctl": (
            ("sysadminctl", "-screenLock", "status"),
            Answer("", fixture(M + "sysadminctl-screenlock-immediate.stderr")),
        ),
        "idle": (
            ("defaults", "-currentHost", "read", SCREENSAVER, "idleTime"),
            Answer(fixture(M + "defaults-idleTime-1200.txt")),
        ),
        "pmset": (("pmset", "-g"), Answer(fixture(M + "pmset-g.txt"))),
        "csrutil": (("csrutil", "status"), Answer(fixture(M + "csrutil-enabled.txt"))),
        "update": (
            ("defaults", "read", SOFTWARE_UPDATE_PLIST, "AutomaticallyInstallMacOSUpdates"),
            Answer(fixture(M + "defaults-AutomaticallyInstallMacOSUpdates-1.txt")),
        ),
    }
    result = dict(answers.values())
    for name, answer in overrides.items():
        result[answers[name][0]] = answer
    return result


def _root_with_history(tmp_path: Path) -> Path:
    target = tmp_path / INSTALL_HISTORY.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(
        (Path(__file__).parent / "fixtures" / M / "InstallHistory.plist").read_bytes()
    )
    return tmp_path


def test_replayed_healthy_mac(tmp_path: Path) -> None:
    """A healthy Mac's documented outputs give every macOS fact."""
    runner = ReplayRunner(_answers())
    facts = macos_prober(runner=runner, root=_root_with_history(tmp_path)).collect(10)
    last = datetime(2024, 5, 14, 0, 21, 5, tzinfo=UTC).timestamp()
    assert facts == PostureFacts(
        os="macos",
        os_version="14.5",
        os_name="macOS 14.5 (23F79)",
        kernel="23.5.0",
        disk_encrypted=True,
        firewall=True,
        screen_lock=True,
        screen_lock_timeout=600,
        auto_update=True,
        patch_age_days=int((time.time() - last) // 86400),
        system_integrity=True,
    )


def test_replayed_neglected_mac(tmp_path: Path) -> None:
    """FileVault off, firewall off, lock off, SIP custom, updates off: all False, not unknown;
    the older askForPassword keys answer when sysadminctl gives nothing."""
    runner = ReplayRunner(
        _answers(
            fdesetup=Answer(fixture(M + "fdesetup-off.txt")),
            firewall=Answer(fixture(M + "socketfilterfw-disabled.txt")),
            sysadminctl=Answer("", "", 1),
            csrutil=Answer(fixture(M + "csrutil-custom.txt")),
            update=Answer(fixture(M + "defaults-AutomaticallyInstallMacOSUpdates-0.txt")),
        )
        | {
            ("defaults", "read", SCREENSAVER, "askForPassword"): Answer("0\n"),
        }
    )
    facts = macos_prober(runner=runner, root=tmp_path).collect(10)
    assert facts.disk_encrypted is False
    assert facts.firewall is False
    assert (facts.screen_lock, facts.screen_lock_timeout) == (False, None)
    assert facts.system_integrity is False
    assert facts.auto_update is False
    assert facts.patch_age_days is None  # no install history under this root


def test_replayed_mac_with_nothing_readable(tmp_path: Path) -> None:
    """Missing or failing commands (defaults' missing key, exit 1) leave facts unknown."""
    missing = Answer("", fixture(M + "defaults-missing.stderr"), 1)
    runner = ReplayRunner(
        {("defaults", "read", SOFTWARE_UPDATE_PLIST, "AutomaticallyInstallMacOSUpdates"): missing}
    )
    assert macos_prober(runner=runner, root=tmp_path).collect(10) == PostureFacts(os="macos")
