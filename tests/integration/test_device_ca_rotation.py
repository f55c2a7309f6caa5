"""The device CA rotated through a real mTLS ingress, as deploy/OPERATIONS.md says: nginx trusts
`device-ca-bundle.pem`; `tabiji devices ca prepare`, a graceful nginx reload, `activate` — the
old certificate and one of the new CA both open the device route on a gateway that was never
restarted; after the retired CA is pruned and nginx reloaded, only the new one does."""

from __future__ import annotations

import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.devices.ca import BUNDLE_FILE, DeviceCA, IssuedCertificate

from .audit_env import audit_block, sqlite_url, tabiji
from .conftest import Upstream, free_port, route, run_gateway
from .device_env import CERT_HEADER, INGRESS_SOURCE, Ingress, mtls_ingress, require_nginx
from .test_device_mtls import (
    AUDIENCE,
    DEVICE_ID,
    ISSUER,
    POLICIES,
    TOKEN_KEY,
    jwks_server,
    register,
    tls_ca,
    token,
    with_store,
    write_pem,
)

pytestmark = pytest.mark.integration

WAIT = 15.0  # nginx reloads and the registry follows the store within this


def edge(ingress: Ingress, server_ca: Path, cert: Path, key: Path) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(server_ca))
    context.load_cert_chain(cert, key)
    return httpx.Client(
        base_url=ingress.origin,
        verify=context,
        timeout=10,
        headers={"Accept": "application/json", "Authorization": f"Bearer {token()}"},
    )


def status_of(ingress: Ingress, server_ca: Path, cert: Path, key: Path) -> int:
    """One request on a new TLS connection (nginx verifies the certificate at each handshake)."""
    with edge(ingress, server_ca, cert, key) as client:
        return client.get("/own/rotation").status_code


def until(check: Callable[[], bool], what: str, ingress: Ingress) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > WAIT:
            pytest.fail(f"{what}\n{ingress.logs()}")
        time.sleep(0.1)
    return time.monotonic() - started


def reload_nginx(ingress: Ingress) -> None:
    """`nginx -s reload`: SIGHUP to the master, which re-reads the bundle gracefully."""
    ingress.process.send_signal(signal.SIGHUP)


def renew(db: Path, issued: IssuedCertificate) -> None:
    """What the agent's renewal leaves in the registry: the new certificate's serial."""

    async def write(store: Any) -> None:
        await store.set_certificate(DEVICE_ID, issued.serial, issued.not_after, now=time.time())

    with_store(db, write)


def test_device_ca_rotation_through_nginx(upstream: Upstream, tmp_path: Path) -> None:
    """prepare → nginx reload → activate: the old certificate and the new CA's both pass nginx
    and the running gateway; prune → nginx reload: the old CA's certificate is refused by nginx
    (400), the new one still passes."""
    require_nginx()
    ca_dir = tmp_path / "device-ca"
    DeviceCA(ca_dir).load()  # first start: the CA and its bundle
    bundle = ca_dir / BUNDLE_FILE
    server = tls_ca.make_ca(tmp_path / "ca")
    jwks_cert, jwks_key = server.issue(["127.0.0.1"], tmp_path / "jwks-tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(jwks_cert, jwks_key)
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(yaml.safe_dump(POLICIES))
    edge_port = free_port()
    state = jwks_server.JwksState(document=jwks_server.jwks_of(TOKEN_KEY))
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = write_pem(tmp_path / "device-key.pem", key)
    with jwks_server.serve_jwks(state, context) as jwks:

        def build(port: int) -> dict[str, Any]:
            edge_origin = f"https://127.0.0.1:{edge_port}"
            return {
                "listen": {"host": "127.0.0.1", "port": port},
                "public_url": edge_origin,
                "trusted_proxies": [f"{INGRESS_SOURCE}/32"],
                "policies": {"dir": str(policy_dir), "watch": "poll"},
                "identity": {
                    "bearer": [
                        {
                            "name": "api",
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks_uri": jwks.url,
                            "algorithms": ["ES256"],
                            "ca_bundle": str(server.ca_path),
                        }
                    ],
                    "session": {"store": sqlite_url(tmp_path / "state.db")},
                },
                "assertion": {"key_dir": str(tmp_path / "keys")},
                "devices": {
                    "store": sqlite_url(tmp_path / "devices.db"),
                    "ca_dir": str(ca_dir),
                    "client_cert_header": CERT_HEADER,
                },
                "audit": audit_block(tmp_path),
                "routes": [
                    route("own", edge_origin + "/own", upstream.origin, policy="own-device")
                ],
            }

        with (
            run_gateway(tmp_path, build) as gateway,
            mtls_ingress(
                tmp_path / "nginx",
                gateway_port=gateway.port,
                tls=server.issue(["127.0.0.1"], tmp_path / "edge-tls"),
                client_ca=bundle,
                port=edge_port,
            ) as ingress,
        ):
            old = DeviceCA(ca_dir).issue(DEVICE_ID, key.public_key(), now=time.time())
            old_path = tmp_path / "old-cert.pem"
            old_path.write_text(old.cert_pem)
            register(tmp_path / "devices.db", key, old)
            approved = tabiji(gateway.config_path, "devices", "approve", DEVICE_ID)
            assert approved.returncode == 0, approved.stderr

            def passes(cert: Path) -> Callable[[], bool]:
                return lambda: status_of(ingress, server.ca_path, cert, key_path) == 200

            until(passes(old_path), "the old certificate never opened the route", ingress)

            prepared = tabiji(gateway.config_path, "devices", "ca", "prepare")
            assert prepared.returncode == 0, prepared.stderr
            assert bundle.read_text().count("BEGIN CERTIFICATE") == 2
            reload_nginx(ingress)
            activated = tabiji(gateway.config_path, "devices", "ca", "activate")
            assert activated.returncode == 0, activated.stderr

            # The agent's next renewal: a certificate of the new CA (as the gateway issues it).
            new = DeviceCA(ca_dir).issue(DEVICE_ID, key.public_key(), now=time.time())
            new_path = tmp_path / "new-cert.pem"
            new_path.write_text(new.cert_pem)
            old_issuer = x509.load_pem_x509_certificate(old.cert_pem.encode()).issuer
            assert x509.load_pem_x509_certificate(new.cert_pem.encode()).issuer != old_issuer
            renew(tmp_path / "devices.db", new)
            until(passes(new_path), "the new CA's certificate never opened the route", ingress)
            assert passes(old_path)(), "the old certificate stopped working after activate"

            # One certificate lifetime later (forced here), the old CA is pruned.
            gone = DeviceCA(ca_dir).prune(time.time(), keep=0.0)
            assert len(gone) == 1
            reload_nginx(ingress)

            def refused_by_nginx() -> bool:
                return status_of(ingress, server.ca_path, old_path, key_path) == 400

            until(refused_by_nginx, "nginx still accepts the pruned CA's certificate", ingress)
            assert passes(new_path)()
