"""A whole device-trust deployment for the end-to-end journey: swtpm, the test OpenID Provider, the
gateway over TLS with a `devices:` section (SQLite store, device CA, swtpm's local CA trusted for
TPM attestation, auto-approval for staff) and the audit trail on, and the real `tabiji-agent`
run as subprocesses with its own home directory and the swtpm TCTI.

`device_env(...)` starts everything and stops every process by PID however the block ends.
Test helper only (no tests here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.swtpm_fixture import ProvisionedTpm, Swtpm, running_swtpm

from .audit_env import audit_block, must_have, sqlite_url
from .conftest import _LIVE, REPO, Gateway, Upstream, free_port, route, stop_process, wait_healthy
from .identity_env import CLIENT_SECRET, IdentityEnv, gateway_clients
from .idp_fixture import idp_available, make_ca, start_idp

STAFF = "suzuki"  # a member of staff of the test provider (group staff, password only)
AGENT_STOP_TIMEOUT = 15.0
# The device route: an approved device of the user's, its key verified in a TPM, its disk
# encrypted, its posture no older than 10 minutes (policies/README.md, `device` criterion).
POLICIES: dict[str, Any] = {
    "policies": [
        {"name": "signed-in", "allow": {"authenticated": True}},
        {"name": "staff-laptops", "allow": {"name": "staff", "group": "staff"}},
        {
            "name": "secure-device",
            "allow": {
                "name": "staff-on-encrypted-tpm-device",
                "all": [
                    {"authenticated": True},
                    {
                        "device": {
                            "approved": True,
                            "owned_by_user": True,
                            "key_storage": ["tpm"],
                            "posture": {"disk_encrypted": True, "max_age": "10m"},
                        }
                    },
                ],
            },
        },
        {
            "name": "own-tpm-device",
            "allow": {
                "name": "own-tpm-device",
                "all": [
                    {"authenticated": True},
                    {"device": {"approved": True, "owned_by_user": True, "key_storage": ["tpm"]}},
                ],
            },
        },
    ]
}
CERT_HEADER = "X-Client-Cert"
GOOD_FACTS: dict[str, Any] = {
    "os": "linux",
    "os_version": "12",
    "disk_encrypted": True,
    "firewall": True,
    "screen_lock": True,
    "screen_lock_timeout": 300,
    "auto_update": True,
}


def require_device_components() -> None:
    """Skip (fail when CI=true) unless swtpm, tpm2-pytss, node + oidc-provider, Chromium and
    playwright are all here: the journey needs every one of them for real."""
    from tests.swtpm_fixture import require_swtpm

    require_swtpm()
    idp_available()
    must_have(
        importlib.util.find_spec("tpm2_pytss") is not None,
        "tpm2-pytss is not installed: the agent would keep its key in a file, not in the TPM",
    )
    must_have(
        Path(shutil.which("chromium") or "/usr/bin/chromium").exists(),
        "Debian chromium is not installed (apt-get install chromium)",
    )
    must_have(
        importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip)"
    )


def free_port_range(count: int) -> tuple[int, ...]:
    """`count` consecutive free ports on 127.0.0.1 (the agent's loopback range)."""
    for _attempt in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
        return tuple(range(first, first + count))
    raise RuntimeError("no free range of loopback ports")


# -- the agent as a process ------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """A long-running `tabiji-agent` subprocess whose output lines are collected by a thread."""

    process: subprocess.Popen[str]
    name: str
    lines: list[str] = field(default_factory=list)
    _new: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _readers: list[threading.Thread] = field(default_factory=list)

    def start_reading(self) -> None:
        for stream in (self.process.stdout, self.process.stderr):
            assert stream is not None
            reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for_line(self, match: Callable[[str], bool], timeout: float) -> str:
        """The first output line (so far or to come) for which `match` holds; fails at timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{self.name}: no such line within {timeout:.0f} s:\n{self.output()}")
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.2))
            if self.process.poll() is not None and self._new.empty() and self._drained():
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                pytest.fail(f"{self.name} exited ({self.process.returncode}):\n{self.output()}")

    def _drained(self) -> bool:
        return all(not reader.is_alive() for reader in self._readers)

    def wait(self, timeout: float) -> int:
        """The exit code once the process ends by itself; fails (and stops it) at timeout."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.name} did not finish within {timeout:.0f} s:\n{self.output()}")
        for reader in self._readers:
            reader.join(5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        """SIGTERM by PID, SIGKILL after a grace period; the exit code."""
        code = stop_process(self.process, AGENT_STOP_TIMEOUT)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code


@dataclass
class Agent:
    """The real `tabiji-agent` of one staff laptop: its home, its TPM, its facts override."""

    home: Path
    tcti: str
    ca_file: Path
    facts_file: Path
    ports: tuple[int, ...]
    running: list[AgentProcess] = field(default_factory=list)

    @staticmethod
    def executable() -> list[str]:
        """The installed console script (as on a laptop), else the module."""
        script = Path(sys.executable).with_name("tabiji-agent")
        return [str(script)] if script.exists() else [sys.executable, "-m", "device_agent.cli"]

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TABIJI_", "LC_"))}
        env.update(
            TABIJI_AGENT_HOME=str(self.home),
            TABIJI_AGENT_TCTI=self.tcti,
            TABIJI_AGENT_FACTS_FILE=str(self.facts_file),
            LANG="ja_JP.UTF-8",  # a Japanese staff laptop: the agent speaks Japanese
            PYTHONUNBUFFERED="1",
        )
        return env

    def set_facts(self, **changes: Any) -> None:
        """Rewrite the facts override (whole file, renamed into place: never half-read)."""
        facts = {**GOOD_FACTS, **changes}
        temporary = self.facts_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(facts), "utf-8")
        os.replace(temporary, self.facts_file)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """One short command (`status`, `proof`, …) to its end."""
        return subprocess.run(
            [*self.executable(), *args],
            cwd=self.home.parent,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        done = self.run("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def start(self, *args: str) -> AgentProcess:
        """A long-running command (`enroll`, `run`), stopped by PID at the latest at teardown."""
        process = subprocess.Popen(
            [*self.executable(), *args],
            cwd=self.home.parent,
            env=self.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        live = AgentProcess(process, f"tabiji-agent {args[0]}")
        live.start_reading()
        self.running.append(live)
        return live

    def stop_all(self) -> None:
        for live in self.running:
            live.stop()
        self.running.clear()


# -- the deployment --------------------------------------------------------------------------------


@dataclass
class DeviceEnv:
    """The running deployment and the laptop's agent."""

    identity: IdentityEnv
    swtpm: Swtpm
    agent: Agent
    directory: Path
    values: dict[str, Any] = field(default_factory=dict)  # what tests learn along the way

    @property
    def p(self) -> str:
        return self.identity.p

    @property
    def config(self) -> Path:
        return self.identity.gateway.config_path

    def devices_show(self, device_id: str) -> dict[str, Any]:
        """`tabiji devices show ID --json`, as IT runs it against the gateway's config."""
        done = self.identity.cli("devices", "show", device_id, "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def _config(
    directory: Path,
    port: int,
    upstream: Upstream,
    *,
    issuer: str,
    ca_path: Path,
    tls: tuple[Path, Path],
    attestation_cas: tuple[Path, ...],
    loopback_ports: tuple[int, ...],
) -> dict[str, Any]:
    p = f"https://127.0.0.1:{port}"
    up = upstream.origin
    policy_dir = directory / "policies"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / "policies.yaml").write_text(yaml.safe_dump(POLICIES, allow_unicode=True))
    secret = directory / "client.secret"
    secret.write_text(CLIENT_SECRET)
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "public_url": p,
        "tls": {"cert": str(tls[0]), "key": str(tls[1])},
        "policies": {"dir": str(policy_dir), "watch": "poll"},
        "identity": {
            "session": {"store": sqlite_url(directory / "state.db")},
            "rate_limit": {"per_minute": 600, "burst": 200},
            "providers": [
                {
                    "name": "town",
                    "display_name": {"ja": "役場", "en": "Town hall"},
                    "issuer": issuer,
                    "client_id": "tabiji",
                    "client_secret_file": str(secret),
                    "scopes": ["openid", "email", "profile", "groups"],
                    "ca_bundle": str(ca_path),
                }
            ],
        },
        "assertion": {"key_dir": str(directory / "keys")},
        "devices": {
            "store": sqlite_url(directory / "devices.db"),
            "ca_dir": str(directory / "device-ca"),
            "auto_approve_policy": "staff-laptops",
            "attestation_ca_files": [str(path) for path in attestation_cas],
            "loopback_ports": list(loopback_ports),
            "client_cert_header": CERT_HEADER,
        },
        "audit": audit_block(directory),
        "routes": [
            route("records", p + "/records", up, policy="secure-device"),
            route("own", p + "/own", up, policy="own-tpm-device"),
            route("plain", p + "/plain", up, policy="signed-in"),
        ],
    }


@contextlib.contextmanager
def device_env(
    directory: Path, upstream: Upstream, tpm_template: ProvisionedTpm
) -> Iterator[DeviceEnv]:
    """swtpm (a fresh copy of the provisioned chip), the provider, the gateway (TLS) and an agent
    home; every process stopped by PID on the way out, in reverse order."""
    require_device_components()
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        swtpm = stack.enter_context(running_swtpm(directory / "swtpm", tpm_template))
        ca = make_ca(directory / "ca")
        port = free_port()
        idp = start_idp(directory / "idp", ca, name="op", clients=gateway_clients(port))
        stack.callback(idp.stop)
        loopback_ports = free_port_range(2)
        config = _config(
            directory,
            port,
            upstream,
            issuer=idp.issuer,
            ca_path=Path(ca.ca_path),
            tls=ca.issue(["127.0.0.1", "localhost"], directory / "gw-tls"),
            attestation_cas=swtpm.ca_cert_pem_paths,
            loopback_ports=loopback_ports,
        )
        config_path = directory / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        stderr_path = directory / "gateway.stderr.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=stderr, stderr=subprocess.STDOUT
            )
        gateway = Gateway(port, process, config_path, stderr_path, scheme="https")
        _LIVE.append(gateway)
        stack.callback(_LIVE.remove, gateway)
        stack.callback(gateway.stop)
        wait_healthy(gateway, verify=ssl.create_default_context(cafile=str(ca.ca_path)))
        home = directory / "laptop" / "tabiji-agent"
        home.parent.mkdir(parents=True)
        agent = Agent(
            home=home,
            tcti=swtpm.tcti,
            ca_file=Path(ca.ca_path),
            facts_file=directory / "laptop" / "facts.json",
            ports=loopback_ports,
        )
        agent.set_facts()
        stack.callback(agent.stop_all)  # first out: the agent before its gateway and its TPM
        identity = IdentityEnv(idp, gateway, upstream, ca, directory)
        yield DeviceEnv(identity, swtpm, agent, directory)


# -- a trusted mTLS ingress (nginx) ----------------------------------------------------------------

INGRESS_SOURCE = "127.0.0.2"  # nginx connects to the gateway from here: the one trusted proxy
START_TIMEOUT_NGINX = 15.0
NGINX_STOP_TIMEOUT = 10.0
_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format mtls '$remote_addr "$request" $status verify=$ssl_client_verify';
    access_log {dir}/access.log mtls;
    # Temp paths in the prefix dir (the Debian defaults may not exist); bodies stay in memory.
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        # Only the gateway's device CA vouches for a client; nginx checks signature and dates.
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        ssl_verify_depth 1;
        location / {{
            proxy_pass http://127.0.0.1:{gateway_port};
            proxy_bind {source};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header {header} $ssl_client_escaped_cert;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


@dataclass
class Ingress:
    """nginx terminating TLS, verifying client certificates and forwarding them to the gateway."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def logs(self) -> str:
        """nginx's error and access logs, for a failing assertion's message."""
        parts = []
        for name in ("error.log", "access.log", "stderr.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"-- nginx {name}\n" + path.read_text("utf-8", "replace")[-4000:])
        return "\n".join(parts)


def require_nginx() -> str:
    """The nginx binary; skip (fail when CI=true) without Debian's nginx."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    must_have(found is not None, "Debian nginx is not installed (apt-get install nginx)")
    assert found is not None
    return found


@contextlib.contextmanager
def mtls_ingress(
    directory: Path,
    *,
    gateway_port: int,
    tls: tuple[Path, Path],
    client_ca: Path,
    port: int | None = None,
    header: str = CERT_HEADER,
    source: str = INGRESS_SOURCE,
) -> Iterator[Ingress]:
    """nginx on 127.0.0.1:`port` (TLS, `ssl_verify_client on` against `client_ca`) proxying to
    the gateway from `source`, the verified certificate in `header`; stopped by PID at the end."""
    nginx = require_nginx()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    port = port or free_port()
    conf = directory / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            dir=directory,
            port=port,
            cert=tls[0],
            key=tls[1],
            client_ca=client_ca,
            gateway_port=gateway_port,
            source=source,
            header=header,
        )
    )
    command = [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")]
    with (directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT)
    ingress = Ingress(port, process, directory)
    try:
        deadline = time.monotonic() + START_TIMEOUT_NGINX
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited with {process.returncode}:\n{ingress.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not listen within {START_TIMEOUT_NGINX:.0f} s")
            time.sleep(0.05)
        yield ingress
    finally:
        stop_process(process, NGINX_STOP_TIMEOUT)
