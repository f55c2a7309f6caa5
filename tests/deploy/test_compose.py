"""deploy/compose.yaml brought up with podman-compose: two gateway replicas behind nginx on Redis
and PostgreSQL, the demo identity provider behind TLS and the demo upstream; a demo user signs
in through the load balancer and is served by each replica; the audit trail in PostgreSQL holds
both replicas' records and verifies. Brought down, volumes and all, at the end.

The images build on the local debootstrap base (no registry here). The host resolves neither
gateway.tabiji.test nor idp.tabiji.test, so the test's HTTP client maps those names to the
published loopback ports — the URLs, Host headers, cookies and TLS names stay the real ones.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx
import pytest

from .conftest import TEST_BASE, free_port, sign_in, wait_until
from .podman_env import REPO, Podman, drop_superseded, image_id, must_have, unique_name

pytestmark = pytest.mark.integration

COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SETUP = REPO / "deploy" / "container" / "demo-setup.sh"
IMAGE_PREFIX = "localhost/tabiji-test"  # conftest.GATEWAY_IMAGE is IMAGE_PREFIX + "-gateway"
GATEWAY = "gateway.tabiji.test"
IDP = "idp.tabiji.test"
PUBLIC = f"http://{GATEWAY}:8080"
SERVICES = ("redis", "postgres", "idp", "upstream", "gateway-a", "gateway-b", "lb")
HEALTHCHECKED = SERVICES
UP_TIMEOUT = 180.0
DATA_IMAGES = ("redis", "postgres", "nginx")  # IMAGE_PREFIX-NAME, kept as the machine's cache


def podman_compose() -> str | None:
    """podman-compose from the tools venv (deploy/tools.sh), else from PATH."""
    tools = REPO / ".venv-tools" / "bin" / "podman-compose"
    if tools.exists():
        return str(tools)
    return shutil.which("podman-compose")


def free_subnet(podman: Podman) -> ipaddress.IPv4Network:
    """A /24 in 10.89.128.0/17 that no podman network on this machine uses."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    names = podman.run("network", "ls", "--format", "{{.Name}}").stdout.split()
    for name in names:
        inspected = json.loads(podman.run("network", "inspect", name).stdout)
        for network in inspected:
            for subnet in network.get("subnets") or []:
                used.append(ipaddress.ip_network(subnet["subnet"]))
    for _ in range(100):
        candidate = ipaddress.IPv4Network(f"10.89.{random.randrange(128, 255)}.0/24")
        if not any(candidate.overlaps(other) for other in used):
            return candidate
    pytest.fail("no free 10.89.x.0/24 subnet for the compose network")


class MappedTransport(httpx.BaseTransport):
    """Sends requests for `names` (host, port) to loopback ports, keeping the URL's Host header
    and, for HTTPS, its TLS server name — what /etc/hosts plus the published ports would do."""

    def __init__(self, names: Mapping[tuple[str, int], int], verify: ssl.SSLContext) -> None:
        self.names = dict(names)
        self.inner = httpx.HTTPTransport(verify=verify)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        port = self.names.get((request.url.host, request.url.port or 80))
        if port is None:
            raise httpx.ConnectError(f"no mapping for {request.url.host}:{request.url.port}")
        extensions = dict(request.extensions)
        if request.url.scheme == "https":
            extensions["sni_hostname"] = request.url.host
        mapped = httpx.Request(
            request.method,
            request.url.copy_with(host="127.0.0.1", port=port),
            headers=request.headers,  # Host: still the real name and port
            stream=request.stream,
            extensions=extensions,
        )
        return self.inner.handle_request(mapped)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Stack:
    """The running compose project and how to reach it from the host."""

    podman: Podman
    compose: list[str]
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    ca: ssl.SSLContext

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def client(self, gateway_port: int | None = None) -> httpx.Client:
        """A browser-like client: the gateway name goes to the load balancer (or one replica)."""
        names = {
            (GATEWAY, 8080): gateway_port or self.ports["http"],
            (IDP, 9443): self.ports["idp"],
        }
        return httpx.Client(
            transport=MappedTransport(names, self.ca), timeout=20, follow_redirects=True
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {service}\n{self.podman.logs(self.container(service), tail=40)}"
            for service in SERVICES
        )

    def exec(self, service: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.container(service), *command, check=False)


def healthy(stack: Stack) -> bool:
    """Every healthchecked container passes `podman healthcheck run` and the LB answers."""
    for service in HEALTHCHECKED:
        result = stack.podman.run(
            "healthcheck", "run", stack.container(service), check=False, timeout=60
        )
        if result.returncode != 0:
            return False
    try:
        with stack.client() as client:
            return client.get(PUBLIC + "/.tabiji/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def leftovers(podman: Podman, project: str) -> dict[str, list[str]]:
    """Containers, volumes and networks still labelled with the compose project."""
    label = f"label=io.podman.compose.project={project}"
    found: dict[str, list[str]] = {}
    for kind, args in (
        ("containers", ("ps", "-a", "--filter", label, "--format", "{{.Names}}")),
        ("volumes", ("volume", "ls", "--filter", label, "--format", "{{.Name}}")),
        ("networks", ("network", "ls", "--filter", label, "--format", "{{.Name}}")),
    ):
        found[kind] = podman.run(*args, check=False).stdout.split()
    return found


@pytest.fixture(scope="module")
def stack(
    podman_session: Podman, gateway_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """deploy/compose.yaml up (a unique project name, free ports, a free subnet), healthy;
    afterwards `down -v`, then anything still labelled with the project is removed by name."""
    executable = podman_compose()
    must_have(executable is not None, "podman-compose is not installed (deploy/tools.sh)")
    assert executable is not None
    podman = Podman(executable=podman_session.executable, conf=podman_session.conf)
    secrets = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run([str(SETUP), str(secrets)], check=True, capture_output=True, timeout=60)
    passwords = dict(
        line.split("=", 1) for line in (secrets / "compose.env").read_text().split() if line
    )
    subnet = free_subnet(podman)
    ports = {name: free_port() for name in ("http", "idp", "a", "b")}
    project = unique_name("tabiji-test")
    env = {
        "TABIJI_BASE_IMAGE": TEST_BASE,
        "TABIJI_IMAGE_PREFIX": IMAGE_PREFIX,
        "TABIJI_SECRETS_DIR": str(secrets),
        "TABIJI_HTTP_PORT": str(ports["http"]),
        "TABIJI_IDP_PORT": str(ports["idp"]),
        "TABIJI_GATEWAY_A_PORT": str(ports["a"]),
        "TABIJI_GATEWAY_B_PORT": str(ports["b"]),
        "TABIJI_EDGE_SUBNET": str(subnet),
        "TABIJI_LB_ADDRESS": str(subnet.network_address + 10),
        "BUILDAH_FORMAT": "docker",  # keep the images' HEALTHCHECKs
        **passwords,
    }
    compose = [executable, "-p", project, "-f", str(COMPOSE_FILE)]
    stack = Stack(
        podman,
        compose,
        project,
        env,
        ports,
        ssl.create_default_context(cafile=str(secrets / "ca.pem")),
    )
    try:
        started = time.monotonic()
        # The data-service images are a per-machine cache like the base and gateway images:
        # rebuilt through the layer cache (seconds when nothing changed).
        cached = {name: image_id(podman, f"{IMAGE_PREFIX}-{name}") for name in DATA_IMAGES}
        podman.command([*compose, "build", "redis", "postgres", "lb"], extra_env=env, timeout=900)
        for name, before in cached.items():
            drop_superseded(podman, f"{IMAGE_PREFIX}-{name}", before)
        built = time.monotonic() - started
        podman.command([*compose, "up", "-d"], extra_env=env, timeout=600)
        up = time.monotonic() - started - built
        ready = wait_until(
            lambda: healthy(stack), UP_TIMEOUT, "the compose stack healthy", stack.logs
        )
        print(f"compose: service images {built:.1f}s, up {up:.1f}s, healthy after {ready:.1f}s")
        yield stack
    finally:
        # Containers first, with their anonymous volumes (`down -v` keeps those), then the rest.
        podman.containers += leftovers(podman, project)["containers"]
        errors = podman.cleanup()
        down = podman.command(
            [*compose, "down", "-v", "-t", "5"], extra_env=env, check=False, timeout=300
        )
        left = leftovers(podman, project)
        podman.volumes += left["volumes"]
        podman.networks += left["networks"]
        errors += podman.cleanup()
        shutil.rmtree(secrets, ignore_errors=True)
        if down.returncode != 0 or errors:
            pytest.fail(f"compose down failed: {down.stderr[-2000:]}\n{errors}")


def test_every_service_runs_unprivileged_on_a_read_only_root(stack: Stack) -> None:
    """Each container has a read-only root, no capabilities, no-new-privileges and a non-root
    user; only 127.0.0.1 is published; Redis and PostgreSQL refuse clients without the password."""
    for service in SERVICES:
        inspected = json.loads(stack.podman.run("inspect", stack.container(service)).stdout)[0]
        host = inspected["HostConfig"]
        assert host["ReadonlyRootfs"] is True, service
        assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or []), service
        uid = stack.exec(service, "id", "-u").stdout.strip()
        assert uid not in {"", "0"}, f"{service} runs as uid {uid!r}"
        effective = stack.exec(service, "sh", "-c", "grep CapEff /proc/1/status").stdout
        assert effective.split()[-1] == "0000000000000000", f"{service}: {effective}"
        for bindings in (host.get("PortBindings") or {}).values():
            for binding in bindings or []:
                assert binding["HostIp"] == "127.0.0.1", (service, binding)
        written = stack.exec(service, "sh", "-c", "echo x > /usr/tabiji-probe")
        assert written.returncode != 0, f"{service}: the root file system is writable"
    anonymous = stack.exec("redis", "redis-cli", "-h", "127.0.0.1", "get", "x")
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    no_password = stack.exec(
        "postgres",
        "psql",
        "-h",
        "127.0.0.1",
        "-U",
        "tabiji",
        "-d",
        "tabiji",
        "-w",
        "-c",
        "select 1",
    )
    assert no_password.returncode != 0
    assert "password" in no_password.stderr


def test_a_login_through_the_balancer_is_served_by_both_replicas(stack: Stack) -> None:
    """hanako signs in at the demo provider (TLS) through nginx; her session, kept in Redis,
    is honoured by replica A and by replica B directly; the upstream verifies her signed
    assertion; both replicas' audit records land in PostgreSQL and `tabiji audit verify` passes."""
    with stack.client() as browser:
        started = time.monotonic()
        page = sign_in(browser, PUBLIC + "/", "hanako", "hanako-demo", "123456")
        print(f"login through the load balancer: {time.monotonic() - started:.2f}s")
        assert page.status_code == 200, page.text[:2000]
        assert str(page.url) == PUBLIC + "/"
        assert "山田 花子" in page.text
        assert "/.tabiji/jwks.json で検証しました" in page.text  # the upstream verified it
        cookies = browser.cookies
        through_lb = {
            browser.get(PUBLIC + "/.tabiji/", headers={"accept": "application/json"}).status_code
            for _ in range(4)
        }
        assert through_lb == {200}
    for replica in ("a", "b"):
        with stack.client(gateway_port=stack.ports[replica]) as direct:
            direct.cookies = cookies
            echoed = direct.get(PUBLIC + "/headers")
            assert echoed.status_code == 200, f"replica {replica}: {echoed.text[:500]}"
            headers = dict(echoed.json()["headers"])
            assert headers["x-tabiji-email"] == "hanako@town.example", replica
            assert "x-tabiji-assertion" in headers
        with stack.client(gateway_port=stack.ports[replica]) as stranger:
            refused = stranger.get(PUBLIC + "/headers", headers={"accept": "application/json"})
            assert refused.status_code == 401, replica

    # Batched audit (≤ 100 ms): both replicas' chains reach PostgreSQL; verify walks them all.
    def both_chains() -> bool:
        result = stack.exec(
            "gateway-a", "tabiji", "audit", "query", "--json", "--since", "1h", "--limit", "500"
        )
        if result.returncode != 0:
            return False
        records = json.loads(result.stdout)
        chains = {str(record.get("chain_id", "")).split(":")[0] for record in records}
        return len(chains - {""}) >= 2

    wait_until(both_chains, 30, "records from both replicas in the audit store", stack.logs)
    verified = stack.exec("gateway-b", "tabiji", "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_compose_file_passes_the_compose_schema() -> None:
    """deploy/compose.yaml validates against the Compose specification's schema (offline)."""
    tool = REPO / ".venv-tools" / "bin" / "check-jsonschema"
    executable = str(tool) if tool.exists() else shutil.which("check-jsonschema")
    must_have(executable is not None, "check-jsonschema is not installed (deploy/tools.sh)")
    assert executable is not None
    result = subprocess.run(
        [executable, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
