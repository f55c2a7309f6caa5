"""The pipeline's device stage on real parts: a SQLite device store behind the registry's cache,
the SQLite state store as the DPoP replay cache, the device CA and real sessions.

Each refusal test fails without its check: the same request with the one fact put right passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import PostureFacts, make_proof
from gateway.context import Peer
from gateway.devices.ca import DeviceCA
from gateway.devices.model import DeviceRecord
from gateway.devices.registry import DeviceRegistry
from gateway.devices.stage import (
    NOTE_REGISTRY_STALE,
    DeviceCheck,
    DeviceRefused,
    DeviceStage,
    posture_summary,
)
from gateway.devices.store_sqlite import SqliteDeviceStore
from gateway.headers import upstream_request_headers
from gateway.identity.model import Identity
from gateway.identity.sessions import SessionManager
from gateway.state.base import StateUnavailable
from gateway.state.sqlite import SqliteStateStore
from gateway.target import Target
from tests.gateway.devices.registry_helpers import ISSUER, Login, new_device
from tests.gateway.factories import make_peer, make_route

APP = "app.example.test"
URL = f"https://{APP}/reports/2024"
CERT_HEADER = "x-client-cert"
FACTS = PostureFacts(
    os="linux", os_version="12", disk_encrypted=True, firewall=True, screen_lock_timeout=300
)


class Clock:
    """A monotonic clock the test moves (the registry's freshness clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    registry: DeviceRegistry
    clock: Clock
    state: SqliteStateStore
    sessions: SessionManager
    ca: DeviceCA
    stage: DeviceStage
    tmp_path: Path

    def stage_again(self, **changes: Any) -> DeviceStage:
        """Another worker's stage on the same registry and the same shared replay store."""
        options: dict[str, Any] = {
            "registry": self.registry,
            "replay": self.state,
            "sessions": self.sessions,
            "certificates": self.ca,
            "client_cert_header": CERT_HEADER,
        }
        options.update(changes)
        return DeviceStage(**options)

    async def enrol(
        self, *, status: str = "approved", subject: str = "u-sato", posture: bool = True
    ) -> tuple[DeviceRecord, ec.EllipticCurvePrivateKey]:
        device, key = new_device(owner_subject=subject, status=status)
        record = await self.registry.add(device)
        if posture:
            updated = await self.registry.accept_posture(
                record.id,
                counter=1,
                facts=FACTS,
                reported_at=time.time(),
                received_at=time.time(),
                loopback_port=47802,
            )
            assert updated is not None
            record = updated
        return record, key


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    registry = DeviceRegistry(
        SqliteDeviceStore(tmp_path / "devices.db"), poll_interval=0.5, stale_after=5.0, clock=clock
    )
    await registry.store.open()
    assert await registry.refresh()
    state = SqliteStateStore(tmp_path / "state.db")
    await state.open()
    sessions = SessionManager(
        state, public_host="gw.example.test", lifetime=3600, idle_timeout=3600
    )
    ca = DeviceCA(tmp_path / "ca")
    ca.load()
    stage = DeviceStage(
        registry=registry,
        replay=state,
        sessions=sessions,
        certificates=ca,
        client_cert_header=CERT_HEADER,
        binding_max_age=8 * 3600,
    )
    yield World(registry, clock, state, sessions, ca, stage, tmp_path)
    await sessions.drain()
    await state.close()
    await registry.store.close()


def user(subject: str = "u-sato", **changes: Any) -> Identity:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "subject": subject,
        "method": "bearer",
        "provider": "town",
        "email": f"{subject}@town.example",
        "email_verified": True,
        "expires_at": time.time() + 3600,
    }
    options.update(changes)
    return Identity(**options)


def proof(
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    *,
    method: str = "GET",
    url: str = URL,
    now: float | None = None,
    jti: str | None = None,
) -> tuple[bytes, bytes]:
    token = make_proof(
        key,
        device_id=device_id,
        method=method,
        url=url,
        now=time.time() if now is None else now,
        proof_id=jti,
    )
    return (b"dpop", token.encode())


async def check(
    stage: DeviceStage,
    headers: list[tuple[bytes, bytes]],
    *,
    identity: Identity | None = None,
    peer: Peer | None = None,
    method: str = "GET",
    path: str = "/reports/2024",
) -> DeviceCheck:
    return await stage.check(
        [(b"host", APP.encode()), *headers],
        peer=peer or make_peer(authority=APP),
        target=Target(path, "q=1"),
        method=method,
        identity=identity,
        now=time.time(),
    )


async def refused(stage: DeviceStage, headers: list[tuple[bytes, bytes]], **kw: Any) -> Any:
    with pytest.raises(DeviceRefused) as caught:
        await check(stage, headers, **kw)
    return caught.value


# --- DPoP-shaped proofs ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_valid_proof_names_the_device(world: World) -> None:
    """A fresh proof for this method and URL, signed by the device key, proves the device."""
    record, key = await world.enrol()
    result = await check(world.stage, [proof(key, record.id)], identity=user())
    assert result.channel == "proof"
    assert result.device is not None
    assert result.device.id == record.id
    assert result.device.fact.approved is True
    assert result.device.fact.posture is not None
    assert result.device.posture_summary == "linux 12 disk=on fw=on lock=300s"


@pytest.mark.anyio
async def test_a_replayed_proof_is_refused_by_every_replica(world: World) -> None:
    """The same jti twice is refused, also when the second try reaches another worker."""
    record, key = await world.enrol()
    header = proof(key, record.id, jti="once-only-jti")
    await check(world.stage, [header], identity=user())
    error = await refused(world.stage_again(), [header], identity=user())
    assert error.reasons == ("device-proof-invalid",)
    assert error.notes == ("proof-replayed",)
    assert error.status == 401
    # A new jti from the same device on the other worker passes: only the replay was refused.
    await check(world.stage_again(), [proof(key, record.id)], identity=user())


class _ReplayStoreDown:
    """A shared state store that cannot be reached (what gateway.state raises then)."""

    async def put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool:
        raise StateUnavailable("the state store is down")


@pytest.mark.anyio
async def test_a_proof_is_refused_while_the_replay_cache_is_down(world: World) -> None:
    """With the jti store unreachable a valid proof names no device: the stage raises (the
    pipeline answers 503), it never accepts a proof whose single use it could not record."""
    record, key = await world.enrol()
    stage = world.stage_again(replay=_ReplayStoreDown())
    with pytest.raises(StateUnavailable):
        await check(stage, [proof(key, record.id)], identity=user())


@pytest.mark.anyio
async def test_a_proof_for_another_url_is_refused(world: World) -> None:
    """htu must be the URL the client addressed (scheme, authority, path; no query)."""
    record, key = await world.enrol()
    wrong = proof(key, record.id, url=f"https://{APP}/reports/2025")
    assert (await refused(world.stage, [wrong], identity=user())).notes == ("proof-wrong-url",)
    other_host = proof(key, record.id, url="https://other.example.test/reports/2024")
    error = await refused(world.stage, [other_host], identity=user())
    assert error.notes == ("proof-wrong-url",)
    # The query is not part of htu (RFC 9449 §4.2): with it the proof still matches.
    await check(world.stage, [proof(key, record.id, url=URL + "?q=1")], identity=user())


@pytest.mark.anyio
async def test_htu_is_the_url_a_trusted_proxy_says_the_client_used(world: World) -> None:
    """Behind a TLS-terminating trusted proxy the proof covers https://, as the client sent it."""
    record, key = await world.enrol()
    behind = make_peer(authority=APP, scheme="https", via_trusted_proxy=True)
    await check(world.stage, [proof(key, record.id)], identity=user(), peer=behind)
    plain = proof(key, record.id, url=f"http://{APP}/reports/2024")
    error = await refused(world.stage, [plain], identity=user(), peer=behind)
    assert error.notes == ("proof-wrong-url",)


@pytest.mark.anyio
async def test_a_proof_for_another_method_is_refused(world: World) -> None:
    """htm must be the request's method."""
    record, key = await world.enrol()
    post = proof(key, record.id, method="POST")
    error = await refused(world.stage, [post], identity=user(), method="GET")
    assert error.notes == ("proof-wrong-method",)
    await check(world.stage, [proof(key, record.id, method="POST")], identity=user(), method="POST")


@pytest.mark.anyio
async def test_an_old_proof_is_refused(world: World) -> None:
    """A proof older than its max age (60 s) is refused; one from the future beyond 5 s too."""
    record, key = await world.enrol()
    old = proof(key, record.id, now=time.time() - 120)
    assert (await refused(world.stage, [old], identity=user())).notes == ("report-expired",)
    future = proof(key, record.id, now=time.time() + 60)
    assert (await refused(world.stage, [future], identity=user())).notes == ("report-clock-skew",)


@pytest.mark.anyio
async def test_a_proof_signed_with_another_devices_key_is_refused(world: World) -> None:
    """A proof naming device A but signed with device B's key fails the signature check."""
    first, _ = await world.enrol()
    _, other_key = await world.enrol()
    error = await refused(world.stage, [proof(other_key, first.id)], identity=user())
    assert error.notes == ("report-bad-signature",)
    assert error.device_id == first.id


@pytest.mark.anyio
async def test_a_proof_from_an_unknown_device_is_refused(world: World) -> None:
    """A kid the registry does not know is refused, not treated as "no device"."""
    _, key = await world.enrol()
    error = await refused(world.stage, [proof(key, "dev-nobody")], identity=user())
    assert error.notes == ("device-unknown",)


@pytest.mark.anyio
async def test_two_proofs_are_refused(world: World) -> None:
    """Exactly one DPoP header (RFC 9449 §4.3): two are ambiguous."""
    record, key = await world.enrol()
    headers = [proof(key, record.id), proof(key, record.id)]
    assert (await refused(world.stage, headers, identity=user())).notes == ("proof-multiple",)


# --- ownership and status ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_revoked_device_is_refused(world: World) -> None:
    """A valid proof from a revoked device is refused with device-revoked."""
    record, key = await world.enrol()
    await check(world.stage, [proof(key, record.id)], identity=user())
    await world.registry.revoke(record.id, now=time.time(), actor="it")
    error = await refused(world.stage, [proof(key, record.id)], identity=user())
    assert error.reasons == ("device-revoked",)


@pytest.mark.anyio
async def test_another_users_device_is_refused(world: World) -> None:
    """A device bound to one user never serves another user's request."""
    record, key = await world.enrol(subject="u-suzuki")
    error = await refused(world.stage, [proof(key, record.id)], identity=user("u-sato"))
    assert error.reasons == ("device-not-owned",)
    await check(world.stage, [proof(key, record.id)], identity=user("u-suzuki"))


@pytest.mark.anyio
async def test_a_pending_device_is_a_fact_for_the_policy(world: World) -> None:
    """A device IT has not approved yet is proved, and the policy sees approved=False."""
    record, key = await world.enrol(status="pending")
    result = await check(world.stage, [proof(key, record.id)], identity=user())
    assert result.device is not None
    assert result.device.fact.approved is False


@pytest.mark.anyio
async def test_a_stale_registry_knows_no_device(world: World) -> None:
    """When the cache could not refresh for too long, no device is known (device rules deny)."""
    record, key = await world.enrol()
    world.clock.now += 6.0  # past stale_after (5 s) without a successful poll
    result = await check(world.stage, [proof(key, record.id)], identity=user())
    assert result.device is None
    assert result.notes == (NOTE_REGISTRY_STALE,)
    assert result.binding_needed is False  # and no browser is sent to attest into the void
    assert await world.registry.refresh()
    assert (await check(world.stage, [proof(key, record.id)], identity=user())).device is not None


# --- client certificates from a trusted ingress ----------------------------------------------


def cert_header(world: World, record: DeviceRecord, key: ec.EllipticCurvePrivateKey) -> bytes:
    issued = world.ca.issue(record.id, key.public_key(), now=time.time())
    return quote(issued.cert_pem, safe="").encode()  # nginx $ssl_client_escaped_cert


@pytest.mark.anyio
async def test_a_client_certificate_from_a_trusted_proxy_names_the_device(world: World) -> None:
    """The ingress's certificate header, from a trusted proxy, proves the device."""
    record, key = await world.enrol()
    header = (CERT_HEADER.encode(), cert_header(world, record, key))
    trusted = make_peer(authority=APP, via_trusted_proxy=True)
    result = await check(world.stage, [header], identity=user(), peer=trusted)
    assert result.channel == "certificate"
    assert result.device is not None
    assert result.device.id == record.id


@pytest.mark.anyio
async def test_a_client_certificate_header_from_anyone_else_is_ignored(world: World) -> None:
    """From an untrusted peer the header is ignored: no device (and never forwarded)."""
    record, key = await world.enrol()
    header = (CERT_HEADER.encode(), cert_header(world, record, key))
    result = await check(world.stage, [header], identity=user(), peer=make_peer(authority=APP))
    assert result.device is None
    forwarded = upstream_request_headers(
        [(b"host", APP.encode()), header, (b"dpop", b"x.y.z")],
        peer=make_peer(authority=APP),
        route=make_route(),
        request_id="req-0123456789",
        extra_dropped=world.stage.dropped_headers,
    )
    names = {name for name, _ in forwarded}
    assert CERT_HEADER not in names
    assert "dpop" not in names


@pytest.mark.anyio
async def test_a_certificate_of_a_revoked_device_is_refused(world: World) -> None:
    """The certificate is still within its lifetime, but the device is revoked: refused."""
    record, key = await world.enrol()
    header = (CERT_HEADER.encode(), cert_header(world, record, key))
    trusted = make_peer(authority=APP, via_trusted_proxy=True)
    await world.registry.revoke(record.id, now=time.time(), actor="it")
    error = await refused(world.stage, [header], identity=user(), peer=trusted)
    assert error.reasons == ("device-revoked",)


@pytest.mark.anyio
async def test_a_certificate_from_another_ca_is_refused(world: World) -> None:
    """A certificate the device CA did not issue is refused with the CA's precise code."""
    record, key = await world.enrol()
    other = DeviceCA(world.tmp_path / "other-ca")
    other.load()
    issued = other.issue(record.id, key.public_key(), now=time.time())
    header = (CERT_HEADER.encode(), quote(issued.cert_pem, safe="").encode())
    trusted = make_peer(authority=APP, via_trusted_proxy=True)
    error = await refused(world.stage, [header], identity=user(), peer=trusted)
    assert error.reasons == ("device-certificate-invalid",)
    assert error.notes == ("device-certificate-untrusted",)


# --- the browser session's bound device --------------------------------------------------------


async def browser(world: World, subject: str = "u-sato") -> tuple[str, Identity]:
    cookie, _ = await world.sessions.create_main(Login(subject=subject), "town", time.time())
    identity = await world.sessions.lookup(cookie, "gw.example.test", time.time())
    assert identity is not None
    return cookie, identity


@pytest.mark.anyio
async def test_a_session_without_a_binding_needs_the_device_check(world: World) -> None:
    """A browser session with no bound device has no device and is marked for the check."""
    _, identity = await browser(world)
    result = await check(world.stage, [], identity=identity)
    assert result.device is None
    assert result.binding_needed is True


@pytest.mark.anyio
async def test_a_bound_device_serves_its_session_until_the_binding_is_old(world: World) -> None:
    """The bound device is the session's device; past binding_max_age the check is due again."""
    record, _ = await world.enrol()
    cookie, identity = await browser(world)
    assert identity.session_hash is not None
    assert await world.sessions.bind_device(identity.session_hash, record.id, time.time())
    bound = await world.sessions.lookup(cookie, "gw.example.test", time.time())
    assert bound is not None
    assert bound.device_id == record.id
    result = await check(world.stage, [], identity=bound)
    assert result.channel == "session"
    assert result.device is not None
    assert result.device.id == record.id
    short = world.stage_again(binding_max_age=0.001)
    await asyncio.sleep(0.01)
    result = await check(short, [], identity=bound)
    assert result.device is None
    assert result.binding_needed is True


@pytest.mark.anyio
async def test_a_bound_device_that_was_revoked_is_refused(world: World) -> None:
    """A session bound to a device IT revoked is refused with device-revoked."""
    record, _ = await world.enrol()
    cookie, identity = await browser(world)
    assert identity.session_hash is not None
    await world.sessions.bind_device(identity.session_hash, record.id, time.time())
    bound = await world.sessions.lookup(cookie, "gw.example.test", time.time())
    await world.registry.revoke(record.id, now=time.time(), actor="it")
    error = await refused(world.stage, [], identity=bound)
    assert error.reasons == ("device-revoked",)


@pytest.mark.anyio
async def test_a_bearer_identity_without_a_proof_has_no_device(world: World) -> None:
    """Programs prove their device per request; without a proof they have none (no redirect)."""
    result = await check(world.stage, [], identity=user())
    assert result == DeviceCheck()


def test_posture_summary_says_unknown_apart_from_off() -> None:
    """The audit line marks unknown facts '?' and a disabled screen lock 'off'."""
    assert posture_summary(PostureFacts(os="macos", disk_encrypted=False)) == (
        "macos disk=off fw=? lock=?"
    )
    assert posture_summary(PostureFacts(screen_lock=False)) == "? disk=? fw=? lock=off"
    assert posture_summary(None) is None
