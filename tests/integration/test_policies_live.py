"""Policies in the real gateway: decisions, hot reload in every worker, broken sets refused."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import REPO, Gateway, Upstream, gateway_config, route, run_gateway

pytestmark = pytest.mark.integration

ALLOW_LOOPBACK = """\
# 庁舎内からのみ (loopback stands in for the office network here)
policies:
  - name: office
    allow:
      source_ip: [127.0.0.0/8]
"""
DENY_LOOPBACK = ALLOW_LOOPBACK.replace("127.0.0.0/8", "192.0.2.0/24")
BROKEN = ALLOW_LOOPBACK + "      gruop: staff\n"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("policies")
    (directory / "office.yaml").write_text(ALLOW_LOOPBACK, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """Two workers, one route decided by the `office` policy, one public route."""

    def build(port: int) -> dict[str, Any]:
        frm = f"http://127.0.0.1:{port}"
        to = f"http://127.0.0.1:{upstream.port}"
        return gateway_config(
            port,
            [
                route("office", frm + "/office", to, policy="office"),
                route("root", frm, to, public=True),
            ],
            policies={"dir": str(policy_dir), "poll_interval": "200ms"},
        )

    with run_gateway(tmp_path_factory.mktemp("gw"), build, workers=2) as running:
        yield running


def statuses(gateway: Gateway, count: int = 12) -> set[int]:
    """Statuses of `count` fresh connections (so both workers are likely to answer)."""
    found = set()
    for _ in range(count):
        with httpx.Client(timeout=5) as client:
            found.add(client.get(gateway.url("/office/x")).status_code)
    return found


def wait_until(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def tabiji(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_policy_decides_and_reloads_in_every_worker(gateway: Gateway, policy_dir: Path) -> None:
    """Allowed, then a policy edit denies on every worker, a broken edit changes nothing, and
    `tabiji reload` refuses a broken set but signals a clean one."""
    assert statuses(gateway) == {200}

    (policy_dir / "office.yaml").write_text(DENY_LOOPBACK, encoding="utf-8")
    assert wait_until(lambda: statuses(gateway, 6) == {403}), "the edit never took effect"
    assert statuses(gateway) == {403}  # every worker, not just one
    denied = httpx.get(gateway.url("/office/x"), headers={"Accept": "application/json"})
    assert denied.json()["reasons"] == ["source-ip-not-allowed", "no-rule-matched"]

    (policy_dir / "office.yaml").write_text(BROKEN, encoding="utf-8")
    assert wait_until(
        lambda: "last reload refused" in httpx.get(gateway.url("/.tabiji/readyz")).text
    )
    ready = httpx.get(gateway.url("/.tabiji/readyz"))
    assert ready.status_code == 200  # still serving the last good set
    assert "unknown" in ready.json()["checks"]["policies"]["detail"]
    assert statuses(gateway) == {403}  # the last good (denying) set stays in force
    assert "policy reload refused" in gateway.stderr()

    refused = tabiji("reload", "--config", str(gateway.config_path))
    assert refused.returncode == 1
    assert "office.yaml:6:7" in refused.stderr

    # A clean set, written where the watcher might miss it, is applied through `tabiji reload`.
    (policy_dir / "office.yaml").write_text(ALLOW_LOOPBACK, encoding="utf-8")
    applied = tabiji("reload", "--config", str(gateway.config_path))
    assert applied.returncode == 0, applied.stderr
    assert wait_until(lambda: statuses(gateway, 6) == {200})
    assert statuses(gateway) == {200}


def test_public_route_ignores_policies(gateway: Gateway) -> None:
    """`public: true` routes are allowed whatever the policy directory says."""
    assert httpx.get(gateway.url("/anything")).status_code == 200
