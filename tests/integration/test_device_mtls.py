"""Device certificates through a real trusted ingress, and stale posture, over real sockets.

Debian nginx terminates TLS on 127.0.0.1, verifies the client certificate against the gateway's
device CA (`ssl_verify_client on`) and forwards it URL-encoded in X-Client-Cert to a gateway
subprocess. nginx connects from 127.0.0.2, the only address in the gateway's `trusted_proxies`,
so a test client on 127.0.0.1 talking to the gateway directly is untrusted. The device (a
software P-256 key) is written to the gateway's SQLite device store, its certificate issued by
the gateway's own DeviceCA, and approved with `tabiji devices approve`; identity is a bearer JWT.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import (
    PostureFacts,
    PostureReport,
    key_thumbprint,
    public_key_pem,
    sign_report,
)
from gateway.devices.ca import DeviceCA, IssuedCertificate
from gateway.devices.model import NewDevice
from gateway.devices.store_sqlite import SqliteDeviceStore

from .audit_env import audit_block, requests_by_id, sqlite_url, tabiji
from .conftest import Gateway, Upstream, free_port, route, run_gateway
from .device_env import CERT_HEADER, INGRESS_SOURCE, Ingress, mtls_ingress, require_nginx
from .identity_env import echo_of, header_of, load_test_helper

pytestmark = pytest.mark.integration

tls_ca = load_test_helper("tls_ca")
jwks_server = load_test_helper("jwks_server")
ISSUER = "https://tokens.tabiji.test"
AUDIENCE = "tabiji-api"
OWNER = "u-sato"
TOKEN_KEY = jwks_server.ec_key("ec-mtls")
DEVICE_ID = "dev-mtls-1"
FOLLOW_TIMEOUT = 10.0  # the registry follower polls every 0.5 s; generous for a loaded machine
POLICIES = {
    "policies": [
        {"name": "signed-in", "allow": {"authenticated": True}},
        {
            "name": "own-device",
            "allow": {
                "all": [
                    {"authenticated": True},
                    {"device": {"approved": True, "owned_by_user": True}},
                ]
            },
        },
        {
            "name": "fresh-device",
            "allow": {
                "all": [
                    {"authenticated": True},
                    {
                        "device": {
                            "approved": True,
                            "owned_by_user": True,
                            "posture": {"max_age": "1m", "disk_encrypted": True},
                        }
                    },
                ]
            },
        },
    ]
}
FACTS = PostureFacts(
    os="linux", os_version="12", disk_encrypted=True, firewall=True, screen_lock_timeout=300
)


@dataclass
class Env:
    gateway: Gateway
    ingress: Ingress
    upstream: Upstream
    directory: Path
    device_ca: DeviceCA
    key: ec.EllipticCurvePrivateKey
    key_path: Path  # the device key (PEM), for the TLS client
    cert_path: Path  # its certificate from the gateway's device CA
    cert_pem: str
    server_ca: Path  # the CA of nginx's server certificate

    @property
    def db(self) -> Path:
        return self.directory / "devices.db"

    def edge(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        """A client of nginx, presenting `cert` (with `key`, default the device key) if given."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        if cert is not None:
            context.load_cert_chain(cert, key or self.key_path)
        return httpx.Client(
            base_url=self.ingress.origin,
            verify=context,
            timeout=10,
            headers={"Accept": "application/json", "Authorization": f"Bearer {token()}"},
        )

    def direct(self) -> httpx.Client:
        """A client of the gateway itself, from 127.0.0.1 (not a trusted proxy)."""
        return httpx.Client(
            base_url=self.gateway.origin,
            timeout=10,
            headers={"Accept": "application/json", "Authorization": f"Bearer {token()}"},
        )


def token() -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": OWNER,
        "email": "sato@town.example.jp",
        "email_verified": True,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    return str(TOKEN_KEY.sign(claims))


def with_store(db: Path, job: Callable[[SqliteDeviceStore], Any]) -> None:
    """Run `job(store)` (a coroutine function) against the gateway's device store."""

    async def run() -> None:
        store = SqliteDeviceStore(db)
        await store.open()
        try:
            await job(store)
        finally:
            await store.close()

    asyncio.run(run())


def register(db: Path, key: ec.EllipticCurvePrivateKey, issued: IssuedCertificate) -> None:
    """A pending laptop of u-sato with a fresh posture report and its certificate's serial."""
    public = key.public_key()

    async def write(store: SqliteDeviceStore) -> None:
        now = time.time()
        await store.add(
            NewDevice(
                id=DEVICE_ID,
                owner_issuer=ISSUER,
                owner_subject=OWNER,
                owner_email="sato@town.example.jp",
                key_thumbprint=key_thumbprint(public),
                public_key_pem=public_key_pem(public),
                key_storage="software",
                status="pending",
                hostname="sato-laptop",
                serial="PF3MTLS1",
                created_at=now,
            )
        )
        await store.accept_posture(
            DEVICE_ID, counter=1, facts=FACTS, reported_at=now, received_at=now, loopback_port=None
        )
        await store.set_certificate(DEVICE_ID, issued.serial, issued.not_after, now=now)

    with_store(db, write)


def write_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def env(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """JWKS server, the gateway (device trust, audit on, trusting only 127.0.0.2), nginx in
    front of it and an approved device with its certificate; all stopped by PID at the end."""
    require_nginx()
    directory = tmp_path_factory.mktemp("device-mtls")
    ca = tls_ca.make_ca(directory / "ca")
    jwks_cert, jwks_key = ca.issue(["127.0.0.1"], directory / "jwks-tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(jwks_cert, jwks_key)
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(yaml.safe_dump(POLICIES))
    # The gateway's device CA, made first: nginx must be told its certificate before it starts.
    device_ca = DeviceCA(directory / "device-ca")
    device_ca.load()
    edge_port = free_port()
    state = jwks_server.JwksState(document=jwks_server.jwks_of(TOKEN_KEY))
    with jwks_server.serve_jwks(state, context) as jwks:

        def build(port: int) -> dict[str, Any]:
            edge, direct = f"https://127.0.0.1:{edge_port}", f"http://127.0.0.1:{port}"
            up = upstream.origin
            return {
                "listen": {"host": "127.0.0.1", "port": port},
                "public_url": edge,
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
                            "ca_bundle": str(ca.ca_path),
                        }
                    ],
                    "session": {"store": sqlite_url(directory / "state.db")},
                },
                "assertion": {"key_dir": str(directory / "keys")},
                "devices": {
                    "store": sqlite_url(directory / "devices.db"),
                    "ca_dir": str(device_ca.directory),
                    "client_cert_header": CERT_HEADER,
                },
                "audit": audit_block(directory),
                "routes": [
                    route("own", edge + "/own", up, policy="own-device"),
                    route("fresh", edge + "/fresh", up, policy="fresh-device"),
                    route("own-direct", direct + "/own", up, policy="own-device"),
                    route("plain-direct", direct + "/plain", up, policy="signed-in"),
                ],
            }

        with (
            run_gateway(directory, build) as gateway,
            mtls_ingress(
                directory / "nginx",
                gateway_port=gateway.port,
                tls=ca.issue(["127.0.0.1"], directory / "edge-tls"),
                client_ca=device_ca.directory / "device-ca.pem",
                port=edge_port,
            ) as ingress,
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            issued = device_ca.issue(DEVICE_ID, key.public_key(), now=time.time())
            register(directory / "devices.db", key, issued)
            approved = tabiji(gateway.config_path, "devices", "approve", DEVICE_ID)
            assert approved.returncode == 0, approved.stderr
            cert_path = directory / "device-cert.pem"
            cert_path.write_text(issued.cert_pem)
            yield Env(
                gateway=gateway,
                ingress=ingress,
                upstream=upstream,
                directory=directory,
                device_ca=device_ca,
                key=key,
                key_path=write_pem(directory / "device-key.pem", key),
                cert_path=cert_path,
                cert_pem=issued.cert_pem,
                server_ca=Path(ca.ca_path),
            )


def wait_for_status(
    client: httpx.Client, path: str, wanted: Callable[[int], bool], what: str, env: Env
) -> tuple[httpx.Response, float]:
    """GET `path` until its status satisfies `wanted` (the follower polls the store); the
    response and the seconds it took. Fails after FOLLOW_TIMEOUT."""
    started = time.monotonic()
    while True:
        response = client.get(path)
        if wanted(response.status_code):
            return response, time.monotonic() - started
        if time.monotonic() - started > FOLLOW_TIMEOUT:
            pytest.fail(
                f"{what}: still {response.status_code} {response.text[:300]}\n{env.ingress.logs()}"
            )
        time.sleep(0.02)


def wait_until_known(env: Env) -> None:
    """The gateway's registry has followed the store to the approved device."""
    with env.edge(env.cert_path) as client:
        wait_for_status(client, "/own/warm", lambda s: s == 200, "device never known", env)


def audited(env: Env, request_id: str) -> dict[str, Any]:
    """The audit record of one request (the writer flushes every 50 ms: wait for it)."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT
    while time.monotonic() < deadline:
        records = requests_by_id(env.gateway.config_path)
        if request_id in records:
            return records[request_id]
        time.sleep(0.1)
    pytest.fail(f"no audit record for {request_id}")


def marker(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def assert_refused_by_nginx(response: httpx.Response, env: Env, path: str, why: str) -> None:
    """nginx's own 400 page: the request never went on to the gateway or the upstream."""
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert why in response.text
    assert "x-request-id" not in response.headers  # every gateway answer carries one
    assert env.upstream.received(path) == []


def test_a_certificate_through_the_ingress_opens_a_device_route(env: Env) -> None:
    """Through nginx with the device certificate: the device route is allowed, the upstream sees
    neither the certificate header nor a DPoP header, and assertion and audit name the device."""
    wait_until_known(env)
    path = "/own/" + marker("mtls-a")
    with env.edge(env.cert_path) as client:
        response = client.get(path)
    echo = echo_of(response)
    assert echo["path"] == path
    assert header_of(echo, CERT_HEADER) == []
    assert header_of(echo, "dpop") == []
    assertion = header_of(echo, "x-tabiji-assertion")[0]
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["device_id"] == DEVICE_ID
    assert claims["device_trust"] == "software"
    record = audited(env, response.headers["x-request-id"])
    assert record["device_id"] == DEVICE_ID
    assert record["decision"] == "allow"
    # X-Forwarded-For from the trusted ingress is believed: the client is the test on 127.0.0.1.
    assert record["client_ip"] == "127.0.0.1"


def test_b_without_a_client_certificate_nginx_refuses(env: Env) -> None:
    """No client certificate: nginx answers 400 itself; nothing reaches the gateway."""
    path = "/own/" + marker("mtls-b")
    with env.edge() as client:
        response = client.get(path)
    assert_refused_by_nginx(response, env, path, "No required SSL certificate was sent")


def test_c_a_certificate_header_from_a_direct_client_is_ignored_and_stripped(env: Env) -> None:
    """A client on 127.0.0.1 (not a trusted proxy) sending the device's own certificate in
    X-Client-Cert to the gateway directly: no device (device-unenrolled), header not forwarded."""
    wait_until_known(env)
    header = {CERT_HEADER: quote(env.cert_pem, safe="")}
    with env.direct() as client:
        refused = client.get("/own/" + marker("mtls-c"), headers=header)
        assert refused.status_code == 403, refused.text[:300]
        assert refused.json()["reasons"][0] == "device-unenrolled"
        echo = echo_of(client.get("/plain/" + marker("mtls-c"), headers=header))
    assert header_of(echo, CERT_HEADER) == []


def test_d_a_certificate_from_another_ca_is_refused_by_nginx(env: Env, tmp_path: Path) -> None:
    """A certificate for the same device id from another CA (even one with the same name) is
    not signed by the device CA: nginx refuses it with 400; nothing reaches the gateway."""
    forger = DeviceCA(tmp_path / "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    forged = forger.issue(DEVICE_ID, key.public_key(), now=time.time())
    cert_path = tmp_path / "forged.pem"
    cert_path.write_text(forged.cert_pem)
    path = "/own/" + marker("mtls-d")
    with env.edge(cert_path, write_pem(tmp_path / "forged-key.pem", key)) as client:
        response = client.get(path)
    assert_refused_by_nginx(response, env, path, "The SSL certificate error")


def test_e_an_expired_certificate_is_refused_with_its_precise_reason(env: Env) -> None:
    """A certificate that expires while its TLS connection stays open: nginx verified it at the
    handshake, the gateway checks its dates on every request and refuses it
    (device-certificate-invalid, audited as device-certificate-expired); a new connection with
    it is refused by nginx itself."""
    wait_until_known(env)
    issued = env.device_ca.issue(DEVICE_ID, env.key.public_key(), now=time.time(), lifetime=4)
    cert_path = env.directory / "short-lived.pem"
    cert_path.write_text(issued.cert_pem)
    with env.edge(cert_path) as client:
        before = client.get("/own/" + marker("mtls-e"))
        assert before.status_code == 200, before.text[:300]
        local = before.extensions["network_stream"].get_extra_info("client_addr")
        time.sleep(max(0.0, issued.not_after - time.time()) + 0.2)
        after = client.get("/own/" + marker("mtls-e"))
        # The premise: the same TLS connection, so nginx did not verify the certificate again.
        assert after.extensions["network_stream"].get_extra_info("client_addr") == local
    assert after.status_code == 403, after.text[:300]
    assert after.json()["reasons"] == ["device-certificate-invalid"]
    record = audited(env, after.headers["x-request-id"])
    assert "device-certificate-expired" in record["reasons"]
    assert record["decision"] != "allow"
    assert record["device_id"] == DEVICE_ID  # signed by the device CA: the device is known
    path = "/own/" + marker("mtls-e-new")
    with env.edge(cert_path) as client:
        response = client.get(path)
    assert_refused_by_nginx(response, env, path, "The SSL certificate error")


def test_s_stale_posture_is_refused_until_a_fresh_signed_report(env: Env) -> None:
    """A last accepted report older than the rule's max_age (1m) → device-posture-stale; a fresh
    report signed by the device key, POSTed to /.tabiji/devices/report, opens the route again."""
    wait_until_known(env)
    with env.edge(env.cert_path) as client:
        assert client.get("/fresh/" + marker("mtls-s")).status_code == 200

        async def age(store: SqliteDeviceStore) -> None:
            then = time.time() - 600  # ten minutes ago
            assert await store.accept_posture(
                DEVICE_ID,
                counter=2,
                facts=FACTS,
                reported_at=then,
                received_at=then,
                loopback_port=None,
            )

        with_store(env.db, age)
        stale, took = wait_for_status(
            client, "/fresh/stale", lambda s: s != 200, "stale posture never refused", env
        )
        print(f"stale posture refused {took * 1000:.0f} ms after the store changed")
        assert stale.status_code == 403, stale.text[:300]
        assert stale.json()["reasons"][0] == "device-posture-stale"

        report = PostureReport(
            device_id=DEVICE_ID,
            audience=env.ingress.origin,  # the gateway's public_url: nginx
            counter=3,
            issued_at=int(time.time()),
            facts=FACTS,
        )
        sent = client.post(
            "/.tabiji/devices/report",
            content=sign_report(report, env.key),
            headers={"Content-Type": "application/jwt"},
        )
        assert sent.status_code == 200, sent.text[:300]
        assert sent.json()["accepted"] is True
        fresh, took = wait_for_status(
            client, "/fresh/again", lambda s: s == 200, "fresh report never honoured", env
        )
        print(f"fresh report honoured {took * 1000:.0f} ms after it was accepted")
    assert header_of(echo_of(fresh), CERT_HEADER) == []


def test_z_a_revocation_by_the_cli_refuses_the_certificate(env: Env) -> None:
    """`tabiji devices revoke` against the same config: the same certificate through nginx is
    refused device-revoked once the gateway's registry follows (runs last in this module)."""
    wait_until_known(env)
    started = time.monotonic()
    done = tabiji(env.gateway.config_path, "devices", "revoke", DEVICE_ID, "--actor", "it-test")
    assert done.returncode == 0, done.stderr
    cli_took = time.monotonic() - started
    with env.edge(env.cert_path) as client:
        response, took = wait_for_status(
            client, "/own/" + marker("mtls-z"), lambda s: s != 200, "never refused", env
        )
    print(
        f"revocation: the CLI ran {cli_took * 1000:.0f} ms; refused {took * 1000:.0f} ms after"
        f" it returned ({(cli_took + took) * 1000:.0f} ms after it started)"
    )
    assert response.status_code == 403, response.text[:300]
    assert response.json()["reasons"] == ["device-revoked"]
    record = audited(env, response.headers["x-request-id"])
    assert record["reasons"] == ["device-revoked"]
    assert record["device_id"] == DEVICE_ID
