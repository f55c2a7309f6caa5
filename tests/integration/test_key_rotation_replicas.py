"""Key rotation across two running replicas that share their key files (deploy/OPERATIONS.md):
`tabiji keys rotate` on one host is published by every replica before it signs, and
`tabiji audit keygen --rotate` with a rolling restart keeps the whole trail verifiable — for
`tabiji audit verify` and for the auditors' web view."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .audit_env import AUDITOR, audit_block, audit_identity_env, sqlite_url, tabiji
from .conftest import _LIVE, Gateway, Upstream, gateway_config, route, run_gateway
from .test_audit_gateway import AUDIT_POLICIES
from .test_upgrade_restart import start_again

pytestmark = pytest.mark.integration

KEY_RING_REFRESH = 30.0  # gateway/wire_identity.py: how often a replica looks at the key dir


def replica(shared: Path, own: Path, upstream: Upstream) -> Callable[[int], dict[str, Any]]:
    """One replica: its own spool, everything else shared with the others (one host here; a
    shared volume or copied secrets in production). A bearer issuer turns identity — and with
    it the JWKS endpoint — on without an identity provider."""

    def build(port: int) -> dict[str, Any]:
        frm = f"http://127.0.0.1:{port}"
        return gateway_config(
            port,
            [route("root", frm, f"http://127.0.0.1:{upstream.port}", public=True)],
            identity={
                "session": {"store": sqlite_url(shared / "state.db")},
                "bearer": [
                    {
                        "name": "batch",
                        "issuer": "http://127.0.0.1:9/issuer",
                        "audiences": ["api://tabiji"],
                        "jwks_uri": "http://127.0.0.1:9/jwks",
                    }
                ],
            },
            assertion={"key_dir": str(shared / "assertion-keys")},
            audit={
                "store": sqlite_url(shared / "audit.db"),
                "key_file": str(shared / "audit-key.pem"),
                "checkpoint_export": str(shared / "checkpoints.jsonl"),
                "checkpoint_interval": "500ms",
                "spool_dir": str(own / "spool"),
                "flush_interval": "50ms",
            },
        )

    return build


@contextlib.contextmanager
def two_replicas(tmp_path: Path, upstream: Upstream) -> Iterator[tuple[Gateway, Gateway]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with (
        run_gateway(a, replica(shared, a, upstream)) as first,
        run_gateway(b, replica(shared, b, upstream)) as second,
    ):
        yield first, second


def kids(gw: Gateway) -> set[str]:
    response = httpx.get(gw.url("/.tabiji/jwks.json"), timeout=5)
    response.raise_for_status()
    return {key["kid"] for key in response.json()["keys"]}


def test_assertion_key_rotation_is_published_by_every_replica_before_it_signs(
    upstream: Upstream, tmp_path: Path
) -> None:
    """After `tabiji keys rotate` on one host both replicas publish the new key (JWKS) within
    their 30 s look at the key directory — well inside the default 600 s before it signs — and
    keep the old one."""
    with two_replicas(tmp_path, upstream) as (a, b):
        old = kids(a)
        assert old == kids(b)
        assert len(old) == 1
        rotated = tabiji(a.config_path, "keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        started = time.monotonic()
        deadline = started + KEY_RING_REFRESH + 10
        while time.monotonic() < deadline and not (len(kids(a)) == len(kids(b)) == 2):
            time.sleep(0.5)
        took = time.monotonic() - started
        both = kids(a), kids(b)
        listed = tabiji(a.config_path, "keys", "list", "--json")
    print(f"new assertion key published by both replicas after {took:.1f} s")
    assert both[0] == both[1]
    assert len(both[0]) == 2
    assert old < both[0]
    assert took < 600  # the default --publish-ahead
    rows = json.loads(listed.stdout)
    assert sum(1 for row in rows if row["signing"]) == 1
    assert next(row for row in rows if row["signing"])["kid"] in old  # the old key still signs


def test_audit_key_rotation_with_a_rolling_restart_keeps_verify_passing(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Rotate the shared audit key while two replicas write, restart one (it signs with the new
    key, the other still with the old): the trail, checked by the default key ring and by the
    auditors' two public keys, verifies; with the new public key alone it does not."""
    shared = tmp_path / "shared"
    with two_replicas(tmp_path, upstream) as (a, b):
        for gw in (a, b):
            assert httpx.get(gw.url("/before"), timeout=5).status_code == 200
        old_public = tmp_path / "auditors-old.pub"
        old_public.write_bytes((shared / "audit-key.pem.pub").read_bytes())
        rotated = tabiji(a.config_path, "audit", "keygen", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert a.stop() == 0
        with run_gateway(tmp_path / "a", replica(shared, tmp_path / "a", upstream)) as again:
            for gw in (again, b):
                assert httpx.get(gw.url("/after"), timeout=5).status_code == 200
        assert b.stop() == 0
    export = [json.loads(line) for line in (shared / "checkpoints.jsonl").read_text().splitlines()]
    assert len({cp["key_id"] for cp in export}) == 2
    default = tabiji(a.config_path, "audit", "verify")
    assert default.returncode == 0, default.stdout + default.stderr
    new_public = str(shared / "audit-key.pem.pub")
    auditors = tabiji(
        a.config_path,
        "audit",
        "verify",
        "--public-key",
        new_public,
        "--public-key",
        str(old_public),
    )
    assert auditors.returncode == 0, auditors.stdout + auditors.stderr
    only_new = tabiji(a.config_path, "audit", "verify", "--public-key", new_public)
    assert only_new.returncode == 1
    assert "bad-signature" in only_new.stderr


def test_the_auditors_view_stays_verified_across_an_audit_key_rotation(
    upstream: Upstream, tmp_path: Path
) -> None:
    """Checkpoints signed before `tabiji audit keygen --rotate` and after the restart: the
    auditors' page /.tabiji/audit shows the trail as verified (it checks with the retired key
    too), not as tampered with."""
    with audit_identity_env(
        tmp_path,
        upstream,
        policies=AUDIT_POLICIES,
        audit=lambda port: audit_block(
            tmp_path, view_policy="auditors", checkpoint_interval="500ms"
        ),
    ) as env:
        with env.client() as visitor:
            assert visitor.get(env.p + "/before-rotation").status_code < 500
        assert env.gateway.stop() == 0
        rotated = env.cli("audit", "keygen", "--rotate")
        assert rotated.returncode == 0, rotated.stderr
        restarted = start_again(env)
        try:
            with env.client() as auditor:
                page = env.login(auditor, env.p + "/.tabiji/audit", AUDITOR.username)
                deadline = time.monotonic() + 30
                while 'data-chain="unknown"' in page.text and time.monotonic() < deadline:
                    time.sleep(0.5)  # a full verify runs in the background: look again
                    page = auditor.get(env.p + "/.tabiji/audit")
        finally:
            assert restarted.stop() == 0
            _LIVE.remove(restarted)
    assert page.status_code == 200
    assert 'data-chain="ok"' in page.text, page.text[:2000]
    export = [
        json.loads(line) for line in (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    ]
    assert len({cp["key_id"] for cp in export}) == 2  # both keys' checkpoints were checked
