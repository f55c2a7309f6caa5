"""Two replicas on one device store: what replica A just accepted (an enrolment, a posture report)
is honoured by replica B on the next request, through one rate-limited re-read of that device on
the way to a refusal — never on the allow path, never from a stale copy, never unbounded.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import PostureFacts, make_proof
from gateway.devices.model import DeviceRecord
from gateway.devices.registry import REREAD_BUDGET, REREAD_PER_DEVICE, DeviceRegistry
from gateway.devices.stage import DeviceCheck, DeviceRefused, DeviceStage
from gateway.devices.store_sqlite import SqliteDeviceStore
from gateway.identity.model import Identity
from gateway.state.sqlite import SqliteStateStore
from gateway.target import Target
from tests.gateway.devices.registry_helpers import ISSUER, new_device
from tests.gateway.factories import make_peer

APP = "app.example.test"
URL = f"https://{APP}/reports/2024"
POLL = 0.5
BAD = PostureFacts(os="linux", os_version="12", disk_encrypted=False, firewall=True)
GOOD = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=True)


class Clock:
    """A monotonic clock the test moves (one per replica)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(SqliteDeviceStore):
    """The SQLite store, counting single-device reads (what a re-read costs the store)."""

    gets = 0

    async def get(self, device_id: str) -> DeviceRecord | None:
        self.gets += 1
        return await super().get(device_id)


@dataclass
class Replicas:
    a: DeviceRegistry  # where the agent's report or the enrolment lands
    b: DeviceRegistry  # where the next request goes, before its follower has polled
    b_store: CountingStore
    b_clock: Clock
    stage_b: DeviceStage


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    db = tmp_path / "devices.db"
    a = DeviceRegistry(SqliteDeviceStore(db), poll_interval=POLL, stale_after=5.0, clock=Clock())
    b_clock = Clock()
    b_store = CountingStore(db)
    b = DeviceRegistry(b_store, poll_interval=POLL, stale_after=5.0, clock=b_clock)
    for registry in (a, b):
        await registry.store.open()
        assert await registry.refresh()
    state = SqliteStateStore(tmp_path / "state.db")
    await state.open()
    stage_b = DeviceStage(registry=b, replay=state, sessions=None)
    yield Replicas(a, b, b_store, b_clock, stage_b)
    await state.close()
    for registry in (a, b):
        await registry.store.close()


def user() -> Identity:
    return Identity(
        issuer=ISSUER,
        subject="u-sato",
        method="bearer",
        provider="town",
        email="sato@town.example",
        email_verified=True,
        expires_at=time.time() + 3600,
    )


async def enrol_on_a(
    r: Replicas, facts: PostureFacts = BAD
) -> tuple[DeviceRecord, ec.EllipticCurvePrivateKey]:
    device, key = new_device(status="approved")
    record = await r.a.add(device)
    now = time.time()
    updated = await r.a.accept_posture(
        record.id, counter=1, facts=facts, reported_at=now, received_at=now, loopback_port=None
    )
    assert updated is not None
    return updated, key


async def check_on_b(r: Replicas, record: DeviceRecord, key: ec.EllipticCurvePrivateKey) -> Any:
    token = make_proof(key, device_id=record.id, method="GET", url=URL, now=time.time())
    return await r.stage_b.check(
        [(b"host", APP.encode()), (b"dpop", token.encode())],
        peer=make_peer(authority=APP),
        target=Target("/reports/2024", ""),
        method="GET",
        identity=user(),
        now=time.time(),
    )


async def report_on_a(r: Replicas, record: DeviceRecord, facts: PostureFacts) -> DeviceRecord:
    now = time.time()
    updated = await r.a.accept_posture(
        record.id, counter=2, facts=facts, reported_at=now, received_at=now, loopback_port=None
    )
    assert updated is not None
    return updated


@pytest.mark.anyio
async def test_a_device_enrolled_on_another_replica_is_known_on_the_next_request(
    replicas: Replicas,
) -> None:
    """B's copy has not polled since A enrolled the device: its proof is still accepted."""
    record, key = await enrol_on_a(replicas)
    assert replicas.b.get_cached(record.id) is None  # B has not polled
    result = await check_on_b(replicas, record, key)
    assert result.device is not None
    assert result.device.id == record.id
    assert replicas.b_store.gets == 1


@pytest.mark.anyio
async def test_recheck_brings_the_report_another_replica_just_accepted(
    replicas: Replicas,
) -> None:
    """B decided on the old posture (disk not encrypted); the recheck before refusing finds
    A's newer report, so the decision can be made again on it."""
    record, key = await enrol_on_a(replicas, BAD)
    assert await replicas.b.refresh()
    seen = await check_on_b(replicas, record, key)
    assert seen.device is not None
    assert seen.device.fact.posture is not None
    assert seen.device.fact.posture.disk_encrypted is False
    newer = await report_on_a(replicas, record, GOOD)
    fresher = await replicas.stage_b.recheck(seen, identity=user(), now=time.time())
    assert fresher is not None
    assert fresher.device is not None
    assert fresher.device.version == newer.version
    assert fresher.device.fact.posture is not None
    assert fresher.device.fact.posture.disk_encrypted is True
    assert fresher.channel == "proof"


@pytest.mark.anyio
async def test_recheck_without_anything_newer_changes_nothing(replicas: Replicas) -> None:
    """Nothing newer in the store: the refusal stands (None), after one store read."""
    record, key = await enrol_on_a(replicas, BAD)
    assert await replicas.b.refresh()
    seen = await check_on_b(replicas, record, key)
    assert await replicas.stage_b.recheck(seen, identity=user(), now=time.time()) is None
    assert replicas.b_store.gets == 1


@pytest.mark.anyio
async def test_recheck_of_no_device_reads_nothing(replicas: Replicas) -> None:
    """A request without a device has nothing to re-read."""
    assert await replicas.stage_b.recheck(DeviceCheck(), identity=user(), now=time.time()) is None
    assert replicas.b_store.gets == 0


@pytest.mark.anyio
async def test_a_revocation_found_by_the_recheck_refuses(replicas: Replicas) -> None:
    """The newer record says revoked: the request is refused as revoked, not decided again."""
    record, key = await enrol_on_a(replicas, BAD)
    assert await replicas.b.refresh()
    seen = await check_on_b(replicas, record, key)
    await replicas.a.revoke(record.id, now=time.time(), actor="it")
    with pytest.raises(DeviceRefused) as caught:
        await replicas.stage_b.recheck(seen, identity=user(), now=time.time())
    assert caught.value.reasons == ("device-revoked",)


@pytest.mark.anyio
async def test_rereads_of_one_device_are_limited_per_poll_interval(replicas: Replicas) -> None:
    """A client refused in a loop costs the store a few reads per device per poll interval."""
    record, _ = await enrol_on_a(replicas)
    for _ in range(REREAD_PER_DEVICE + 5):
        assert await replicas.b.reread(record.id) is not None
    assert replicas.b_store.gets == REREAD_PER_DEVICE
    replicas.b_clock.now += POLL
    assert await replicas.b.refresh()  # the follower keeps the copy fresh meanwhile
    await replicas.b.reread(record.id)
    assert replicas.b_store.gets == REREAD_PER_DEVICE + 1


@pytest.mark.anyio
async def test_a_refusal_then_a_report_elsewhere_then_a_retry_rereads_again(
    replicas: Replicas,
) -> None:
    """Refused on old posture, the agent reports to A, the retry on B within the same poll
    interval still re-reads and sees the new report."""
    record, key = await enrol_on_a(replicas, BAD)
    assert await replicas.b.refresh()
    seen = await check_on_b(replicas, record, key)
    assert await replicas.stage_b.recheck(seen, identity=user(), now=time.time()) is None
    await report_on_a(replicas, record, GOOD)
    fresher = await replicas.stage_b.recheck(seen, identity=user(), now=time.time())
    assert fresher is not None
    assert fresher.device is not None
    assert fresher.device.fact.posture is not None
    assert fresher.device.fact.posture.disk_encrypted is True


@pytest.mark.anyio
async def test_invented_device_ids_cannot_make_unbounded_store_reads(replicas: Replicas) -> None:
    """Device ids in refused proofs are the client's choice: re-reads have a budget per poll
    interval for the whole process."""
    for n in range(REREAD_BUDGET + 10):
        assert await replicas.b.reread(f"dev-invented-{n}") is None
    assert replicas.b_store.gets == REREAD_BUDGET


@pytest.mark.anyio
async def test_a_stale_copy_never_rereads(replicas: Replicas) -> None:
    """A copy whose follower stopped is not trusted, and neither is a re-read through it."""
    record, _ = await enrol_on_a(replicas)
    replicas.b_clock.now += 60  # no successful poll for a minute
    assert await replicas.b.reread(record.id) is None
    assert replicas.b_store.gets == 0
