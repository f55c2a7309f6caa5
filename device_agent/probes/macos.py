"""macOS posture: FileVault, application firewall, sw_vers, screen lock, SIP, updates.

Every command here works for a standard (non-admin) user. What each fact means:
- disk_encrypted: `fdesetup status` says "FileVault is On." and no encryption or decryption is
  still in progress (a half-encrypted disk is not yet protected).
- firewall: the application firewall's global state (`socketfilterfw --getglobalstate`) is 1
  (on) or 2 (block all incoming).
- screen_lock: a password is required after the screen saver or display sleep
  (`sysadminctl -screenLock status`, else the older com.apple.screensaver askForPassword keys)
  and something starts after inactivity: the screen saver (`idleTime`) or display sleep
  (`pmset -g` displaysleep, minutes). The timeout is the earlier of the two plus the delay.
- system_integrity: `csrutil status` "enabled." only; a custom configuration (some protections
  off) counts as False.
- auto_update: AutomaticallyInstallMacOSUpdates in /Library/Preferences/com.apple.SoftwareUpdate.
- patch_age_days: the newest install by `softwareupdated` in
  /Library/Receipts/InstallHistory.plist (macOS updates and security responses).
"""

from __future__ import annotations

import plistlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from device_agent.probes.base import (
    PlatformProber,
    ProbeContext,
    Runner,
    clean_text,
    days_since,
    run_command,
)
from device_agent.report import PostureFacts

SOCKETFILTERFW: Final = "/usr/libexec/ApplicationFirewall/socketfilterfw"
SOFTWARE_UPDATE_PLIST: Final = "/Library/Preferences/com.apple.SoftwareUpdate"
INSTALL_HISTORY: Final = "/Library/Receipts/InstallHistory.plist"


def parse_fdesetup_status(text: str) -> bool | None:
    """`fdesetup status`: "FileVault is On." / "FileVault is Off.", perhaps followed by
    "Encryption in progress: …" or "Decryption in progress: …" (then not yet protected)."""
    if re.search(r"^(Encryption|Decryption) in progress", text, re.MULTILINE):
        return False
    match = re.search(r"^FileVault is (On|Off)\.", text, re.MULTILINE)
    return None if match is None else match.group(1) == "On"


def parse_socketfilterfw_state(text: str) -> bool | None:
    """`socketfilterfw --getglobalstate`: "Firewall is enabled. (State = 1)"; 0 is off,
    2 blocks all incoming connections."""
    match = re.search(r"\(State = (\d+)\)", text)
    if match is not None:
        return int(match.group(1)) in {1, 2}
    match = re.search(r"Firewall is (enabled|disabled)", text)
    return None if match is None else match.group(1) == "enabled"


def parse_sw_vers(text: str) -> dict[str, str]:
    """`sw_vers`: "ProductName:\\tmacOS", "ProductVersion:\\t14.5", "BuildVersion:\\t23F79"."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip():
            fields[key.strip()] = value.strip()
    return fields


def sw_vers_facts(fields: Mapping[str, str]) -> PostureFacts:
    version = fields.get("ProductVersion")
    name = " ".join(
        part
        for part in (
            fields.get("ProductName"),
            version,
            f"({fields['BuildVersion']})" if "BuildVersion" in fields else None,
        )
        if part
    )
    return PostureFacts(
        os_version=clean_text(version), os_name=clean_text(name) if version else None
    )


def parse_sysadminctl_screenlock(text: str) -> tuple[bool | None, int | None]:
    """`sysadminctl -screenLock status` (it logs to stderr): "screenLock delay is immediate",
    "screenLock delay is 300 seconds" or "screenLock is off" (some releases say "delay is -1
    seconds" for off) → (enabled, delay seconds)."""
    if re.search(r"screenLock is off", text):
        return False, None
    if re.search(r"screenLock delay is immediate", text):
        return True, 0
    match = re.search(r"screenLock delay is (-?\d+)(?:\.\d+)? seconds?", text)
    if match is None:
        return None, None
    delay = int(match.group(1))
    return (False, None) if delay < 0 else (True, delay)


def parse_defaults_number(text: str) -> int | None:
    """`defaults read DOMAIN KEY` of a number: "300" (an integer) or "300.0" (a real)."""
    match = re.fullmatch(r"(\d+)(?:\.\d+)?", text.strip())
    return None if match is None else int(match.group(1))


def parse_defaults_bool(text: str) -> bool | None:
    """`defaults read` of a boolean prints 1 or 0."""
    return {"1": True, "0": False}.get(text.strip())


def parse_pmset_displaysleep(text: str) -> int | None:
    """`pmset -g`: " displaysleep         10" (minutes of inactivity; 0 = never)."""
    match = re.search(r"^\s*displaysleep\s+(\d+)", text, re.MULTILINE)
    return None if match is None else int(match.group(1))


def macos_screen_lock(
    lock: bool | None, delay: int | None, idle_time: int | None, display_sleep_minutes: int | None
) -> tuple[bool | None, int | None]:
    """Locked after the earliest of screen saver and display sleep, plus the password delay."""
    triggers = [t for t in (idle_time, (display_sleep_minutes or 0) * 60) if t]
    never = idle_time == 0 and display_sleep_minutes == 0
    if lock is False or never:
        return False, None
    if lock is None or not triggers:
        return None, None
    if idle_time is None or display_sleep_minutes is None or delay is None:
        return True, None  # locks, but an unread trigger might come earlier
    return True, min(triggers) + delay


def parse_csrutil_status(text: str) -> bool | None:
    """`csrutil status`: "System Integrity Protection status: enabled." / "disabled." /
    "unknown (Custom Configuration)." (some protections off: False)."""
    match = re.search(r"System Integrity Protection status: ([^\n]*)", text)
    if match is None:
        return None
    status = match.group(1).strip()
    if status == "enabled.":
        return True
    if status.startswith(("disabled", "unknown (Custom Configuration)", "enabled (Custom")):
        return False
    return None


def last_software_update(data: bytes) -> datetime | None:
    """The newest `softwareupdated` install in InstallHistory.plist (dates are UTC)."""
    try:
        history = plistlib.loads(data)
    except (plistlib.InvalidFileException, ValueError, TypeError, KeyError):
        return None
    if not isinstance(history, list):
        return None
    dates = [
        entry["date"].replace(tzinfo=UTC)
        for entry in history
        if isinstance(entry, dict)
        and entry.get("processName") == "softwareupdated"
        and isinstance(entry.get("date"), datetime)
    ]
    return max(dates) if dates else None


def probe_sw_vers(context: ProbeContext) -> PostureFacts:
    text = context.output("sw_vers")
    kernel = context.output("uname", "-r")
    facts = sw_vers_facts(parse_sw_vers(text)) if text is not None else PostureFacts()
    return PostureFacts(
        os_version=facts.os_version,
        os_name=facts.os_name,
        kernel=clean_text(kernel) if kernel is not None else None,
    )


def probe_filevault(context: ProbeContext) -> PostureFacts:
    text = context.output("fdesetup", "status")
    return PostureFacts(disk_encrypted=parse_fdesetup_status(text) if text is not None else None)


def probe_firewall(context: ProbeContext) -> PostureFacts:
    text = context.output(SOCKETFILTERFW, "--getglobalstate")
    return PostureFacts(firewall=parse_socketfilterfw_state(text) if text is not None else None)


def _lock_setting(context: ProbeContext) -> tuple[bool | None, int | None]:
    result = context.run("sysadminctl", "-screenLock", "status")
    if result is not None and result.ok:
        lock, delay = parse_sysadminctl_screenlock(result.stdout + result.stderr)
        if lock is not None:
            return lock, delay
    asks = context.output("defaults", "read", "com.apple.screensaver", "askForPassword")
    wait = context.output("defaults", "read", "com.apple.screensaver", "askForPasswordDelay")
    lock = parse_defaults_bool(asks) if asks is not None else None
    return lock, parse_defaults_number(wait) if wait is not None and lock else None


def probe_screen_lock(context: ProbeContext) -> PostureFacts:
    lock, delay = _lock_setting(context)
    idle = context.output("defaults", "-currentHost", "read", "com.apple.screensaver", "idleTime")
    pmset = context.output("pmset", "-g")
    enabled, timeout = macos_screen_lock(
        lock,
        delay,
        parse_defaults_number(idle) if idle is not None else None,
        parse_pmset_displaysleep(pmset) if pmset is not None else None,
    )
    return PostureFacts(screen_lock=enabled, screen_lock_timeout=timeout)


def probe_sip(context: ProbeContext) -> PostureFacts:
    text = context.output("csrutil", "status")
    return PostureFacts(system_integrity=parse_csrutil_status(text) if text is not None else None)


def probe_auto_update(context: ProbeContext) -> PostureFacts:
    key = "AutomaticallyInstallMacOSUpdates"
    text = context.output("defaults", "read", SOFTWARE_UPDATE_PLIST, key)
    return PostureFacts(auto_update=parse_defaults_bool(text) if text is not None else None)


def probe_patch_age(context: ProbeContext) -> PostureFacts:
    data = context.read_bytes(INSTALL_HISTORY, limit=16 * 1024 * 1024)
    last = last_software_update(data) if data is not None else None
    age = None if last is None else days_since(last.timestamp(), context.now)
    return PostureFacts(patch_age_days=age)


PROBES: Final = (
    probe_sw_vers,
    probe_filevault,
    probe_firewall,
    probe_screen_lock,
    probe_sip,
    probe_auto_update,
    probe_patch_age,
)


def macos_prober(
    *,
    runner: Runner = run_command,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
) -> PlatformProber:
    """The macOS probes; tests inject a runner replaying documented outputs."""
    return PlatformProber("macos", PROBES, runner=runner, root=root, environ=environ, is_root=False)
