"""Device trust through a real gateway subprocess over real HTTP: a device (software P-256 key,
registered directly in the gateway's SQLite device store) proves itself per request with a
DPoP-shaped proof; replays, another user's token and an untrusted certificate header are refused
or ignored; a revocation written to the store reaches the running gateway through its follower.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from device_agent.report import PostureFacts, key_thumbprint, make_proof, public_key_pem
from gateway.devices.ca import DeviceCA
from gateway.devices.model import NewDevice
from gateway.devices.store_sqlite import SqliteDeviceStore

from .audit_env import audit_block, requests_by_id
from .conftest import Gateway, Upstream, route, run_gateway
from .identity_env import echo_of, header_of, load_test_helper

pytestmark = pytest.mark.integration

jwks_server = load_test_helper("jwks_server")
ISSUER = "https://tokens.tabiji.test"
AUDIENCE = "tabiji-api"
TOKEN_KEY = jwks_server.ec_key("ec-1")
CERT_HEADER = "X-Client-Cert"
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
            "name": "encrypted-device",
            "allow": {
                "all": [
                    {"authenticated": True},
                    {"device": {"approved": True, "posture": {"disk_encrypted": True}}},
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
    directory: Path
    device_id: str
    key: ec.EllipticCurvePrivateKey

    def url(self, path: str) -> str:
        return self.gateway.url(path)


def token(subject: str = "u-sato", email: str = "sato@town.example.jp") -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "email": email,
        "email_verified": True,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    return str(TOKEN_KEY.sign(claims))


def enrol(db: Path, key: ec.EllipticCurvePrivateKey) -> str:
    """An approved laptop of u-sato with a fresh posture report, written straight to the store."""
    public = key.public_key()
    device_id = "dev-integration-1"

    async def write() -> None:
        store = SqliteDeviceStore(db)
        await store.open()
        try:
            await store.add(
                NewDevice(
                    id=device_id,
                    owner_issuer=ISSUER,
                    owner_subject="u-sato",
                    owner_email="sato@town.example.jp",
                    key_thumbprint=key_thumbprint(public),
                    public_key_pem=public_key_pem(public),
                    key_storage="software",
                    status="approved",
                    hostname="sato-laptop",
                    serial="PF3ABC12",
                    created_at=time.time(),
                )
            )
            now = time.time()
            await store.accept_posture(
                device_id,
                counter=1,
                facts=FACTS,
                reported_at=now,
                received_at=now,
                loopback_port=47801,
            )
        finally:
            await store.close()

    asyncio.run(write())
    return device_id


def revoke(db: Path, device_id: str) -> None:
    """IT revokes the device, as `tabiji devices revoke` does: one write to the store."""

    async def write() -> None:
        store = SqliteDeviceStore(db)
        await store.open()
        try:
            assert await store.set_status(device_id, "revoked", now=time.time(), actor="it")
        finally:
            await store.close()

    asyncio.run(write())


@pytest.fixture(scope="module")
def env(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A gateway with a bearer issuer, device policies, device trust and the audit trail on."""
    directory = tmp_path_factory.mktemp("devices")
    ca = load_test_helper("tls_ca").make_ca(directory / "ca")
    cert, tls_key = ca.issue(["127.0.0.1"], directory / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, tls_key)
    policy_dir = directory / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(yaml.safe_dump(POLICIES))
    state = jwks_server.JwksState(document=jwks_server.jwks_of(TOKEN_KEY))
    with jwks_server.serve_jwks(state, context) as jwks:

        def build(port: int) -> dict[str, Any]:
            frm = f"http://127.0.0.1:{port}"
            up = upstream.origin
            return {
                "listen": {"host": "127.0.0.1", "port": port},
                "public_url": frm,
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
                    "session": {"store": "sqlite:///state.db"},
                },
                "assertion": {"key_dir": str(directory / "keys")},
                "devices": {
                    "store": "sqlite:///devices.db",
                    "ca_dir": str(directory / "device-ca"),
                    "client_cert_header": CERT_HEADER,
                },
                "audit": audit_block(directory),
                "routes": [
                    route("own", frm + "/own", up, policy="own-device", websockets=True),
                    route("enc", frm + "/enc", up, policy="encrypted-device"),
                    route("plain", frm + "/plain", up, policy="signed-in"),
                ],
            }

        with run_gateway(directory, build) as gateway:
            key = ec.generate_private_key(ec.SECP256R1())
            device_id = enrol(directory / "devices.db", key)
            yield Env(gateway, directory, device_id, key)


def call(
    env: Env,
    path: str,
    *,
    bearer: str | None = None,
    proof: str | None = None,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Accept": "application/json", "Authorization": f"Bearer {bearer or token()}"}
    if proof is not None:
        headers["DPoP"] = proof
    headers.update(extra or {})
    return httpx.get(env.url(path), headers=headers, timeout=10)


def proof_for(env: Env, path: str, method: str = "GET", **changes: Any) -> str:
    return make_proof(
        env.key,
        device_id=env.device_id,
        method=method,
        url=env.url(path),
        now=time.time(),
        **changes,
    )


def wait_until_known(env: Env) -> None:
    """The gateway's follower picks up the device written to the store (a poll away)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if call(env, "/own/warm", proof=proof_for(env, "/own/warm")).status_code == 200:
            return
        time.sleep(0.05)
    pytest.fail("the gateway never learnt of the enrolled device")


def test_a_device_proof_opens_a_device_route_and_is_not_forwarded(env: Env) -> None:
    """Bearer token + the device's proof: 200; the upstream sees neither the proof nor the
    certificate header, and the assertion names the device and how its key is kept."""
    wait_until_known(env)
    response = call(env, "/own/report", proof=proof_for(env, "/own/report"))
    echo = echo_of(response)
    assert header_of(echo, "dpop") == []
    assertion = header_of(echo, "x-tabiji-assertion")[0]
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["device_id"] == env.device_id
    assert claims["device_trust"] == "software"
    assert isinstance(claims["device_posture_at"], int)
    # Posture feeds the policy too: the disk is encrypted, so the posture route opens.
    assert call(env, "/enc/x", proof=proof_for(env, "/enc/x")).status_code == 200


def test_without_a_proof_a_program_has_no_device(env: Env) -> None:
    """The same token without a proof is refused by the device rule (device-unenrolled)."""
    response = call(env, "/own/report")
    assert response.status_code == 403
    assert response.json()["reasons"][0] == "device-unenrolled"


def test_a_replayed_proof_is_refused(env: Env) -> None:
    """The same proof twice: the second is refused 401 device-proof-invalid, audited precisely."""
    wait_until_known(env)
    once = proof_for(env, "/own/replay")
    assert call(env, "/own/replay", proof=once).status_code == 200
    again = call(env, "/own/replay", proof=once)
    assert again.status_code == 401
    assert again.json()["reasons"] == ["device-proof-invalid"]
    assert "invalid_dpop_proof" in again.headers["www-authenticate"]
    refused = _audited(env, again.headers["x-request-id"])
    assert refused["reasons"] == ["device-proof-invalid", "proof-replayed"]
    assert refused["device_id"] == env.device_id


def test_a_proof_for_another_url_is_refused(env: Env) -> None:
    """A proof made for /own/a does not open /own/b."""
    response = call(env, "/own/b", proof=proof_for(env, "/own/a"))
    assert response.status_code == 401
    assert _audited(env, response.headers["x-request-id"])["reasons"] == [
        "device-proof-invalid",
        "proof-wrong-url",
    ]


def test_another_users_token_cannot_use_the_device(env: Env) -> None:
    """Sato's device proof with Suzuki's token is refused: device-not-owned."""
    wait_until_known(env)
    suzuki = token("u-suzuki", "suzuki@town.example.jp")
    response = call(env, "/own/x", bearer=suzuki, proof=proof_for(env, "/own/x"))
    assert response.status_code == 403
    assert response.json()["reasons"] == ["device-not-owned"]


def test_a_certificate_header_from_an_untrusted_client_is_ignored(env: Env) -> None:
    """A valid device certificate in the ingress header, sent by the client itself: ignored
    (no device), and never forwarded upstream."""
    wait_until_known(env)
    device_ca = DeviceCA(env.directory / "device-ca")
    device_ca.load()
    issued = device_ca.issue(env.device_id, env.key.public_key(), now=time.time())
    header = {CERT_HEADER: quote(issued.cert_pem, safe="")}
    refused = call(env, "/own/x", extra=header)
    assert refused.status_code == 403
    assert refused.json()["reasons"][0] == "device-unenrolled"
    echo = echo_of(call(env, "/plain/x", extra=header))
    assert header_of(echo, CERT_HEADER) == []


def test_the_audit_record_names_the_device_and_its_posture(env: Env) -> None:
    """An allowed request's record carries the device id, a posture summary and its age."""
    wait_until_known(env)
    response = call(env, "/own/audit", proof=proof_for(env, "/own/audit"))
    assert response.status_code == 200
    record = _audited(env, response.headers["x-request-id"])
    assert record["device_id"] == env.device_id
    assert record["posture"] == "linux 12 disk=on fw=on lock=300s"
    assert record["posture_age_s"] >= 0


def set_posture(db: Path, device_id: str, counter: int, facts: PostureFacts) -> None:
    """A new verified report stored, as the posture intake does."""

    async def write() -> None:
        store = SqliteDeviceStore(db)
        await store.open()
        try:
            now = time.time()
            assert await store.accept_posture(
                device_id,
                counter=counter,
                facts=facts,
                reported_at=now,
                received_at=now,
                loopback_port=47801,
            )
        finally:
            await store.close()

    asyncio.run(write())


def test_y_a_posture_change_closes_websockets_and_decides_the_next_request(env: Env) -> None:
    """The disk turns unencrypted: the device's open WebSocket is closed (4403) and the next
    request to the posture route is refused device-disk-unencrypted; no restart."""
    wait_until_known(env)
    path = "/own/_up/ws"
    headers = {
        "Authorization": f"Bearer {token()}",
        # A WebSocket handshake is a GET of the http(s) URL (RFC 6455 §4.1).
        "DPoP": proof_for(env, path),
    }
    with connect(f"ws://127.0.0.1:{env.gateway.port}{path}", additional_headers=headers) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        set_posture(
            env.directory / "devices.db",
            env.device_id,
            2,
            PostureFacts(os="linux", os_version="12", disk_encrypted=False, firewall=True),
        )
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "device-changed")
    refused = call(env, "/enc/x", proof=proof_for(env, "/enc/x"))
    assert refused.status_code == 403
    assert refused.json()["reasons"][0] == "device-disk-unencrypted"


def test_zz_a_revocation_reaches_the_running_gateway(env: Env) -> None:
    """Revoked in the store (as IT's CLI does): the next requests are refused device-revoked,
    once the follower has polled; no restart. (Runs last in this module.)"""
    wait_until_known(env)
    revoke(env.directory / "devices.db", env.device_id)
    revoked_at = time.monotonic()
    deadline = revoked_at + 10
    while time.monotonic() < deadline:
        response = call(env, "/own/after", proof=proof_for(env, "/own/after"))
        if response.status_code != 200:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - revoked_at
    assert response.status_code == 403
    assert response.json()["reasons"] == ["device-revoked"]
    print(f"revocation took effect after {elapsed * 1000:.0f} ms")


def _audited(env: Env, request_id: str) -> dict[str, Any]:
    """The audit record of one request (the writer flushes every 50 ms: wait for it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = requests_by_id(env.gateway.config_path)
        if request_id in records:
            return records[request_id]
        time.sleep(0.1)
    pytest.fail(f"no audit record for {request_id}")
