"""Windows posture: BitLocker, Windows Firewall, OS build, screen-lock policy, Defender, updates.

A town hall's laptops run Japanese Windows, whose command-line tools translate their output
(LC_ALL means nothing there). So each fact is first read in a language-independent form —
a number, a PowerShell boolean, a registry value — and the English text of the classic tool is
only the fallback. Nothing here needs administrator rights except manage-bde, which is tried
last and is unknown for a standard user. What each fact means:
- disk_encrypted: the system drive's BitLocker protection is on (Explorer's
  System.Volume.BitLockerProtection: 1 on, 6 on and locked; 2 off, 3 encrypting, 4 decrypting,
  5 suspended, 8 waiting for activation are all False), else `manage-bde -status` (admin).
- firewall: all three profiles (Domain, Private, Public) enabled in the active store.
- screen_lock: the machine inactivity limit (InactivityTimeoutSecs, a security policy) or a
  password-protected screen saver (ScreenSaveActive, ScreenSaverIsSecure, ScreenSaveTimeOut,
  group policy values first). The timeout is the latest the lock can come: the earlier of the two.
- antivirus: Microsoft Defender's service, antivirus and real-time protection all on
  (`Get-MpComputerStatus`); with a third-party antivirus Defender is passive and this is False.
- patch_age_days: the newest hotfix's InstalledOn (`Get-HotFix`).
- auto_update: unknown (Windows Update's pause and policy states are not read yet).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
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

DESKTOP_KEY: Final = r"HKCU\Control Panel\Desktop"
DESKTOP_POLICY_KEY: Final = r"HKCU\Software\Policies\Microsoft\Windows\Control Panel\Desktop"
SYSTEM_POLICY_KEY: Final = r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System"
PROFILES: Final = ("Domain", "Private", "Public")

BITLOCKER_SCRIPT: Final = (
    "(New-Object -ComObject Shell.Application).NameSpace($env:SystemDrive)"
    ".Self.ExtendedProperty('System.Volume.BitLockerProtection')"
)
FIREWALL_SCRIPT: Final = (
    "Get-NetFirewallProfile -PolicyStore ActiveStore | Format-List Name,Enabled"
)
DEFENDER_SCRIPT: Final = (
    "Get-MpComputerStatus | Format-List AMServiceEnabled,AntivirusEnabled,RealTimeProtectionEnabled"
)
HOTFIX_SCRIPT: Final = (
    "(Get-HotFix | Where-Object InstalledOn | Sort-Object InstalledOn -Descending"
    " | Select-Object -First 1).InstalledOn.ToString('yyyy-MM-dd')"
)


def powershell(script: str) -> tuple[str, ...]:
    """argv for Windows PowerShell 5.1 (present on every Windows 10/11), no profile, no prompt."""
    return ("powershell", "-NoProfile", "-NonInteractive", "-Command", script)


def parse_ver(text: str) -> tuple[str, str, str] | None:
    """`cmd /c ver`: "Microsoft Windows [Version 10.0.22631.3880]" → (build "10.0.22631",
    full version "10.0.22631.3880", the line as the human-readable name)."""
    for line in text.splitlines():
        match = re.search(r"\[[^\]]*?(\d+\.\d+\.\d+)(\.\d+)?\]", line)
        if match is not None:
            return match.group(1), match.group(1) + (match.group(2) or ""), line.strip()
    return None


# Explorer's System.Volume.BitLockerProtection values (see the fixture README for the source).
_BITLOCKER_PROTECTED: Final = {1: True, 6: True, 2: False, 3: False, 4: False, 5: False, 8: False}


def parse_bitlocker_protection(text: str) -> bool | None:
    value = text.strip()
    return _BITLOCKER_PROTECTED.get(int(value)) if value.isdigit() else None


def parse_manage_bde(text: str) -> bool | None:
    """`manage-bde -status C:`: "Protection Status: Protection On" with the volume fully (or its
    used space) encrypted; "Protection Off" (also suspended) is False."""
    protection = re.search(r"^\s*Protection Status:\s*Protection (On|Off)", text, re.MULTILINE)
    if protection is None:
        return None
    if protection.group(1) == "Off":
        return False
    conversion = re.search(r"^\s*Conversion Status:\s*(.+?)\s*$", text, re.MULTILINE)
    if conversion is None:
        return None
    return conversion.group(1) in {"Fully Encrypted", "Used Space Only Encrypted"}


def parse_format_list(text: str) -> list[dict[str, str]]:
    """PowerShell's `Format-List`: "Name : value" lines, records separated by blank lines."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not line.strip():
            if current:
                records.append(current)
            current = {}
        elif sep and re.fullmatch(r"\w+", key.strip()):
            current[key.strip()] = value.strip()
    if current:
        records.append(current)
    return records


def _powershell_bool(value: str | None) -> bool | None:
    return {"True": True, "False": False}.get(value or "")


def firewall_from_profiles(states: Mapping[str, bool | None]) -> bool | None:
    """On only when every profile is on; one profile off is enough for False."""
    values = [states.get(profile) for profile in PROFILES]
    if False in values:
        return False
    return True if all(values) else None


def parse_firewall_profiles(text: str) -> bool | None:
    """`Get-NetFirewallProfile | Format-List Name,Enabled` (language-independent booleans)."""
    states = {
        record["Name"]: _powershell_bool(record.get("Enabled"))
        for record in parse_format_list(text)
        if "Name" in record
    }
    return firewall_from_profiles(states)


def parse_netsh_allprofiles(text: str) -> bool | None:
    """`netsh advfirewall show allprofiles state` (English): per "<Profile> Profile Settings:"
    section a "State  ON|OFF" line."""
    states: dict[str, bool | None] = {}
    profile = None
    for line in text.splitlines():
        header = re.match(r"^(\w+) Profile Settings:", line.strip())
        if header is not None:
            profile = header.group(1)
            continue
        state = re.match(r"^State\s+(ON|OFF)\s*$", line.strip())
        if state is not None and profile is not None:
            states[profile] = state.group(1) == "ON"
    return firewall_from_profiles(states)


_REG_VALUE: Final = re.compile(r"^ {4}(?P<name>.+?) {4}(?P<type>REG_[A-Z_]+)(?: {4}(?P<data>.*))?$")


def parse_reg_query(text: str) -> dict[str, str]:
    """`reg query KEY [/v NAME]`: "    Name    REG_SZ    data" lines; DWORDs as decimal text."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _REG_VALUE.match(line.rstrip("\r"))
        if match is None:
            continue
        data = (match.group("data") or "").strip()
        if match.group("type") == "REG_DWORD" and re.fullmatch(r"0x[0-9a-fA-F]+", data):
            data = str(int(data, 16))
        values[match.group("name")] = data
    return values


def _seconds(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def windows_screen_lock(
    user: Mapping[str, str] | None, policy: Mapping[str, str], inactivity: int | None
) -> tuple[bool | None, int | None]:
    """A lock after the inactivity limit or after a secure screen saver, whichever is earlier."""

    def setting(name: str) -> str | None:
        return policy.get(name, (user or {}).get(name))

    active, secure = setting("ScreenSaveActive"), setting("ScreenSaverIsSecure")
    saver_timeout = _seconds(setting("ScreenSaveTimeOut"))
    saver: bool | None = None
    if active == "0" or secure == "0" or saver_timeout == 0:
        saver = False
    elif active == "1" and secure == "1" and saver_timeout:
        saver = True
    if inactivity:
        return True, min(inactivity, saver_timeout) if saver and saver_timeout else inactivity
    if saver and saver_timeout:
        return True, saver_timeout
    if saver is False and inactivity == 0:
        return False, None
    return None, None


def parse_defender(text: str) -> bool | None:
    """`Get-MpComputerStatus | Format-List …`: protected only when all three are True."""
    records = parse_format_list(text)
    if not records:
        return None
    names = ("AMServiceEnabled", "AntivirusEnabled", "RealTimeProtectionEnabled")
    values = [_powershell_bool(records[0].get(name)) for name in names]
    if False in values:
        return False
    return True if all(values) else None


def parse_iso_date(text: str) -> datetime | None:
    """A date as "2024-07-10" (the hotfix script's own formatting, so no locale is involved)."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d")
    except ValueError:
        return None


def probe_version(context: ProbeContext) -> PostureFacts:
    text = context.output("cmd", "/c", "ver")
    parsed = parse_ver(text) if text is not None else None
    if parsed is None:
        return PostureFacts()
    build, full, name = parsed
    return PostureFacts(os_version=build, kernel=full, os_name=clean_text(name))


def probe_bitlocker(context: ProbeContext) -> PostureFacts:
    text = context.output(*powershell(BITLOCKER_SCRIPT))
    found = parse_bitlocker_protection(text) if text is not None else None
    if found is None:
        drive = context.environ.get("SystemDrive", "C:")
        report = context.output("manage-bde", "-status", drive)
        found = parse_manage_bde(report) if report is not None else None
    return PostureFacts(disk_encrypted=found)


def probe_firewall(context: ProbeContext) -> PostureFacts:
    text = context.output(*powershell(FIREWALL_SCRIPT))
    found = parse_firewall_profiles(text) if text is not None else None
    if found is None:
        netsh = context.output("netsh", "advfirewall", "show", "allprofiles", "state")
        found = parse_netsh_allprofiles(netsh) if netsh is not None else None
    return PostureFacts(firewall=found)


def _registry(context: ProbeContext, *argv: str) -> dict[str, str] | None:
    """A key's values; {} when the key or value does not exist (reg exits 1), None if unread."""
    result = context.run("reg", "query", *argv)
    if result is None:
        return None
    if result.ok:
        return parse_reg_query(result.stdout)
    return {} if result.returncode == 1 else None


def probe_screen_lock(context: ProbeContext) -> PostureFacts:
    user = _registry(context, DESKTOP_KEY)
    policy = _registry(context, DESKTOP_POLICY_KEY) or {}
    system = _registry(context, SYSTEM_POLICY_KEY, "/v", "InactivityTimeoutSecs")
    inactivity = None if system is None else _seconds(system.get("InactivityTimeoutSecs", "0"))
    enabled, timeout = windows_screen_lock(user, policy, inactivity)
    return PostureFacts(screen_lock=enabled, screen_lock_timeout=timeout)


def probe_defender(context: ProbeContext) -> PostureFacts:
    text = context.output(*powershell(DEFENDER_SCRIPT))
    return PostureFacts(antivirus=parse_defender(text) if text is not None else None)


def probe_patch_age(context: ProbeContext) -> PostureFacts:
    text = context.output(*powershell(HOTFIX_SCRIPT))
    last = parse_iso_date(text) if text is not None else None
    age = None if last is None else days_since(last.timestamp(), context.now)
    return PostureFacts(patch_age_days=age)


PROBES: Final = (
    probe_version,
    probe_bitlocker,
    probe_firewall,
    probe_screen_lock,
    probe_defender,
    probe_patch_age,
)


def windows_prober(
    *, runner: Runner = run_command, environ: Mapping[str, str] | None = None
) -> PlatformProber:
    """The Windows probes; tests inject a runner replaying documented outputs."""
    return PlatformProber(
        "windows", PROBES, runner=runner, root=Path("/"), environ=environ, is_root=False
    )
