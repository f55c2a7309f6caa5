"""deploy/Containerfile, built and run with podman: a non-root user, a read-only root file system,
a working HEALTHCHECK, and a demo user's sign-in and an authorised request through the container.

The demo identity provider and the demo upstream run from the same image; every container uses
the host's network on free loopback ports (port publishing is exercised by test_compose.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import BUILD_SECONDS, GATEWAY_IMAGE, free_port, sign_in, wait_until
from .podman_env import REPO, Podman, must_have, unique_name

pytestmark = pytest.mark.integration

DEMO = REPO / "gateway" / "demo"
CLIENT_ID = "tabiji-demo"
APP_UID = 10001  # the image's `tabiji` user (deploy/Containerfile)
HARDENING = ("--cap-drop", "all", "--security-opt", "no-new-privileges")


@dataclass
class Stack:
    """The gateway container and its demo provider and upstream, on loopback ports."""

    podman: Podman
    gateway: str
    port: int
    idp_port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exec(self, *command: str) -> tuple[int, str]:
        result = self.podman.run("exec", self.gateway, *command, check=False, timeout=60)
        return result.returncode, result.stdout + result.stderr


def gateway_config(port: int, upstream_port: int, idp_port: int) -> dict[str, Any]:
    """The demo's gateway config with every writable path in the /var/lib/tabiji volume."""
    origin = f"http://127.0.0.1:{port}"
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "public_url": origin,
        "identity": {
            "providers": [
                {
                    "name": "demo",
                    "issuer": f"http://127.0.0.1:{idp_port}",
                    "client_id": CLIENT_ID,
                    "client_secret_file": "/etc/tabiji/client.secret",
                }
            ],
            "session": {"store": "sqlite:////var/lib/tabiji/state.db"},
        },
        "assertion": {"key_dir": "/var/lib/tabiji/keys"},
        "audit": {
            "store": "sqlite:////var/lib/tabiji/audit.db",
            "spool_dir": "/var/lib/tabiji/audit-spool",
            "key_file": "/var/lib/tabiji/audit-key.pem",
        },
        "policies": {"dir": "/etc/tabiji/policies"},
        "routes": [
            {
                "name": "groupware",
                "from": origin,
                "to": f"http://127.0.0.1:{upstream_port}",
                "policy": "groupware",
                "providers": ["demo"],
                "identity_headers": True,
            }
        ],
    }


def write_config(directory: Path, port: int, upstream_port: int, idp_port: int) -> None:
    """gateway.yaml, the demo policies and the client secret, readable by the image's user only."""
    directory.mkdir()
    shutil.copytree(DEMO / "policies", directory / "policies")
    secret = directory / "client.secret"
    secret.write_text("container-test-" + os.urandom(16).hex() + "\n", encoding="utf-8")
    (directory / "gateway.yaml").write_text(
        yaml.safe_dump(gateway_config(port, upstream_port, idp_port), sort_keys=False), "utf-8"
    )
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, APP_UID, APP_UID)
    secret.chmod(0o600)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def stack(podman: Podman, gateway_image: str, tmp_path: Path) -> Stack:
    """Provider, upstream and gateway containers from the image, hardened, gateway read-only."""
    port, upstream_port, idp_port = free_port(), free_port(), free_port()
    config = tmp_path / "etc"
    write_config(config, port, upstream_port, idp_port)
    base = ("run", "-d", "--network", "host", *HARDENING)
    idp = podman.track_container(unique_name("tabiji-test-idp"))
    podman.run(
        *base, "--name", idp, "--read-only",
        "-v", f"{config}:/etc/tabiji:ro", "--entrypoint", "python3", gateway_image,
        "-m", "gateway.demo.idp", "--port", str(idp_port),
        "--client-id", CLIENT_ID, "--client-secret-file", "/etc/tabiji/client.secret",
        "--redirect-uri", f"http://127.0.0.1:{port}/.tabiji/oidc/callback",
    )  # fmt: skip
    upstream = podman.track_container(unique_name("tabiji-test-upstream"))
    podman.run(
        *base, "--name", upstream, "--read-only", "--entrypoint", "python3", gateway_image,
        "-m", "gateway.demo.upstream", "--port", str(upstream_port),
        "--gateway", f"http://127.0.0.1:{port}",
    )  # fmt: skip
    volume = podman.track_volume(unique_name("tabiji-test-state"))
    gateway = podman.track_container(unique_name("tabiji-test-gateway"))
    podman.run(
        *base, "--name", gateway, "--read-only",
        "-v", f"{config}:/etc/tabiji:ro", "-v", f"{volume}:/var/lib/tabiji",
        "-e", f"TABIJI_HEALTHZ=http://127.0.0.1:{port}/.tabiji/healthz", gateway_image,
    )  # fmt: skip

    def logs() -> str:
        return "\n".join(f"--- {name}\n{podman.logs(name)}" for name in (idp, upstream, gateway))

    ready = wait_until(
        lambda: all(
            http_ok(url)
            for url in (
                f"http://127.0.0.1:{idp_port}/.well-known/openid-configuration",
                f"http://127.0.0.1:{upstream_port}/headers",
                f"http://127.0.0.1:{port}/.tabiji/healthz",
            )
        ),
        90,
        "the provider, upstream and gateway containers answering",
        logs,
    )
    print(f"containers ready in {ready:.1f}s; image built in {BUILD_SECONDS.get(GATEWAY_IMAGE)}")
    return Stack(podman, gateway, port, idp_port)


def test_the_image_declares_a_non_root_user_a_healthcheck_and_no_baked_config(
    podman: Podman, gateway_image: str
) -> None:
    """The image runs as uid 10001, keeps its HEALTHCHECK on /.tabiji/healthz, and carries no
    config, key, certificate or secret file of ours."""
    inspected = json.loads(podman.run("image", "inspect", gateway_image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert "/.tabiji/healthz" in " ".join(config["Env"])
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")  # podman: top level
    assert healthcheck["Test"][0] == "CMD", healthcheck
    assert "/var/lib/tabiji" in config["Volumes"]
    size = int(inspected["Size"])
    print(f"image size {size / 1e6:.0f} MB")
    listing = podman.run(
        "run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", gateway_image,
        "-c",
        "ls -A /etc/tabiji; ls -A /var/lib/tabiji/shared; find / -xdev \\( -name '*.secret' "
        "-o -name '*.key' -o -name 'audit-key*' -o -name 'gateway.yaml' -o -name '.git' "
        "-o -name host_ca \\) -print",
    )  # fmt: skip
    assert listing.stdout.strip() == "", listing.stdout


def test_the_gateway_container_is_non_root_read_only_and_healthy(stack: Stack) -> None:
    """The gateway process runs as uid 10001; writes outside the state volume fail; the state
    volume is writable; `podman healthcheck run` reports healthy."""
    code, out = stack.exec("id", "-u")
    assert (code, out.strip()) == (0, str(APP_UID))
    for path in ("/opt/tabiji/x", "/etc/x", "/usr/x", "/x", "/etc/tabiji/x"):
        code, out = stack.exec("sh", "-c", f"echo x > {path}")
        assert code != 0, f"{path} was writable"
        assert "Read-only file system" in out or "Permission denied" in out, out
    code, out = stack.exec("sh", "-c", "echo x > /var/lib/tabiji/probe && rm /var/lib/tabiji/probe")
    assert code == 0, out
    code, out = stack.exec("sh", "-c", "cat /proc/1/status | grep -E '^(Uid|CapEff)'")
    assert f"Uid:\t{APP_UID}" in out
    assert "CapEff:\t0000000000000000" in out
    started = time.monotonic()
    health = stack.podman.run("healthcheck", "run", stack.gateway, check=False, timeout=60)
    print(f"healthcheck run: rc {health.returncode} in {time.monotonic() - started:.2f}s")
    assert health.returncode == 0, health.stdout + health.stderr


def test_a_demo_user_signs_in_and_is_served_through_the_container(stack: Stack) -> None:
    """hanako signs in at the demo provider through the containerised gateway, and her request
    reaches the upstream with her verified identity; the contractor is refused (403)."""
    with httpx.Client(timeout=15, follow_redirects=True) as browser:
        page = sign_in(browser, stack.origin + "/", "hanako", "hanako-demo", "123456")
        assert page.status_code == 200, page.text[:2000]
        assert str(page.url).startswith(stack.origin)
        assert "山田 花子" in page.text
        echoed = browser.get(stack.origin + "/headers")
        assert echoed.status_code == 200
        headers = {k.lower(): v for k, v in echoed.json()["headers"]}
        assert headers["x-tabiji-email"] == "hanako@town.example"
        assert "x-tabiji-assertion" in headers
        assert "tabiji" not in headers.get("cookie", "")  # the gateway's cookies stay behind
    with httpx.Client(timeout=15) as anonymous:
        refused = anonymous.get(stack.origin + "/headers", headers={"accept": "application/json"})
        assert refused.status_code == 401
    with httpx.Client(timeout=15, follow_redirects=True) as browser:
        refused = sign_in(browser, stack.origin + "/", "contractor", "contractor-demo")
        assert refused.status_code == 403


def test_the_containerfiles_pass_checkov(tmp_path: Path) -> None:
    """checkov's Dockerfile checks pass for every Containerfile we ship (each skip is written
    beside its line); checkov reads only files named Dockerfile*, so copies are checked."""
    tool = REPO / ".venv-tools" / "bin" / "checkov"
    executable = str(tool) if tool.exists() else shutil.which("checkov")
    must_have(executable is not None, "checkov is not installed (deploy/tools.sh)")
    assert executable is not None
    sources = [
        REPO / "deploy" / "Containerfile",
        *sorted(REPO.glob("deploy/container/*.Containerfile")),
    ]
    for source in sources:
        shutil.copy(source, tmp_path / f"Dockerfile.{source.stem}")
    result = subprocess.run(
        [executable, "--framework", "dockerfile", "-d", str(tmp_path), "--skip-download",
         "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout)["summary"]
    assert summary["failed"] == 0
    assert summary["passed"] > 0
    print(
        f"checkov: {summary['passed']} passed, {summary['skipped']} skipped ({len(sources)} files)"
    )
