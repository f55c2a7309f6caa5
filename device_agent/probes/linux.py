"""Linux posture: root on dm-crypt, firewall, screen lock, os-release, kernel, updates.

Parsers (`parse_*` and the other pure functions) take a command's text and return a typed value
or None; probes (`probe_*`) fetch the text. What each fact means here:

- disk_encrypted: the block device holding `/` has a dm-crypt (LUKS or plain) layer somewhere
  below it (findmnt → `lsblk --inverse`; else sysfs `slaves/` and `dm/uuid` CRYPT-). A root that
  is not a block device (overlay, ZFS, NFS) is unknown, not False.
- firewall: True when ufw or firewalld is active, or (as root only) the nftables ruleset has an
  input chain that drops by policy or by an unconditional drop/reject rule. False only from that
  ruleset read as root (ufw or firewalld being off does not prove no other firewall). As a normal
  user the ruleset cannot be read and nothing asks for elevation: then only ufw/firewalld answer.
- screen_lock: GNOME (gsettings) or KDE (kreadconfig) when that desktop is the user's session;
  any other desktop, or none, is unknown. The timeout counts idle time plus the lock delay/grace.
- auto_update: Debian family — APT::Periodic::Unattended-Upgrade non-zero and the
  unattended-upgrades package installed; Fedora family — dnf-automatic installs updates by timer.
- patch_age_days: Debian family — the newest of the last `upgrade` action in /var/log/dpkg.log
  (and its rotations, newest first) and the mtime of /var/lib/apt/periodic/upgrade-stamp, which
  unattended-upgrades touches; rpm family — the newest package install time. Both survive a
  manual `apt upgrade` and an unattended one alike; a new package install alone does not count.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from device_agent.probes.base import (
    PlatformProber,
    ProbeContext,
    Runner,
    clean_text,
    days_since,
    run_command,
)
from device_agent.report import PostureFacts

# -- /etc/os-release and the kernel ---------------------------------------------------------

_OS_RELEASE_LINE: Final = re.compile(r"^([A-Z0-9_]+)=(.*)$")


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted with shell-style escapes."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        match = _OS_RELEASE_LINE.match(line.strip())
        if match is None:
            continue
        key, raw = match.groups()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            raw = raw[1:-1]
            if match.group(2)[0] == '"':
                raw = re.sub(r"\\([$\"\\`])", r"\1", raw)
        fields[key] = raw
    return fields


def os_release_facts(fields: Mapping[str, str]) -> PostureFacts:
    """os_version is VERSION_ID ("12"); os_name is PRETTY_NAME (falling back to NAME)."""
    return PostureFacts(
        os_version=clean_text(fields.get("VERSION_ID")),
        os_name=clean_text(fields.get("PRETTY_NAME") or fields.get("NAME")),
    )


def distro_family(fields: Mapping[str, str]) -> str | None:
    """The family whose update tools apply, "debian" or "fedora", from ID and ID_LIKE (Ubuntu is
    Debian's; RHEL and CentOS are Fedora's)."""
    names = {fields.get("ID", ""), *fields.get("ID_LIKE", "").split()}
    if names & {"debian", "ubuntu"}:
        return "debian"
    if names & {"fedora", "rhel", "centos"}:
        return "fedora"
    return None


def _os_release(context: ProbeContext) -> dict[str, str]:
    text = context.read_text("/etc/os-release") or context.read_text("/usr/lib/os-release")
    return parse_os_release(text or "")


def probe_os_release(context: ProbeContext) -> PostureFacts:
    return os_release_facts(_os_release(context))


def probe_kernel(context: ProbeContext) -> PostureFacts:
    return PostureFacts(kernel=clean_text(platform.release()))


# -- disk encryption ------------------------------------------------------------------------


def parse_findmnt_source(text: str) -> str | None:
    """The block device `/` is mounted from (`findmnt --json --output SOURCE /`), or None when
    the root is no block device (overlay, zfs, nfs, tmpfs)."""
    try:
        document = json.loads(text)
        source = document["filesystems"][0]["source"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(source, str):
        return None
    source = source.split("[", 1)[0]  # btrfs subvolume: /dev/mapper/root[/@]
    return source if source.startswith("/dev/") else None


def _devices(nodes: object) -> Iterator[Mapping[str, Any]]:
    if not isinstance(nodes, list):
        return
    for node in nodes:
        if isinstance(node, Mapping):
            yield node
            yield from _devices(node.get("children"))


def parse_lsblk_crypt(text: str) -> bool | None:
    """Whether `lsblk --json --inverse --output NAME,TYPE DEVICE` shows a crypt layer under the
    device (inverse: children are the devices it is built on)."""
    try:
        nodes = json.loads(text)["blockdevices"]
    except (ValueError, KeyError, TypeError):
        return None
    types = [node.get("type") for node in _devices(nodes)]
    if not types or not all(isinstance(kind, str) for kind in types):
        return None
    return "crypt" in types


def is_crypt_dm_uuid(uuid: str) -> bool:
    """A device-mapper target set up by cryptsetup (LUKS1/2 or plain): uuid `CRYPT-…`."""
    return uuid.strip().startswith("CRYPT-")


def sysfs_crypt_below(sys_dev_block: Path, major: int, minor: int) -> bool | None:
    """Walk /sys/dev/block/MAJ:MIN and its `slaves/` for a dm-crypt layer (no command needed)."""
    start = sys_dev_block / f"{major}:{minor}"
    if not start.exists():
        return None  # an anonymous device: overlay, btrfs subvolume, tmpfs
    pending, seen = [start.resolve()], set[Path]()
    while pending:
        device = pending.pop()
        if device in seen or len(seen) > 64:
            continue
        seen.add(device)
        try:
            if is_crypt_dm_uuid((device / "dm" / "uuid").read_text(encoding="ascii")):
                return True
        except (OSError, ValueError):
            pass
        slaves = device / "slaves"
        if slaves.is_dir():
            pending.extend(slave.resolve() for slave in slaves.iterdir())
    return False


def probe_disk_encryption(context: ProbeContext) -> PostureFacts:
    source_text = context.output("findmnt", "--json", "--output", "SOURCE", "/")
    source = parse_findmnt_source(source_text) if source_text is not None else None
    if source is not None:
        listing = context.output("lsblk", "--json", "--inverse", "--output", "NAME,TYPE", source)
        found = parse_lsblk_crypt(listing) if listing is not None else None
        if found is not None:
            return PostureFacts(disk_encrypted=found)
    try:
        device = context.path("/").stat().st_dev
    except OSError:
        return PostureFacts()
    sys_dev_block = context.path("/sys/dev/block")
    found = sysfs_crypt_below(sys_dev_block, os.major(device), os.minor(device))
    return PostureFacts(disk_encrypted=found)


# -- firewall -------------------------------------------------------------------------------

_TABLE: Final = re.compile(r"^table\s+(\S+)\s+(\S+)\s*\{")
_CHAIN: Final = re.compile(r"^chain\s+(\S+)\s*\{")
_COUNTER: Final = re.compile(r"^counter(\s+packets\s+\d+\s+bytes\s+\d+)?\s*")
_JUMP: Final = re.compile(r"^(?:jump|goto)\s+(\S+)$")


def _strip_quoted(line: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)


def _verdict(rule: str) -> str:
    """The rule without a leading counter: what an unconditional rule does."""
    return _COUNTER.sub("", rule, count=1).strip()


def parse_nft_ruleset(text: str) -> bool | None:
    """Whether `nft list ruleset` filters incoming traffic: an input-hook chain with policy drop,
    or reaching (by unconditional jump/goto) an unconditional drop or reject. An empty ruleset is
    False; text that is not a ruleset is None."""
    chains: dict[tuple[str, str], list[str]] = {}  # (table, chain) -> statements
    inputs: list[tuple[str, str]] = []
    table = chain = None
    depth = 0
    saw_table = False
    for raw in text.splitlines():
        line = _strip_quoted(raw.strip())
        if not line or line.startswith("#"):
            continue
        if depth == 0 and (match := _TABLE.match(line)):
            table, saw_table = f"{match.group(1)} {match.group(2)}", True
        elif depth == 1 and table and (match := _CHAIN.match(line)):
            chain = match.group(1)
            chains[(table, chain)] = []
        elif depth == 2 and table and chain:
            chains[(table, chain)].append(line)
            if re.search(r"\bhook\s+input\b", line) and re.search(r"\btype\s+filter\b", line):
                inputs.append((table, chain))
        depth += line.count("{") - line.count("}")
        if depth < 0:
            return None
        if depth <= 1:
            chain = None
        if depth == 0:
            table = None
    if depth != 0 or (text.strip() and not saw_table):
        return None

    def filters(key: tuple[str, str], seen: set[tuple[str, str]]) -> bool:
        seen.add(key)
        for statement in chains.get(key, []):
            verdict = _verdict(statement)
            if re.search(r"\bpolicy\s+drop\b", statement) or verdict.split(" ", 1)[0] in {
                "drop",
                "reject",
            }:
                return True
            jump = _JUMP.match(verdict)
            if jump and (target := (key[0], jump.group(1))) not in seen and filters(target, seen):
                return True
        return False

    return any(filters(key, set()) for key in inputs)


def parse_ufw_status(text: str) -> bool | None:
    """`ufw status` (root only): "Status: active" / "Status: inactive"."""
    match = re.search(r"^Status:\s*(active|inactive)\b", text, re.MULTILINE)
    return None if match is None else match.group(1) == "active"


def parse_ufw_conf(text: str) -> bool | None:
    """/etc/ufw/ufw.conf (world-readable): ENABLED=yes starts the firewall at boot."""
    match = re.search(r"^\s*ENABLED\s*=\s*[\"']?(yes|no)[\"']?\s*$", text, re.MULTILINE)
    return None if match is None else match.group(1) == "yes"


def parse_firewalld_state(text: str) -> bool | None:
    """`firewall-cmd --state`: "running" (exit 0) or "not running" (exit 252)."""
    words = text.strip()
    return {"running": True, "not running": False}.get(words)


def parse_systemctl_active(text: str) -> bool | None:
    """`systemctl is-active UNIT`: the first line is the unit's state."""
    state = text.strip().splitlines()[0] if text.strip() else ""
    if state in {"active", "reloading"}:
        return True
    if state in {"inactive", "failed", "deactivating"}:
        return False
    return None


def legacy_iptables_tables(text: str | None) -> bool:
    """/proc/net/ip_tables_names lists legacy iptables tables, which nft cannot show."""
    return bool(text and text.strip())


def firewall_verdict(
    nft: bool | None, ufw: bool | None, firewalld: bool | None, legacy_tables: bool
) -> bool | None:
    """Any active firewall wins; only the root-read nftables ruleset (with no legacy iptables
    tables beside it) can say there is none."""
    if True in (nft, ufw, firewalld):
        return True
    if nft is False and not legacy_tables:
        return False
    return None


def _nft(context: ProbeContext) -> bool | None:
    if not context.is_root:
        return None  # the ruleset needs CAP_NET_ADMIN; never ask for elevation
    result = context.run("nft", "list", "ruleset")
    return parse_nft_ruleset(result.stdout) if result is not None and result.ok else None


def _ufw(context: ProbeContext) -> bool | None:
    if context.is_root:
        status = context.output("ufw", "status")
        if status is not None and (state := parse_ufw_status(status)) is not None:
            return state
    conf = context.read_text("/etc/ufw/ufw.conf")
    return parse_ufw_conf(conf) if conf is not None else None


def _firewalld(context: ProbeContext) -> bool | None:
    result = context.run("firewall-cmd", "--state")
    if result is not None and (state := parse_firewalld_state(result.stdout)) is not None:
        return state
    active = context.run("systemctl", "is-active", "firewalld")
    return parse_systemctl_active(active.stdout) if active is not None else None


def probe_firewall(context: ProbeContext) -> PostureFacts:
    legacy = legacy_iptables_tables(context.read_text("/proc/net/ip_tables_names"))
    verdict = firewall_verdict(_nft(context), _ufw(context), _firewalld(context), legacy)
    return PostureFacts(firewall=verdict)


# -- screen lock ----------------------------------------------------------------------------


def desktop_of(environ: Mapping[str, str], processes: Iterable[str]) -> str | None:
    """The user's desktop, "gnome" or "kde": XDG_CURRENT_DESKTOP, else the shell process
    (a user unit may start before the session exports its environment)."""
    desktops = environ.get("XDG_CURRENT_DESKTOP", "").lower().split(":")
    if "gnome" in desktops:
        return "gnome"
    if "kde" in desktops:
        return "kde"
    names = set(processes)
    if "gnome-shell" in names:
        return "gnome"
    if "plasmashell" in names or "ksmserver" in names:
        return "kde"
    return None


def _own_processes(context: ProbeContext) -> Iterator[str]:
    """Names of this user's processes (/proc/PID/comm)."""
    proc = context.path("/proc")
    uid = os.getuid() if hasattr(os, "getuid") else -1
    try:
        entries = list(proc.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                yield (entry / "comm").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue


def parse_gsettings_bool(text: str) -> bool | None:
    """`gsettings get SCHEMA KEY` of a boolean: "true" / "false"."""
    return {"true": True, "false": False}.get(text.strip())


def parse_gsettings_uint(text: str) -> int | None:
    """`gsettings get` of an integer: "uint32 300" (typed GVariant) or "300"."""
    match = re.fullmatch(r"(?:u?int\d+\s+)?(\d+)", text.strip())
    return None if match is None else int(match.group(1))


def gnome_screen_lock(
    lock_enabled: bool | None,
    idle_delay: int | None,
    lock_delay: int | None,
    idle_activation: bool | None,
    lock_disabled: bool | None,
) -> tuple[bool | None, int | None]:
    """GNOME locks after `idle-delay` seconds of idleness (0 = never) plus `lock-delay`, if
    `lock-enabled`, unless idle activation or the lock screen is switched off."""
    if (
        lock_enabled is False
        or lock_disabled is True
        or idle_activation is False
        or idle_delay == 0
    ):
        return False, None
    if lock_enabled is None or idle_delay is None:
        return None, None
    return True, None if lock_delay is None else idle_delay + lock_delay


def _gsettings(context: ProbeContext, schema: str, key: str) -> str | None:
    return context.output("gsettings", "get", schema, key)


def _gnome(context: ProbeContext) -> PostureFacts:
    def boolean(schema: str, key: str) -> bool | None:
        text = _gsettings(context, schema, key)
        return parse_gsettings_bool(text) if text is not None else None

    def number(schema: str, key: str) -> int | None:
        text = _gsettings(context, schema, key)
        return parse_gsettings_uint(text) if text is not None else None

    enabled, timeout = gnome_screen_lock(
        boolean("org.gnome.desktop.screensaver", "lock-enabled"),
        number("org.gnome.desktop.session", "idle-delay"),
        number("org.gnome.desktop.screensaver", "lock-delay"),
        boolean("org.gnome.desktop.screensaver", "idle-activation-enabled"),
        boolean("org.gnome.desktop.lockdown", "disable-lock-screen"),
    )
    return PostureFacts(screen_lock=enabled, screen_lock_timeout=timeout)


def parse_kde_bool(text: str) -> bool | None:
    """kreadconfig's answer for a bool key: "true" / "false"."""
    return {"true": True, "false": False}.get(text.strip().lower())


def parse_kde_int(text: str) -> int | None:
    value = text.strip()
    return int(value) if value.isdigit() else None


def kde_screen_lock(
    autolock: bool | None, timeout_minutes: int | None, grace_seconds: int | None
) -> tuple[bool | None, int | None]:
    """KDE's screen locker ([Daemon] in kscreenlockerrc): Autolock after Timeout minutes
    (0 = never), a password required LockGrace seconds later."""
    if autolock is False or timeout_minutes == 0:
        return False, None
    if autolock is None or timeout_minutes is None:
        return None, None
    return True, None if grace_seconds is None else timeout_minutes * 60 + grace_seconds


# kscreenlocker's own defaults (kscreenlockersettings.kcfg): kreadconfig prints them when the
# user never changed the setting, so an untouched desktop reads as what it does.
_KDE_KEYS: Final = {"Autolock": "true", "Timeout": "5", "LockGrace": "5"}


def _kde(context: ProbeContext) -> PostureFacts:
    values: dict[str, str | None] = {}
    for key, default in _KDE_KEYS.items():
        values[key] = None
        for tool in ("kreadconfig6", "kreadconfig5"):
            argv = ("--file", "kscreenlockerrc", "--group", "Daemon", "--key", key)
            text = context.output(tool, *argv, "--default", default)
            if text is not None:
                values[key] = text
                break
    autolock, timeout, grace = (values[key] for key in _KDE_KEYS)
    enabled, seconds = kde_screen_lock(
        parse_kde_bool(autolock) if autolock is not None else None,
        parse_kde_int(timeout) if timeout is not None else None,
        parse_kde_int(grace) if grace is not None else None,
    )
    return PostureFacts(screen_lock=enabled, screen_lock_timeout=seconds)


def probe_screen_lock(context: ProbeContext) -> PostureFacts:
    desktop = desktop_of(context.environ, _own_processes(context))
    if desktop == "gnome":
        return _gnome(context)
    if desktop == "kde":
        return _kde(context)
    return PostureFacts()  # no desktop we can read (or none at all): unknown


# -- automatic updates ----------------------------------------------------------------------


def parse_apt_config_value(text: str, key: str) -> str | None:
    """`apt-config dump KEY`: a line `KEY "value";`."""
    match = re.search(rf'^{re.escape(key)}\s+"([^"]*)";\s*$', text, re.MULTILINE)
    return None if match is None else match.group(1)


def apt_periodic_enabled(value: str | None) -> bool:
    """APT::Periodic intervals are days ("1") or "always"; unset or "0" is off."""
    if value is None:
        return False
    value = value.strip().lower()
    return value == "always" or (value.isdigit() and int(value) > 0)


def parse_dpkg_installed(result_ok: bool, text: str) -> bool:
    """`dpkg-query -W -f='${db:Status-Status}' PKG`: "installed"; an unknown package exits 1."""
    return result_ok and text.strip() == "installed"


def parse_systemctl_enabled(text: str) -> bool | None:
    """`systemctl is-enabled UNIT`: enabled (also at runtime) or a known not-enabled state."""
    state = text.strip().splitlines()[0] if text.strip() else ""
    if state in {"enabled", "enabled-runtime"}:
        return True
    if state in {"disabled", "masked", "masked-runtime", "static", "indirect", "linked"}:
        return False
    return None


def parse_dnf_automatic_apply(text: str) -> bool | None:
    """/etc/dnf/automatic.conf [commands] apply_updates (default no)."""
    section = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == "commands" and "=" in line:
            key, value = (part.strip().lower() for part in line.split("=", 1))
            if key == "apply_updates":
                return value in {"yes", "true", "1", "on"}
    return False


def _debian_auto_update(context: ProbeContext) -> bool | None:
    key = "APT::Periodic::Unattended-Upgrade"
    dump = context.output("apt-config", "dump", key)
    package = context.run("dpkg-query", "-W", "-f=${db:Status-Status}", "unattended-upgrades")
    if dump is None or package is None:
        return None
    installed = parse_dpkg_installed(package.ok, package.stdout)
    return installed and apt_periodic_enabled(parse_apt_config_value(dump, key))


def _fedora_auto_update(context: ProbeContext) -> bool | None:
    def enabled(unit: str) -> bool | None:
        result = context.run("systemctl", "is-enabled", unit)
        return parse_systemctl_enabled(result.stdout) if result is not None else None

    if enabled("dnf-automatic-install.timer"):
        return True
    conf = context.read_text("/etc/dnf/automatic.conf")
    applies = parse_dnf_automatic_apply(conf) if conf is not None else None
    timers = [enabled("dnf-automatic.timer"), enabled("dnf5-automatic.timer")]
    if True in timers:
        return applies  # the plain timer only downloads unless apply_updates = yes
    if all(state is False for state in timers):
        return False
    return None


def probe_auto_update(context: ProbeContext) -> PostureFacts:
    family = distro_family(_os_release(context))
    if family == "debian":
        return PostureFacts(auto_update=_debian_auto_update(context))
    if family == "fedora":
        return PostureFacts(auto_update=_fedora_auto_update(context))
    return PostureFacts()


# -- patch age ------------------------------------------------------------------------------

_DPKG_UPGRADE: Final = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) upgrade \S+")


def last_dpkg_upgrade(lines: Iterable[str]) -> datetime | None:
    """The time (local, naive as dpkg writes it) of the last `upgrade` action in a dpkg.log."""
    last = None
    for line in lines:
        match = _DPKG_UPGRADE.match(line)
        if match is not None:
            try:
                last = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
            except ValueError:
                continue
    return last


def parse_rpm_install_times(text: str) -> int | None:
    """`rpm -qa --queryformat '%{INSTALLTIME}\\n'`: the newest install time (unix seconds)."""
    times = [int(line) for line in text.split() if line.isdigit()]
    return max(times) if times else None


def _dpkg_logs(context: ProbeContext) -> Iterator[Path]:
    """dpkg.log, then its rotations from newest to oldest (logrotate keeps twelve months)."""
    yield context.path("/var/log/dpkg.log")
    yield context.path("/var/log/dpkg.log.1")
    for number in range(2, 13):
        yield context.path(f"/var/log/dpkg.log.{number}.gz")


_MAX_LOG: Final = 64 * 1024 * 1024  # a dpkg.log is a few MiB; anything far larger is skipped


def _read_lines(path: Path) -> list[str] | None:
    try:
        if path.stat().st_size > _MAX_LOG:
            return None
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
                return stream.readlines()
        with path.open(encoding="utf-8", errors="replace") as stream:
            return stream.readlines()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def _debian_last_update(context: ProbeContext) -> float | None:
    candidates: list[float] = []
    for path in _dpkg_logs(context):
        lines = _read_lines(path)
        if lines is None:
            continue
        last = last_dpkg_upgrade(lines)
        if last is not None:
            candidates.append(last.timestamp())
            break
    stamp = context.mtime("/var/lib/apt/periodic/upgrade-stamp")
    if stamp is not None:
        candidates.append(stamp)
    return max(candidates) if candidates else None


def probe_patch_age(context: ProbeContext) -> PostureFacts:
    family = distro_family(_os_release(context))
    last: float | None = None
    if family == "debian":
        last = _debian_last_update(context)
    elif family == "fedora":
        text = context.output("rpm", "-qa", "--queryformat", "%{INSTALLTIME}\\n")
        last = parse_rpm_install_times(text) if text is not None else None
    return PostureFacts(patch_age_days=None if last is None else days_since(last, context.now))


PROBES: Final = (
    probe_os_release,
    probe_kernel,
    probe_disk_encryption,
    probe_firewall,
    probe_screen_lock,
    probe_auto_update,
    probe_patch_age,
)


def linux_prober(
    *,
    runner: Runner = run_command,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
    is_root: bool | None = None,
) -> PlatformProber:
    """The Linux probes; tests inject a recorded runner, a fixture root, env and privilege."""
    return PlatformProber(
        "linux", PROBES, runner=runner, root=root, environ=environ, is_root=is_root
    )
