"""The shipped systemd units checked offline on this host: `systemd-analyze verify` and `security
--offline` (exposure score and which protections are on), plus what the units promise against the
gateway's settings and deploy/install.sh. No container; skips (fails under CI) without
systemd-analyze.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.settings import Server

from .podman_env import REPO, must_have

GATEWAY_UNIT = REPO / "deploy/systemd/tabiji-gateway.service"
AGENT_UNIT = REPO / "deploy/agent/tabiji-agent.service"
INSTALL = REPO / "deploy/install.sh"
VENV_BIN = Path(sys.executable).parent

# What `security --offline` still counts against the gateway, each for a reason that holds:
GATEWAY_EXPOSED = {
    # It reaches upstreams, identity providers, Redis and PostgreSQL, and serves clients.
    "PrivateNetwork=",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    # Local Redis/PostgreSQL sockets, the journal's /dev/log.
    "RestrictAddressFamilies=~AF_UNIX",
    # Which addresses a town's upstreams live at is the operator's to say (a drop-in).
    "IPAddressDeny=",
    # ProtectClock= itself adds char-rtc:r to the device ACL.
    "DeviceAllow=",
    # A venv under /opt, not a RootImage.
    "RootDirectory=/RootImage=",
}
GATEWAY_MAX_EXPOSURE = 1.2  # measured 1.1 with systemd 252
# The agent's user unit, and why each remaining check is open (deploy/agent/README.md):
AGENT_EXPOSED = {
    # Offline analysis scores a user unit as if it ran as root; a user manager runs it as the user.
    "User=/DynamicUser=",
    # The gateway, the loopback server for the browser, the D-Bus session bus, netlink probes.
    "PrivateNetwork=",
    "IPAddressDeny=",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_NETLINK",
    # The TPM at /dev/tpmrm0; tpm2-pytss's cffi callbacks need writable-executable memory.
    "PrivateDevices=",
    "DeviceAllow=",
    "MemoryDenyWriteExecute=",
    # Desktop settings under $HOME (read-only); the user's own processes (screen locker) and
    # /proc/net (firewall) for the probes.
    "ProtectHome=",
    "ProtectProc=",
    "ProcSubset=",
    "RootDirectory=/RootImage=",
}
AGENT_MAX_EXPOSURE = 2.0  # measured 2.0 (4.4 before CapabilityBoundingSet=, PrivateMounts=, …)


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    must_have(found is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert found is not None
    return found


def _host_copy(unit: Path, target_dir: Path) -> Path:
    """The unit with its program paths pointed at this checkout's venv.

    `systemd-analyze verify` checks that every Exec*= program exists on *this* host, and the
    shipped paths (/opt/tabiji/venv/bin, ~/.local/bin) are where install.sh and pipx put them on
    the target machine, not here. Only those paths change; every other line is verified as shipped.
    """
    text = unit.read_text(encoding="utf-8")
    text = text.replace("/opt/tabiji/venv/bin/", f"{VENV_BIN}/")
    text = text.replace("%h/.local/bin/", f"{VENV_BIN}/")
    copy = target_dir / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"  # a user manager's lookup paths need XDG_RUNTIME_DIR
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), SYSTEMD_LOG_LEVEL="notice")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)


def _security(unit: Path, tmp_path: Path, *, user: bool) -> tuple[float, set[str]]:
    """The overall exposure score and the names of the checks that count against the unit."""
    scope = ["--user"] if user else []
    text = _run([_analyze(), "security", "--offline=true", *scope, str(unit)], tmp_path)
    assert text.returncode == 0, text.stderr
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", text.stdout)
    assert score is not None, text.stdout
    as_json = _run(
        [_analyze(), "security", "--offline=true", "--json=short", *scope, str(unit)], tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    exposed = {item["name"] for item in json.loads(as_json.stdout) if item["set"] is False}
    return float(score.group(1)), exposed


def _directives(unit: Path) -> dict[str, list[str]]:
    """Key → values (in order) of the unit's [Service] section."""
    section = unit.read_text(encoding="utf-8").split("[Service]", 1)[1].split("\n[", 1)[0]
    found: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_gateway_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the gateway unit: known keys, valid values, real programs."""
    result = _run([_analyze(), "verify", str(_host_copy(GATEWAY_UNIT, tmp_path))], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # not even a warning


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check is real: a misspelt key and a missing program make verify complain."""
    broken = _host_copy(GATEWAY_UNIT, tmp_path)
    text = broken.read_text(encoding="utf-8").replace("NoNewPrivileges=", "NoNewPrivilege=")
    broken.write_text(text.replace(f"{VENV_BIN}/tabiji ", "/nonexistent/tabiji "), "utf-8")
    result = _run([_analyze(), "verify", str(broken)], tmp_path)
    assert "Unknown key 'NoNewPrivilege'" in result.stderr
    assert "/nonexistent/tabiji" in result.stderr
    assert result.returncode != 0


def test_gateway_unit_exposure(tmp_path: Path) -> None:
    """The gateway scores at most 1.2 and only the expected checks count against it."""
    score, exposed = _security(_host_copy(GATEWAY_UNIT, tmp_path), tmp_path, user=False)
    print(f"systemd-analyze security --offline: tabiji-gateway.service {score}")
    assert exposed == GATEWAY_EXPOSED
    assert score <= GATEWAY_MAX_EXPOSURE


def test_dropping_a_protection_raises_the_exposure(tmp_path: Path) -> None:
    """The score check bites: without MemoryDenyWriteExecute= and PrivateDevices= it rises."""
    weaker = _host_copy(GATEWAY_UNIT, tmp_path)
    text = weaker.read_text(encoding="utf-8")
    text = text.replace("MemoryDenyWriteExecute=yes\n", "").replace("PrivateDevices=yes\n", "")
    weaker.write_text(text, encoding="utf-8")
    score, exposed = _security(weaker, tmp_path, user=False)
    assert {"MemoryDenyWriteExecute=", "PrivateDevices="} <= exposed
    assert score > GATEWAY_MAX_EXPOSURE


def test_gateway_unit_runs_unprivileged_and_stops_gracefully() -> None:
    """As a system user, with no capability at all, and the stop timeout above the gateway's
    own graceful-shutdown default (so SIGKILL never cuts in-flight requests short)."""
    service = _directives(GATEWAY_UNIT)
    assert service["Type"] == ["exec"]  # uvicorn sends no sd_notify
    assert service["User"] == ["tabiji"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["AmbientCapabilities"] == [""]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]
    stop = service["TimeoutStopSec"][0]
    assert stop.endswith("s")
    assert float(stop[:-1]) > Server().graceful_shutdown
    assert service["Restart"] == ["on-failure"]
    assert service["ExecStart"] == [
        "/opt/tabiji/venv/bin/tabiji serve --config /etc/tabiji/gateway.yaml"
    ]


def test_install_config_writes_only_where_the_unit_allows() -> None:
    """Every path the starting config of install.sh makes the gateway write lies in the unit's
    StateDirectory or LogsDirectory: anything else is read-only under ProtectSystem=strict."""
    script = INSTALL.read_text(encoding="utf-8")
    body = script.split("cat >\"$tmp\" <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    config = yaml.safe_load(body)
    service = _directives(GATEWAY_UNIT)
    writable = [
        Path("/var/lib") / service["StateDirectory"][0],
        Path("/var/log") / service["LogsDirectory"][0],
    ]
    written = [
        config["identity"]["session"]["store"].removeprefix("sqlite:///"),
        config["assertion"]["key_dir"],
        config["audit"]["store"].removeprefix("sqlite:///"),
        config["audit"]["spool_dir"],
        config["audit"]["key_file"],
        config["audit"]["checkpoint_export"],
    ]
    for path in written:
        assert any(Path(path).is_relative_to(d) for d in writable), path
    assert config["listen"]["host"] == "127.0.0.1"  # nothing exposed before it is configured
    assert all(route.get("public") is not True for route in config["routes"])


def test_install_script_parses_and_explains_its_options(tmp_path: Path) -> None:
    """install.sh is valid bash, documents its options, and refuses bad ones before any change."""
    assert subprocess.run(["bash", "-n", str(INSTALL)], check=False).returncode == 0
    helped = subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0
    for option in ("--prefix", "--no-start", "--no-enable", "--python", "--source"):
        assert option in helped.stdout
    wrong = subprocess.run([str(INSTALL), "--bogus"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2
    relative = subprocess.run(
        [str(INSTALL), "--prefix", "opt/tabiji"], capture_output=True, text=True, check=False
    )
    assert relative.returncode == 1
    assert "absolute path" in relative.stderr
    # The prefix is written into ExecStart=: no spaces, quotes or specifiers (%).
    odd = subprocess.run(
        [str(INSTALL), "--prefix", "/opt/tabiji %h"], capture_output=True, text=True, check=False
    )
    assert odd.returncode == 1
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        lint = subprocess.run(
            [shellcheck, str(INSTALL)], capture_output=True, text=True, check=False
        )
        assert lint.returncode == 0, lint.stdout


def test_agent_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify --user accepts the device agent's user unit."""
    result = _run([_analyze(), "verify", "--user", str(_host_copy(AGENT_UNIT, tmp_path))], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_agent_unit_exposure(tmp_path: Path) -> None:
    """The agent's user unit scores at most 2.0 and only the expected checks count against it."""
    score, exposed = _security(_host_copy(AGENT_UNIT, tmp_path), tmp_path, user=True)
    print(f"systemd-analyze security --offline --user: tabiji-agent.service {score}")
    assert exposed == AGENT_EXPOSED
    assert score <= AGENT_MAX_EXPOSURE
