"""deploy/systemd/tabiji-gateway.service run for real: systemd as PID 1 in a podman container, the
gateway installed by deploy/install.sh, a real request through it, sandboxing checked from inside,
and a restart after `kill -9`. Imports nothing from the project (it tests the installed copy).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .podman_env import BASE_IMAGE, REPO, Podman, build_image, unique_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTAINERFILE = REPO / "deploy/container/systemd/Containerfile"
UNIT = "tabiji-gateway.service"
VENV = "/opt/tabiji/venv"
BOOT_TIMEOUT = 90.0
RESTART_TIMEOUT = 30.0
# What install.sh needs from the checkout (its build copies the same set into the venv).
SOURCES = ("pyproject.toml", "README.md", "gateway", "policies", "device_agent", "deploy")

# The test's gateway config: reachable through the published port, one public route to the demo
# upstream on the container's loopback. Paths as install.sh's starting config writes them.
GATEWAY_YAML = """\
listen: {host: 0.0.0.0, port: 8080}
public_url: http://gateway.test
identity:
  session: {store: "sqlite:////var/lib/tabiji/state.db"}
assertion: {key_dir: /var/lib/tabiji/assertion-keys}
audit:
  store: "sqlite:////var/lib/tabiji/audit.db"
  spool_dir: /var/lib/tabiji/audit-spool
  key_file: /var/lib/tabiji/audit-key.pem
  checkpoint_export: /var/log/tabiji/checkpoints.jsonl
routes:
  - {name: app, from: http://app.test, to: "http://127.0.0.1:9001", public: true}
"""

UPSTREAM_UNIT = f"""\
[Unit]
Description=Demo upstream for the test (loopback only)
Before={UNIT}

[Service]
# Not DynamicUser=: inside podman it fails with 226/NAMESPACE; the test needs no sandbox here.
User=nobody
ExecStart={VENV}/bin/python -m gateway.demo.upstream --host 127.0.0.1 --port 9001

[Install]
WantedBy=multi-user.target
"""

# Every compiled extension the gateway loads, imported and exercised under the unit's own
# MemoryDenyWriteExecute / seccomp / namespace settings (copied from the unit file by the test).
# A writable+executable mapping must then be refused: proof the setting was in force.
MDWE_PROBE = """\
import asyncio, mmap, json
import uvloop, httptools, orjson, yaml, pydantic_core, watchfiles, websockets, maxminddb
import aiohttp, psycopg, psycopg_binary, multidict, yarl, frozenlist, propcache, markupsafe
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives import hashes
key = ec.generate_private_key(ec.SECP256R1())
key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
ed25519.Ed25519PrivateKey.generate().sign(b"x")
assert yaml.CSafeLoader and psycopg.pq.__impl__ == "binary", psycopg.pq.__impl__
uvloop.run(asyncio.sleep(0))
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    wx = "allowed"
except PermissionError:
    wx = "refused"
print(json.dumps({"imports": "ok", "wx": wx}))
"""


@dataclass
class Timings:
    """Measured durations (seconds), printed at the end of the module for the report."""

    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Machine:
    """The running container: its name, the published gateway port, and how to run commands."""

    podman: Podman
    name: str
    port: int
    timings: Timings

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> str:
        """Run a shell script as root inside the container; its stdout."""
        result = self.podman.run(
            "exec", self.name, "sh", "-c", script, check=check, timeout=timeout
        )
        return result.stdout

    def show(self, *props: str) -> dict[str, str]:
        """`systemctl show -p …` of the gateway unit, as a dict."""
        out = self.sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def get(self, path: str, host: str = "gateway.test") -> httpx.Response:
        """A request from the host through the published port."""
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", headers={"Host": host}, timeout=10)

    def journal(self) -> str:
        return self.sh(f"journalctl --no-pager -n 80 -u {UNIT}", check=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _copy_sources(target: Path) -> None:
    """The checkout's installable parts, without caches, venvs or VCS data."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".venv*", "node_modules", "*.egg-info")
    target.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)


def _wait_healthy(machine: Machine, timeout: float) -> float:
    """Seconds until /.tabiji/healthz answers 200 through the published port."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        try:
            response = machine.get("/.tabiji/healthz")
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"no healthy gateway within {timeout:.0f} s ({last}):\n{machine.journal()}")


def _wait_upstream(machine: Machine, timeout: float) -> None:
    """Until the demo upstream (a slower start than the gateway's) answers through the gateway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if machine.get("/headers", host="app.test").status_code == 200:
                return
        time.sleep(0.3)
    status = machine.sh("systemctl status --no-pager tabiji-test-upstream", check=False)
    pytest.fail(f"the demo upstream did not answer through the gateway:\n{status}")


@pytest.fixture(scope="module")
def machine(podman_session: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """The systemd image built with install.sh, a test layer (config, demo upstream), running."""
    pod = Podman(executable=podman_session.executable, conf=podman_session.conf)
    timings = Timings()
    try:
        context = tmp_path_factory.mktemp("systemd-image")
        _copy_sources(context / "tabiji")
        base_tag = pod.track_image(f"localhost/{unique_name('tabiji-systemd')}")
        timings.values["build (apt + install.sh)"] = build_image(
            pod, base_tag, CONTAINERFILE, context, build_args={"BASE": BASE_IMAGE}
        )
        # The test layer: this config replaces the starting one, plus the demo upstream unit.
        layer = tmp_path_factory.mktemp("systemd-test-layer")
        (layer / "gateway.yaml").write_text(GATEWAY_YAML, encoding="utf-8")
        (layer / "tabiji-test-upstream.service").write_text(UPSTREAM_UNIT, encoding="utf-8")
        (layer / "Containerfile").write_text(
            f"FROM {base_tag}\n"
            "COPY gateway.yaml /etc/tabiji/gateway.yaml\n"
            "COPY tabiji-test-upstream.service /etc/systemd/system/\n"
            "RUN chown root:tabiji /etc/tabiji/gateway.yaml"
            " && chmod 0640 /etc/tabiji/gateway.yaml"
            " && systemctl enable tabiji-test-upstream.service\n",
            encoding="utf-8",
        )
        test_tag = pod.track_image(f"localhost/{unique_name('tabiji-systemd-test')}")
        build_image(pod, test_tag, layer / "Containerfile", layer)

        name = pod.track_container(unique_name("tabiji-systemd"))
        port = _free_port()
        started = time.monotonic()
        pod.run(
            "run",
            "-d",
            "--name",
            name,
            "--systemd=always",
            "-p",
            f"127.0.0.1:{port}:8080",
            test_tag,
        )
        machine = Machine(pod, name, port, timings)
        _wait_healthy(machine, BOOT_TIMEOUT)
        timings.values["boot to healthy"] = time.monotonic() - started
        _wait_upstream(machine, BOOT_TIMEOUT)
        yield machine
    finally:
        for what, seconds in timings.values.items():
            print(f"systemd container: {what}: {seconds:.2f} s")
        errors = pod.cleanup()
        if errors:
            pytest.fail("podman cleanup failed:\n" + "\n".join(errors))


def test_unit_starts_under_systemd_and_serves(machine: Machine) -> None:
    """The installed unit is enabled, started at boot as Type=exec, and forwards a real request."""
    state = machine.show("ActiveState", "SubState", "Type", "User", "UnitFileState", "ExecMainPID")
    assert state["ActiveState"] == "active", state
    assert state["SubState"] == "running", state
    assert state["Type"] == "exec"
    assert state["User"] == "tabiji"
    assert state["UnitFileState"] == "enabled"
    assert machine.get("/.tabiji/healthz").json() == {"status": "alive"}

    response = machine.get("/headers", host="app.test")
    assert response.status_code == 200, response.text
    forwarded = dict(response.json()["headers"])
    # The demo upstream saw the request as the gateway rewrote it (request id, forwarded-for).
    assert forwarded.get("host") in {"app.test", "127.0.0.1:9001"}
    assert "x-request-id" in forwarded
    assert "x-forwarded-for" in forwarded
    assert response.headers["x-request-id"] == forwarded["x-request-id"]
    # … and the decision was audited in the state directory the sandbox leaves writable.
    assert "audit.db" in machine.sh("ls /var/lib/tabiji")


def test_sandbox_is_in_effect(machine: Machine) -> None:
    """The gateway runs as tabiji without capabilities, under seccomp, in a read-only system."""
    pid = machine.show("MainPID")["MainPID"]
    status_lines = machine.sh(f"cat /proc/{pid}/status").splitlines()
    status = {key: value.strip() for key, _, value in (x.partition(":") for x in status_lines)}
    uid = machine.sh("id -u tabiji").strip()
    assert status["Uid"].split() == [uid] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is loaded (SystemCallFilter=)
    # PrivateUsers=yes: only root and the service's own user exist in its user namespace.
    uid_map = machine.sh(f"cat /proc/{pid}/uid_map").split()
    assert uid_map == ["0", "0", "1", uid, uid, "1"]

    # Inside the service's namespaces, as its user: what it may and may not write.
    enter = f"nsenter -t {pid} -U -m --preserve-credentials -S {uid} -G {uid} sh -c "
    # Paths inside the container (its /tmp is the service's private one), not the host's.
    private_tmp = "/tmp/probe"  # noqa: S108
    probe = (
        "for p in /usr/lib/x /etc/tabiji/x /opt/tabiji/x /var/lib/tabiji/probe"
        f" /var/log/tabiji/probe {private_tmp}; do"
        " if touch $p 2>/dev/null; then echo $p=rw; rm -f $p; else echo $p=ro; fi;"
        " done; ls /home >/dev/null 2>&1 && echo home=open || echo home=closed;"
        " ls /dev | tr '\\n' ' '"
    )
    out = machine.sh(enter + shlex.quote(probe))
    lines = out.splitlines()
    access = dict(line.split("=", 1) for line in lines if "=" in line)
    assert access == {
        "/usr/lib/x": "ro",
        "/etc/tabiji/x": "ro",
        "/opt/tabiji/x": "ro",
        "/var/lib/tabiji/probe": "rw",
        "/var/log/tabiji/probe": "rw",
        private_tmp: "rw",
        "home": "closed",
    }, out
    devices = set(lines[-1].split())
    assert not devices & {"sda", "vda", "mem", "kmsg", "tpmrm0"}  # PrivateDevices=yes
    # PrivateTmp=yes: a file in the machine's /tmp is not in the service's /tmp.
    machine.sh("touch /tmp/outside-the-service")
    assert "outside-the-service" not in machine.sh(enter + shlex.quote("ls /tmp"))
    # UMask=0077: what the gateway created for itself is private to it.
    modes = machine.sh("stat -c '%a %U %n' /var/lib/tabiji /var/lib/tabiji/audit.db")
    assert modes.split() == [
        "700",
        "tabiji",
        "/var/lib/tabiji",
        "600",
        "tabiji",
        "/var/lib/tabiji/audit.db",
    ]


def test_compiled_extensions_work_under_memory_deny_write_execute(machine: Machine) -> None:
    """uvloop, cryptography, psycopg and the other C/Rust extensions run under the unit's
    MemoryDenyWriteExecute and seccomp settings, which really refuse a W+X mapping."""
    unit = (REPO / "deploy/systemd" / UNIT).read_text(encoding="utf-8")
    service = unit.split("[Service]", 1)[1].split("[Install]", 1)[0]
    keep = (
        "User=",
        "Group=",
        "NoNewPrivileges",
        "Protect",
        "Private",
        "Restrict",
        "Lock",
        "MemoryDeny",
        "SystemCall",
        "Capability",
        "Ambient",
        "UMask",
        "RemoveIPC",
    )
    sandbox = [line for line in service.splitlines() if line.startswith(keep)]
    assert "MemoryDenyWriteExecute=yes" in sandbox
    probe_unit = (
        "[Service]\nType=oneshot\nStandardOutput=file:/run/mdwe-probe.out\n"
        + "\n".join(sandbox)
        + f"\nExecStart={VENV}/bin/python /run/mdwe_probe.py\n"
    )
    script = (
        f"cat > /run/mdwe_probe.py <<'EOF'\n{MDWE_PROBE}EOF\n"
        f"cat > /etc/systemd/system/tabiji-mdwe-probe.service <<'EOF'\n{probe_unit}EOF\n"
        "chmod 0644 /run/mdwe_probe.py && systemctl daemon-reload"
        " && systemctl start tabiji-mdwe-probe.service; echo rc=$?; cat /run/mdwe-probe.out"
    )
    out = machine.sh(script, check=False)
    assert "rc=0" in out, out + machine.sh(
        "journalctl --no-pager -n 40 -u tabiji-mdwe-probe", check=False
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"imports": "ok", "wx": "refused"}


# Run in the agent's user unit (its [Service] sandbox as shipped) and again without it: the
# posture facts must not change, while the sandbox shows in what it may write and hold.
AGENT_PROBE = """\
import dataclasses, json, pathlib
from device_agent.cli import collect_facts
out = {"facts": dataclasses.asdict(collect_facts())}
home = pathlib.Path.home()
for name, path in {"home": home / "probe", "state": home / ".config/tabiji-agent/probe",
                   "usr": pathlib.Path("/usr/probe")}.items():
    try:
        path.write_text("x")
        path.unlink()
        out[name] = "rw"
    except OSError:
        out[name] = "refused"
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in {"CapBnd", "CapEff", "NoNewPrivs", "Seccomp"}:
        out[key] = value.strip()
print(json.dumps(out))
"""


def test_agent_user_unit_sandbox_keeps_probes_working(machine: Machine) -> None:
    """deploy/agent/tabiji-agent.service under a user's own systemd (PrivateUsers=yes and all):
    the posture probes see the same facts as without it, while $HOME and /usr are read-only and
    no capability is left."""
    unit = (REPO / "deploy/agent/tabiji-agent.service").read_text(encoding="utf-8")
    # Only the program changes (oneshot running the probe); every sandbox line stays as shipped.
    unit = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={VENV}/bin/python /opt/agent_probe.py", unit)
    unit = re.sub(r"(?m)^Type=simple$", "Type=oneshot", unit)
    unit = re.sub(r"(?m)^Restart=.*$", "", unit)
    assert "PrivateUsers=yes" in unit
    script = (
        f"cat > /opt/agent_probe.py <<'EOF'\n{AGENT_PROBE}EOF\n"
        "chmod 0644 /opt/agent_probe.py\n"
        "id clerk >/dev/null 2>&1 || useradd --create-home clerk\n"
        "uid=$(id -u clerk)\n"
        "d=/home/clerk/.config/systemd/user; mkdir -p $d /home/clerk/.config/tabiji-agent\n"
        f"cat > $d/tabiji-agent.service <<'EOF'\n{unit}EOF\n"
        "chown -R clerk: /home/clerk/.config\n"
        "systemctl start user@$uid.service\n"
        "runuser -u clerk -- env XDG_RUNTIME_DIR=/run/user/$uid sh -c"
        " 'systemctl --user daemon-reload && systemctl --user start tabiji-agent.service"
        " && systemctl --user show -p Result --value tabiji-agent.service' >&2\n"
        "journalctl --no-pager -o cat _UID=$uid | grep '^{\"facts' | tail -1\n"
        f"runuser -u clerk -- {VENV}/bin/python /opt/agent_probe.py\n"
    )
    result = machine.podman.run("exec", machine.name, "sh", "-c", script, check=False, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    sandboxed, plain = (json.loads(line) for line in lines)
    assert sandboxed["facts"] == plain["facts"]
    assert (plain["home"], plain["state"]) == ("rw", "rw")  # the user may write both …
    assert (sandboxed["home"], sandboxed["state"], sandboxed["usr"]) == ("refused", "rw", "refused")
    assert int(sandboxed["CapBnd"], 16) == 0
    assert int(plain["CapBnd"], 16) != 0
    assert sandboxed["NoNewPrivs"] == "1"
    assert sandboxed["Seccomp"] == "2"


def test_installed_venv_is_consistent(machine: Machine) -> None:
    """Every requirement of every package in the venv built from the lock is installed, for the
    target machine's own Python (markers such as python_full_version are evaluated there)."""
    result = machine.podman.run(
        "exec", machine.name, f"{VENV}/bin/python", "-m", "pip", "check", check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_script_rerun_is_idempotent(machine: Machine) -> None:
    """install.sh run again keeps the config and venv, restarts the service, and it serves."""
    before = machine.sh("sha256sum /etc/tabiji/gateway.yaml /etc/tabiji/policies/policies.yaml")
    out = machine.sh("/usr/src/tabiji/deploy/install.sh 2>&1", timeout=300)
    assert "venv /opt/tabiji/venv is up to date" in out, out
    assert "keeping /etc/tabiji/gateway.yaml" in out, out
    assert "running:" in out, out
    assert machine.sh("sha256sum /etc/tabiji/gateway.yaml /etc/tabiji/policies/policies.yaml") == (
        before
    )
    assert machine.sh("getent passwd tabiji | cut -d: -f7").strip() in {
        "/usr/sbin/nologin",
        "/sbin/nologin",
    }
    _wait_healthy(machine, RESTART_TIMEOUT)


def test_restarts_after_kill_9(machine: Machine) -> None:
    """`kill -9` of the main process: systemd restarts it (NRestarts + 1) and it serves again."""
    before = machine.show("MainPID", "NRestarts")
    machine.sh(f"kill -9 {before['MainPID']}")
    killed = time.monotonic()
    deadline = killed + RESTART_TIMEOUT
    while time.monotonic() < deadline:
        now = machine.show("MainPID", "NRestarts", "ActiveState")
        if (
            now["ActiveState"] == "active"
            and now["MainPID"] not in {"0", before["MainPID"]}
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"not restarted: {now}\n{machine.journal()}")
    machine.timings.values["kill -9 to restarted"] = time.monotonic() - killed
    _wait_healthy(machine, RESTART_TIMEOUT)
    machine.timings.values["kill -9 to serving again"] = time.monotonic() - killed
    assert machine.get("/headers", host="app.test").status_code == 200
    assert "code=killed, status=9/KILL" in machine.journal()


def test_stop_is_graceful(machine: Machine) -> None:
    """`systemctl stop` sends SIGTERM and the gateway exits 0 on its own, well before SIGKILL."""
    started = time.monotonic()
    machine.sh(f"systemctl stop {UNIT}", timeout=90)
    machine.timings.values["systemctl stop"] = time.monotonic() - started
    state = machine.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state["ActiveState"] == "inactive"
    assert state["Result"] == "success", state  # not "timeout", not "signal"
    assert state["ExecMainStatus"] == "0", state
    machine.sh(f"systemctl start {UNIT}")
    _wait_healthy(machine, RESTART_TIMEOUT)
