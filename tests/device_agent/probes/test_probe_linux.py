"""Linux probes: parsers against recorded and documented outputs, replayed machines, and the
real probes on this machine (also as an unprivileged user)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest
from probe_replay import FIXTURES, Answer, ReplayRunner, fixture

from device_agent.probes import DEFAULT_TIMEOUT
from device_agent.probes.base import CommandResult, run_command
from device_agent.probes.linux import (
    apt_periodic_enabled,
    desktop_of,
    distro_family,
    firewall_verdict,
    gnome_screen_lock,
    kde_screen_lock,
    last_dpkg_upgrade,
    legacy_iptables_tables,
    linux_prober,
    os_release_facts,
    parse_apt_config_value,
    parse_dnf_automatic_apply,
    parse_dpkg_installed,
    parse_findmnt_source,
    parse_firewalld_state,
    parse_gsettings_bool,
    parse_gsettings_uint,
    parse_kde_bool,
    parse_kde_int,
    parse_lsblk_crypt,
    parse_nft_ruleset,
    parse_os_release,
    parse_rpm_install_times,
    parse_systemctl_active,
    parse_systemctl_enabled,
    parse_ufw_conf,
    parse_ufw_status,
    sysfs_crypt_below,
)
from device_agent.report import PostureFacts

L = "linux/"
UNATTENDED = "APT::Periodic::Unattended-Upgrade"

# -- os-release -----------------------------------------------------------------------------


def test_os_release_recorded_debian() -> None:
    """This machine's /etc/os-release gives VERSION_ID as os_version and PRETTY_NAME as name."""
    fields = parse_os_release(fixture(L + "os-release-debian12.txt"))
    assert fields["ID"] == "debian"
    assert os_release_facts(fields) == PostureFacts(
        os_version="12", os_name="Debian GNU/Linux 12 (bookworm)"
    )
    assert distro_family(fields) == "debian"


def test_os_release_other_distributions() -> None:
    """Ubuntu is Debian's family, Fedora its own, Arch neither and has no version."""
    ubuntu = parse_os_release(fixture(L + "os-release-ubuntu2404.txt"))
    fedora = parse_os_release(fixture(L + "os-release-fedora40.txt"))
    arch = parse_os_release(fixture(L + "os-release-arch.txt"))
    assert os_release_facts(ubuntu) == PostureFacts(os_version="24.04", os_name="Ubuntu 24.04 LTS")
    assert (distro_family(ubuntu), distro_family(fedora), distro_family(arch)) == (
        "debian",
        "fedora",
        None,
    )
    assert os_release_facts(fedora).os_version == "40"
    assert os_release_facts(arch) == PostureFacts(os_name="Arch Linux")


def test_os_release_quoting_and_garbage() -> None:
    """Shell-style quotes and escapes are undone; junk lines and empty text give nothing."""
    fields = parse_os_release('PRETTY_NAME="Say \\"hi\\""\nNAME=\'Plain\'\n# comment\nnot a line\n')
    assert fields == {"PRETTY_NAME": 'Say "hi"', "NAME": "Plain"}
    assert os_release_facts(parse_os_release("")) == PostureFacts()


# -- disk encryption ------------------------------------------------------------------------


def test_findmnt_root_source() -> None:
    """The root's block device from findmnt; subvolume suffixes dropped; non-devices unknown."""
    assert parse_findmnt_source(fixture(L + "findmnt-root.json")) == "/dev/vda"
    assert parse_findmnt_source(fixture(L + "findmnt-root-luks-lvm.json")) == "/dev/mapper/vg0-root"
    assert parse_findmnt_source(fixture(L + "findmnt-root-btrfs-subvolume.json")) == (
        "/dev/mapper/luks-5c8a8e9e-7f41-4d0b-9a3c-2b1f5e7d9c10"
    )
    assert parse_findmnt_source(fixture(L + "findmnt-root-overlay.json")) is None
    for broken in ("", "{", '{"filesystems": []}', '{"filesystems": [{"source": 5}]}', "[]"):
        assert parse_findmnt_source(broken) is None


def test_lsblk_crypt_layers() -> None:
    """A crypt layer anywhere below the root device means encrypted; none means not."""
    assert parse_lsblk_crypt(fixture(L + "lsblk-inverse-vda.json")) is False
    assert parse_lsblk_crypt(fixture(L + "lsblk-inverse-luks-lvm.json")) is True
    assert parse_lsblk_crypt(fixture(L + "lsblk-inverse-plain-lvm.json")) is False
    for broken in ("", "not json", '{"blockdevices": []}', '{"blockdevices": [{"name": "x"}]}'):
        assert parse_lsblk_crypt(broken) is None


def _block(sys_root: Path, name: str, uuid: str | None, slaves: Sequence[str] = ()) -> Path:
    device = sys_root / "devices" / "virtual" / "block" / name
    (device / "slaves").mkdir(parents=True)
    if uuid is not None:
        (device / "dm").mkdir()
        (device / "dm" / "uuid").write_text(uuid + "\n")
    for slave in slaves:
        (device / "slaves" / slave).symlink_to(device.parent / slave)
    return device


def test_sysfs_walk_finds_dm_crypt_below_lvm(tmp_path: Path) -> None:
    """Without lsblk, sysfs slaves lead from the LVM root to a CRYPT- device-mapper target."""
    dev_block = tmp_path / "dev" / "block"
    dev_block.mkdir(parents=True)
    _block(tmp_path, "nvme0n1p3", None)
    _block(
        tmp_path,
        "dm-0",
        "CRYPT-LUKS2-5c8a8e9e7f414d0b9a3c2b1f5e7d9c10-nvme0n1p3_crypt",
        ["nvme0n1p3"],
    )
    root = _block(tmp_path, "dm-1", "LVM-Qm2p0aBcDeFgHiJkLmNoPqRsTuVwXyZ0", ["dm-0"])
    plain = _block(tmp_path, "sda3", None)
    (dev_block / "253:1").symlink_to(root)
    (dev_block / "8:3").symlink_to(plain)
    assert sysfs_crypt_below(dev_block, 253, 1) is True
    assert sysfs_crypt_below(dev_block, 8, 3) is False
    assert sysfs_crypt_below(dev_block, 0, 42) is None  # overlay / btrfs anonymous device


def test_sysfs_walk_agrees_with_lsblk_on_this_machine() -> None:
    """On this machine the two independent readings of the root device agree."""
    source = run_command(["findmnt", "--json", "--output", "SOURCE", "/"], 10)
    device = parse_findmnt_source(source.stdout) if source is not None else None
    if device is None or not Path("/sys/dev/block").is_dir():
        pytest.skip("root is not a block device here")
    listing = run_command(["lsblk", "--json", "--inverse", "--output", "NAME,TYPE", device], 10)
    assert listing is not None
    st_dev = os.stat("/").st_dev
    from_sysfs = sysfs_crypt_below(Path("/sys/dev/block"), os.major(st_dev), os.minor(st_dev))
    assert from_sysfs == parse_lsblk_crypt(listing.stdout)


# -- firewall -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nft-ruleset-workstation.txt", True),
        ("nft-ruleset-ufw-iptables-nft.txt", True),
        ("nft-ruleset-firewalld.txt", True),
        ("nft-ruleset-accept-policy-final-drop.txt", True),
        ("nft-ruleset-debian-default.txt", False),
        ("nft-ruleset-docker-only.txt", False),
        ("nft-ruleset-empty.txt", False),
    ],
)
def test_nft_ruleset(name: str, expected: bool) -> None:
    """An input chain dropping by policy or by an unconditional drop/reject is a firewall;
    accept-all, forward-only filtering and an empty ruleset are not."""
    assert parse_nft_ruleset(fixture(L + name)) is expected


def test_nft_ruleset_garbage_is_unknown() -> None:
    """Error text or an unbalanced ruleset is not read as 'no firewall'."""
    assert parse_nft_ruleset(fixture(L + "nft-nonroot.stderr")) is None
    assert parse_nft_ruleset("table inet filter {\n\tchain input {\n") is None
    assert parse_nft_ruleset("}\n") is None


def test_ufw_and_firewalld_outputs() -> None:
    """ufw status/config and firewalld state words map to on/off; anything else is unknown."""
    assert parse_ufw_status(fixture(L + "ufw-status-active.txt")) is True
    assert parse_ufw_status(fixture(L + "ufw-status-inactive.txt")) is False
    assert parse_ufw_status(fixture(L + "ufw-status-nonroot.stderr")) is None
    assert parse_ufw_conf(fixture(L + "ufw.conf-enabled")) is True
    assert parse_ufw_conf(fixture(L + "ufw.conf-disabled")) is False
    assert parse_ufw_conf("LOGLEVEL=low\n") is None
    assert parse_firewalld_state(fixture(L + "firewall-cmd-state-running.txt")) is True
    assert parse_firewalld_state(fixture(L + "firewall-cmd-state-not-running.txt")) is False
    assert parse_firewalld_state("FirewallD is not running\nerror") is None
    assert parse_systemctl_active(fixture(L + "systemctl-is-active-active.txt")) is True
    assert parse_systemctl_active(fixture(L + "systemctl-is-active-inactive.txt")) is False
    assert parse_systemctl_active(fixture(L + "systemctl-is-active-firewalld.stdout")) is None
    assert legacy_iptables_tables(fixture(L + "ip_tables_names-empty.txt")) is False
    assert legacy_iptables_tables(fixture(L + "ip_tables_names-legacy.txt")) is True


def test_firewall_verdict_only_root_can_say_none() -> None:
    """Any active firewall wins; only the root-read ruleset, with no legacy tables, says off."""
    assert firewall_verdict(None, True, None, False) is True
    assert firewall_verdict(False, False, True, False) is True
    assert firewall_verdict(False, False, False, False) is False
    assert firewall_verdict(False, None, None, True) is None  # legacy iptables rules unseen
    assert firewall_verdict(None, False, False, False) is None  # non-root: cannot know


# -- screen lock ----------------------------------------------------------------------------


def test_gsettings_recorded_defaults() -> None:
    """GNOME's recorded defaults: lock enabled, blank after 300 s, lock at once."""
    assert parse_gsettings_bool(fixture(L + "gsettings-lock-enabled.txt")) is True
    assert parse_gsettings_uint(fixture(L + "gsettings-idle-delay.txt")) == 300
    assert parse_gsettings_uint(fixture(L + "gsettings-lock-delay.txt")) == 0
    assert parse_gsettings_bool(fixture(L + "gsettings-idle-activation-enabled.txt")) is True
    assert parse_gsettings_bool(fixture(L + "gsettings-disable-lock-screen.txt")) is False
    assert parse_gsettings_bool(fixture(L + "gsettings-no-schema.stderr")) is None
    assert parse_gsettings_uint("uint32") is None
    assert parse_gsettings_uint("") is None


def test_gnome_lock_rules() -> None:
    """GNOME locks after idle-delay plus lock-delay; off, never-idle or disabled lock is False."""
    assert gnome_screen_lock(True, 300, 0, True, False) == (True, 300)
    assert gnome_screen_lock(True, 600, 30, True, False) == (True, 630)
    assert gnome_screen_lock(False, 300, 0, True, False) == (False, None)
    assert gnome_screen_lock(True, 0, 0, True, False) == (False, None)
    assert gnome_screen_lock(True, 300, 0, True, True) == (False, None)
    assert gnome_screen_lock(True, 300, None, None, None) == (True, None)
    assert gnome_screen_lock(None, 300, 0, True, False) == (None, None)


def test_kde_lock_rules() -> None:
    """KDE locks after Timeout minutes plus LockGrace seconds when Autolock is on."""
    autolock = parse_kde_bool(fixture(L + "kreadconfig-autolock-true.txt"))
    minutes = parse_kde_int(fixture(L + "kreadconfig-timeout-10.txt"))
    grace = parse_kde_int(fixture(L + "kreadconfig-lockgrace-5.txt"))
    assert kde_screen_lock(autolock, minutes, grace) == (True, 605)
    off = parse_kde_bool(fixture(L + "kreadconfig-autolock-false.txt"))
    assert kde_screen_lock(off, minutes, grace) == (False, None)
    assert kde_screen_lock(True, 0, 5) == (False, None)
    assert kde_screen_lock(None, 5, 5) == (None, None)
    assert parse_kde_int("") is None
    assert parse_kde_bool("maybe") is None


def test_desktop_detection() -> None:
    """The desktop comes from XDG_CURRENT_DESKTOP, else from the user's shell process."""
    assert desktop_of({"XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, []) == "gnome"
    assert desktop_of({"XDG_CURRENT_DESKTOP": "KDE"}, []) == "kde"
    assert desktop_of({}, ["bash", "gnome-shell"]) == "gnome"
    assert desktop_of({}, ["plasmashell"]) == "kde"
    assert desktop_of({"XDG_CURRENT_DESKTOP": "XFCE"}, ["xfce4-session"]) is None


# -- updates --------------------------------------------------------------------------------


def test_apt_unattended_upgrade_setting() -> None:
    """apt-config's dump gives the Unattended-Upgrade interval; unset or 0 is off."""
    set_value = parse_apt_config_value(fixture(L + "apt-config-unattended-set.txt"), UNATTENDED)
    unset = parse_apt_config_value(fixture(L + "apt-config-unattended-unset.txt"), UNATTENDED)
    assert (set_value, unset) == ("1", None)
    assert apt_periodic_enabled(set_value) is True
    assert apt_periodic_enabled(unset) is False
    assert apt_periodic_enabled("0") is False
    assert apt_periodic_enabled("always") is True


def test_dpkg_package_state() -> None:
    """dpkg-query says installed (exit 0) or knows no such package (exit 1)."""
    assert parse_dpkg_installed(True, fixture(L + "dpkg-query-dpkg.stdout")) is True
    assert (
        parse_dpkg_installed(False, fixture(L + "dpkg-query-unattended-upgrades.stdout")) is False
    )
    assert parse_dpkg_installed(True, "config-files") is False


def test_fedora_update_settings() -> None:
    """dnf-automatic applies updates only with apply_updates = yes; timer states parse."""
    assert parse_dnf_automatic_apply(fixture(L + "dnf-automatic.conf-apply")) is True
    assert parse_dnf_automatic_apply(fixture(L + "dnf-automatic.conf-download-only")) is False
    assert parse_systemctl_enabled(fixture(L + "systemctl-is-enabled-enabled.txt")) is True
    assert parse_systemctl_enabled(fixture(L + "systemctl-is-enabled-disabled.txt")) is False
    assert parse_systemctl_enabled(fixture(L + "systemctl-is-enabled-absent.stdout")) is None
    assert parse_rpm_install_times(fixture(L + "rpm-installtimes.txt")) == 1719900000
    assert parse_rpm_install_times("(none)\n") is None


def test_dpkg_log_last_upgrade() -> None:
    """The recorded dpkg.log's last `upgrade` line counts; later `install` lines do not."""
    lines = fixture(L + "dpkg.log").splitlines()
    assert last_dpkg_upgrade(lines) == datetime(2026, 11, 26, 12, 41, 12)
    assert last_dpkg_upgrade([line for line in lines if " upgrade " not in line]) is None
    assert last_dpkg_upgrade(["2026-13-45 99:00:00 upgrade x:amd64 1 2"]) is None
    assert last_dpkg_upgrade([]) is None


# -- whole machines, replayed ---------------------------------------------------------------


def _machine(tmp_path: Path, os_release: str, files: dict[str, str]) -> Path:
    """A file-system root holding the given files (paths relative to /)."""
    for name, text in {"etc/os-release": fixture(L + os_release), **files}.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return tmp_path


def _gsettings(schema: str, key: str, name: str) -> tuple[tuple[str, ...], Answer]:
    return ("gsettings", "get", schema, key), Answer(fixture(L + name))


def _kreadconfig(key: str, default: str, name: str) -> tuple[tuple[str, ...], Answer]:
    argv = ("kreadconfig6", "--file", "kscreenlockerrc", "--group", "Daemon", "--key", key)
    return (*argv, "--default", default), Answer(fixture(L + name))


def test_replayed_ubuntu_laptop_as_root(tmp_path: Path) -> None:
    """An Ubuntu laptop on LUKS with ufw, GNOME and unattended upgrades reads as healthy."""
    root = _machine(
        tmp_path,
        "os-release-ubuntu2404.txt",
        {
            "var/log/dpkg.log": fixture(L + "dpkg.log"),
            "etc/ufw/ufw.conf": fixture(L + "ufw.conf-enabled"),
        },
    )
    runner = ReplayRunner(
        dict(
            [
                (
                    ("findmnt", "--json", "--output", "SOURCE", "/"),
                    Answer(fixture(L + "findmnt-root-luks-lvm.json")),
                ),
                (
                    (
                        "lsblk",
                        "--json",
                        "--inverse",
                        "--output",
                        "NAME,TYPE",
                        "/dev/mapper/vg0-root",
                    ),
                    Answer(fixture(L + "lsblk-inverse-luks-lvm.json")),
                ),
                (
                    ("nft", "list", "ruleset"),
                    Answer(fixture(L + "nft-ruleset-ufw-iptables-nft.txt")),
                ),
                (("ufw", "status"), Answer(fixture(L + "ufw-status-active.txt"))),
                _gsettings(
                    "org.gnome.desktop.screensaver", "lock-enabled", "gsettings-lock-enabled.txt"
                ),
                _gsettings(
                    "org.gnome.desktop.session", "idle-delay", "gsettings-idle-delay-600.txt"
                ),
                _gsettings(
                    "org.gnome.desktop.screensaver", "lock-delay", "gsettings-lock-delay-30.txt"
                ),
                _gsettings(
                    "org.gnome.desktop.screensaver",
                    "idle-activation-enabled",
                    "gsettings-idle-activation-enabled.txt",
                ),
                _gsettings(
                    "org.gnome.desktop.lockdown",
                    "disable-lock-screen",
                    "gsettings-disable-lock-screen.txt",
                ),
                (
                    ("apt-config", "dump", UNATTENDED),
                    Answer(fixture(L + "apt-config-unattended-set.txt")),
                ),
                (
                    ("dpkg-query", "-W", "-f=${db:Status-Status}", "unattended-upgrades"),
                    Answer(fixture(L + "dpkg-query-dpkg.stdout")),
                ),
            ]
        )
    )
    prober = linux_prober(
        runner=runner, root=root, environ={"XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, is_root=True
    )
    facts = prober.collect(10)
    assert facts.os == "linux"
    assert facts.os_version == "24.04"
    assert facts.os_name == "Ubuntu 24.04 LTS"
    assert facts.disk_encrypted is True
    assert facts.firewall is True
    assert (facts.screen_lock, facts.screen_lock_timeout) == (True, 630)
    assert facts.auto_update is True
    expected_age = (time.time() - datetime(2026, 11, 26, 12, 41, 12).timestamp()) // 86400
    assert facts.patch_age_days == max(0, int(expected_age))


def test_replayed_fedora_kde_as_a_normal_user(tmp_path: Path) -> None:
    """A Fedora KDE laptop read without root: nft is never run, firewalld and dnf answer."""
    root = _machine(tmp_path, "os-release-fedora40.txt", {})
    runner = ReplayRunner(
        dict(
            [
                (
                    ("firewall-cmd", "--state"),
                    Answer(fixture(L + "firewall-cmd-state-running.txt")),
                ),
                _kreadconfig("Autolock", "true", "kreadconfig-autolock-true.txt"),
                _kreadconfig("Timeout", "5", "kreadconfig-timeout-10.txt"),
                _kreadconfig("LockGrace", "5", "kreadconfig-lockgrace-5.txt"),
                (
                    ("systemctl", "is-enabled", "dnf-automatic-install.timer"),
                    Answer(fixture(L + "systemctl-is-enabled-enabled.txt")),
                ),
                (
                    ("rpm", "-qa", "--queryformat", "%{INSTALLTIME}\\n"),
                    Answer(fixture(L + "rpm-installtimes.txt")),
                ),
            ]
        )
    )
    facts = linux_prober(
        runner=runner, root=root, environ={"XDG_CURRENT_DESKTOP": "KDE"}, is_root=False
    ).collect(10)
    assert not runner.ran("nft")
    assert facts.firewall is True
    assert (facts.screen_lock, facts.screen_lock_timeout) == (True, 605)
    assert facts.auto_update is True
    assert facts.patch_age_days == int((time.time() - 1719900000) // 86400)
    assert facts.disk_encrypted is None  # findmnt absent, no sysfs under this root


def test_normal_user_with_firewalls_off_is_unknown_not_false(tmp_path: Path) -> None:
    """Without root, ufw and firewalld being off does not prove there is no firewall."""
    root = _machine(
        tmp_path, "os-release-debian12.txt", {"etc/ufw/ufw.conf": fixture(L + "ufw.conf-disabled")}
    )
    runner = ReplayRunner(
        {
            ("firewall-cmd", "--state"): Answer(
                fixture(L + "firewall-cmd-state-not-running.txt"), returncode=252
            ),
            ("apt-config", "dump", UNATTENDED): Answer(
                fixture(L + "apt-config-unattended-unset.txt")
            ),
            ("dpkg-query", "-W", "-f=${db:Status-Status}", "unattended-upgrades"): Answer(
                "", fixture(L + "dpkg-query-unattended-upgrades.stderr"), 1
            ),
        }
    )
    facts = linux_prober(runner=runner, root=root, environ={}, is_root=False).collect(10)
    assert not runner.ran("nft")
    assert not runner.ran("ufw")
    assert facts.firewall is None
    assert facts.auto_update is False
    assert facts.screen_lock is None  # no desktop session


@pytest.mark.parametrize(
    ("legacy", "expected"),
    [("ip_tables_names-empty.txt", False), ("ip_tables_names-legacy.txt", None)],
)
def test_root_reads_an_empty_ruleset_as_no_firewall(
    tmp_path: Path, legacy: str, expected: bool | None
) -> None:
    """As root an empty nftables ruleset with ufw off is False — unless legacy iptables tables
    exist, which nft cannot show."""
    root = _machine(
        tmp_path,
        "os-release-debian12.txt",
        {
            "etc/ufw/ufw.conf": fixture(L + "ufw.conf-disabled"),
            "proc/net/ip_tables_names": fixture(L + legacy),
        },
    )
    runner = ReplayRunner(
        {
            ("nft", "list", "ruleset"): Answer(fixture(L + "nft-ruleset-empty.txt")),
            ("ufw", "status"): Answer(fixture(L + "ufw-status-inactive.txt")),
            ("systemctl", "is-active", "firewalld"): Answer(
                fixture(L + "systemctl-is-active-inactive.txt"), returncode=3
            ),
        }
    )
    facts = linux_prober(runner=runner, root=root, environ={}, is_root=True).collect(10)
    assert facts.firewall is expected


def test_root_only_command_failing_with_permission_denied_is_unknown(tmp_path: Path) -> None:
    """When the ruleset command is refused (a real command failing with 'Permission denied'),
    the firewall is unknown rather than off, and nothing retries with elevation."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        denied = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            "/etc/shadow",
        ]
    else:
        denied = ["cat", "/etc/shadow"]
    seen: list[CommandResult | None] = []

    def runner(argv: Sequence[str], timeout: float) -> CommandResult | None:
        if tuple(argv) == ("nft", "list", "ruleset"):
            seen.append(run_command(denied, timeout))
            return seen[-1]
        return None

    root = _machine(tmp_path, "os-release-debian12.txt", {})
    facts = linux_prober(runner=runner, root=root, environ={}, is_root=True).collect(10)
    assert seen
    assert seen[0] is not None
    assert not seen[0].ok
    assert "Permission denied" in seen[0].stderr
    assert facts.firewall is None


# -- the real probes on this machine --------------------------------------------------------


def _real_os_release() -> dict[str, str]:
    return parse_os_release(Path("/etc/os-release").read_text(encoding="utf-8"))


def test_real_collect_on_this_machine() -> None:
    """The Linux probes run for real: os, version and kernel known; facts this machine cannot
    know (no desktop session, no Windows or macOS features) unknown; nothing raises."""
    if platform.system() != "Linux":
        pytest.skip("Linux probes")
    started = time.monotonic()
    facts = linux_prober().collect(DEFAULT_TIMEOUT)
    elapsed = time.monotonic() - started
    release = _real_os_release()
    assert facts.os == "linux"
    assert facts.os_version == release.get("VERSION_ID")
    assert facts.os_name == release.get("PRETTY_NAME")
    assert facts.kernel == platform.release()
    assert facts.antivirus is None
    assert facts.system_integrity is None
    if not os.environ.get("XDG_CURRENT_DESKTOP"):
        assert facts.screen_lock is None
        assert facts.screen_lock_timeout is None
    if not any(
        shutil.which(tool, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
        for tool in ("nft", "ufw", "firewall-cmd")
    ):
        assert facts.firewall is None  # no firewall tool to ask: unknown, not off
    if distro_family(release) == "debian":
        assert isinstance(facts.auto_update, bool)
    assert PostureFacts.from_json(facts.to_json()) == facts
    print(f"real Linux collect(): {elapsed * 1000:.0f} ms, {facts.to_json()}")


def test_real_collect_as_an_unprivileged_user() -> None:
    """Run by a normal user (root drops to `nobody` with setpriv), the real probes still answer
    what a user may read, ask for no elevation, and report the root-only ruleset as unknown."""
    if platform.system() != "Linux":
        pytest.skip("Linux probes")
    code = (
        "import json, os; from device_agent.probes.linux import linux_prober; "
        "print(json.dumps([os.geteuid(), linux_prober().collect(15).to_json()]))"
    )
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv is needed to drop root")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[3],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3]), "HOME": "/nonexistent"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    euid, facts = json.loads(result.stdout.splitlines()[-1])
    assert euid != 0
    assert facts["os"] == "linux"
    assert facts["os_version"] == _real_os_release().get("VERSION_ID")
    assert facts["kernel"] == platform.release()
    assert "sudo" not in result.stderr
    assert json.dumps(facts)  # plain JSON the report can carry


def test_fixture_readme_names_every_fixture() -> None:
    """Every fixture file is accounted for in the README (recorded or hand-written, and how)."""
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([\w.-]+)`", readme))
    for path in FIXTURES.rglob("*"):
        if path.is_file() and path.name != "README.md":
            pair = path.suffix in {".stdout", ".stderr"} and f"{path.stem}.stdout" in listed
            assert path.name in listed or pair, path.name
