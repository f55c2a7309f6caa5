"""The registry's in-process copy: loaded at start, O(1) lookups without I/O, following changes
made by another replica within one poll, failing closed when stale, batching last-seen, telling
listeners, and refusing writes to unknown or revoked devices precisely."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from registry_helpers import ISSUER, KINDS, T0, Place, new_device, place_fixture

from device_agent.report import PostureFacts
from gateway.devices.model import DeviceError, DeviceRecord
from gateway.devices.registry import DeviceRegistry
from gateway.devices.store_sqlite import SqliteDeviceStore

pytestmark = pytest.mark.anyio


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=KINDS)
async def place(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Place]:
    """One test's device store location, SQLite or a fresh PostgreSQL schema."""
    async for p in place_fixture(request.param, tmp_path):
        yield p


async def started(place: Place, **options: object) -> DeviceRegistry:
    """A registry on a new store instance of `place`, loaded; its follower is stopped so the
    test decides when it polls."""
    registry = DeviceRegistry(place.new_store(), **options)  # type: ignore[arg-type]
    await registry.start()
    assert registry._task is not None
    registry._task.cancel()
    registry._task = None
    return registry


async def test_start_loads_every_device(place: Place) -> None:
    """Devices stored before start are in the copy at once; unknown ids are None."""
    store = await place.store()
    a = await store.add(new_device(status="approved")[0])
    b = await store.add(new_device(owner_subject="u-ito")[0])
    registry = await started(place)
    assert registry.fresh
    assert registry.get_cached(a.id) == a
    assert registry.get_cached(b.id) == b
    assert registry.get_cached("dev-nope") is None
    assert registry.owner_devices_cached((ISSUER, "u-sato")) == (a,)
    assert registry.owner_devices_cached((ISSUER, "u-ito")) == (b,)
    assert registry.owner_devices_cached((ISSUER, "u-nobody")) == ()


async def test_a_change_on_another_replica_arrives_within_one_poll(place: Place) -> None:
    """Replica two revokes a device, tags another and stores a report; replica one sees all of it
    after a single poll, and tells its listeners."""
    first = await started(place)
    second = await started(place)
    a = await second.add(new_device(status="approved")[0])
    b = await second.add(new_device(status="approved")[0])
    assert first.get_cached(a.id) is None  # not yet polled
    await first.refresh()
    assert first.get_cached(a.id) == a
    seen: list[tuple[str, str, str | None]] = []
    first.on_change(lambda new, old: seen.append((new.id, new.status, old.status if old else None)))

    await second.revoke(a.id, now=T0, actor="it")
    await second.set_tags(b.id, frozenset({"town-issued"}), now=T0, actor="it")
    await second.accept_posture(
        b.id,
        counter=1,
        facts=PostureFacts(os="linux"),
        reported_at=T0,
        received_at=T0,
        loopback_port=None,
    )
    assert await first.refresh()
    revoked = first.get_cached(a.id)
    assert revoked is not None
    assert revoked.status == "revoked"
    tagged = first.get_cached(b.id)
    assert tagged is not None
    assert tagged.tags == frozenset({"town-issued"})
    assert tagged.posture == PostureFacts(os="linux")
    assert seen == [(a.id, "revoked", "approved"), (b.id, "approved", "approved")]
    await first.refresh()
    assert len(seen) == 2  # nothing new, nobody told twice


async def test_the_running_follower_picks_up_changes(place: Place) -> None:
    """With the follower task running, a revocation elsewhere reaches the copy by itself."""
    registry = DeviceRegistry(place.new_store(), poll_interval=0.05, stale_after=5.0)
    await registry.start()
    try:
        other = await started(place)
        device = await other.add(new_device(status="approved")[0])
        await other.revoke(device.id, now=T0, actor="it")
        for _ in range(400):  # bounded wait; no timing assertion
            record = registry.get_cached(device.id)
            if record is not None and record.status == "revoked":
                break
            await asyncio.sleep(0.025)
        assert registry.get_cached(device.id).status == "revoked"  # type: ignore[union-attr]
    finally:
        await registry.stop()


async def test_local_writes_update_the_copy_at_once(place: Place) -> None:
    """approve, revoke, tag, certificate and key storage show in the copy without a poll, and
    listeners hear of each."""
    registry = await started(place)
    heard: list[str] = []
    unsubscribe = registry.on_change(lambda new, old: heard.append(new.status))
    device = await registry.add(new_device(key_storage="tpm-claimed")[0])
    await registry.approve(device.id, now=T0, actor="it")
    assert registry.get_cached(device.id).status == "approved"  # type: ignore[union-attr]
    await registry.set_certificate(device.id, "AB01", T0 + 100, now=T0)
    assert registry.by_cert_serial_cached("ab01").id == device.id  # type: ignore[union-attr]
    await registry.set_certificate(device.id, "cd02", T0 + 100, now=T0)
    assert registry.by_cert_serial_cached("AB01") is None  # the old serial is no longer current
    assert registry.by_cert_serial_cached("CD02").id == device.id  # type: ignore[union-attr]
    assert registry.by_cert_serial_cached("zz") is None
    await registry.set_key_storage(device.id, "tpm", now=T0)
    assert registry.get_cached(device.id).key_storage == "tpm"  # type: ignore[union-attr]
    await registry.revoke(device.id, now=T0, actor="it")
    assert registry.get_cached(device.id).status == "revoked"  # type: ignore[union-attr]
    assert heard == ["pending", "approved", "approved", "approved", "approved", "revoked"]
    unsubscribe()
    await registry.refresh()
    assert len(heard) == 6


async def test_writes_to_unknown_or_revoked_devices_are_refused(place: Place) -> None:
    """An unknown device is device-unknown (404); a revoked one stays revoked (409)."""
    registry = await started(place)
    device = await registry.add(new_device()[0])
    await registry.revoke(device.id, now=T0, actor="it")
    writes: list[Callable[[str], Awaitable[DeviceRecord]]] = [
        lambda i: registry.approve(i, now=T0, actor="it"),
        lambda i: registry.revoke(i, now=T0, actor="it"),
        lambda i: registry.set_tags(i, frozenset({"x"}), now=T0, actor="it"),
        lambda i: registry.set_certificate(i, "01", T0, now=T0),
    ]
    for write in writes:
        with pytest.raises(DeviceError) as revoked:
            await write(device.id)
        assert (revoked.value.code, revoked.value.status) == ("device-revoked", 409)
        with pytest.raises(DeviceError) as unknown:
            await write("dev-nope")
        assert (unknown.value.code, unknown.value.status) == ("device-unknown", 404)


def is_fresh(registry: DeviceRegistry) -> bool:
    return registry.fresh  # read through a call: the value changes as the clock moves


async def test_a_stale_copy_knows_no_device(place: Place) -> None:
    """When the follower has not succeeded for longer than stale_after, every lookup answers
    unknown; one successful poll makes the copy trusted again."""
    clock = Clock()
    registry = await started(place, clock=clock, poll_interval=0.5, stale_after=5.0)
    device = await registry.add(new_device(status="approved")[0])
    await registry.set_certificate(device.id, "ab", T0 + 100, now=T0)
    clock.now += 5.0
    assert is_fresh(registry)
    assert registry.get_cached(device.id) is not None
    clock.now += 0.5
    assert not is_fresh(registry)
    assert registry.age == 5.5
    assert registry.get_cached(device.id) is None
    assert registry.by_cert_serial_cached("ab") is None
    assert registry.owner_devices_cached(device.owner) == ()
    assert await registry.refresh()
    assert registry.fresh
    assert registry.get_cached(device.id) is not None


async def test_an_unreachable_store_makes_the_copy_stale(tmp_path: Path) -> None:
    """A follower that cannot read the store keeps failing closed, and recovers when it can."""
    clock = Clock()
    path = tmp_path / "devices.db"
    registry = DeviceRegistry(SqliteDeviceStore(path), clock=clock)
    await registry.start()
    registry._task.cancel()  # type: ignore[union-attr]
    device = await registry.add(new_device(status="approved")[0])
    path.unlink()
    (tmp_path / "devices.db-wal").unlink(missing_ok=True)
    path.mkdir()  # the file is gone and cannot be recreated: every read fails
    await registry.store.close()
    assert not await registry.refresh()
    clock.now += 10
    assert registry.get_cached(device.id) is None
    path.rmdir()
    assert await registry.refresh()  # a fresh, empty store: still nothing known
    assert registry.fresh
    await registry.stop()


async def test_never_loaded_is_not_fresh(tmp_path: Path) -> None:
    """Before the first successful load the copy is not trusted (age is infinite)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    registry = DeviceRegistry(SqliteDeviceStore(blocker / "devices.db"))
    await registry.start()  # the store is unreachable: start does not fail, it stays stale
    assert registry.age == float("inf")
    assert not registry.fresh
    await registry.stop()


async def test_last_seen_is_batched_through_the_follower(place: Place) -> None:
    """seen() costs no I/O; the next poll writes the latest time per device in one batch."""
    registry = await started(place)
    device = await registry.add(new_device()[0])
    registry.seen(device.id, T0 + 5)
    registry.seen(device.id, T0 + 9)
    registry.seen(device.id, T0 + 7)
    assert (await registry.store.get(device.id)).last_seen is None  # type: ignore[union-attr]
    await registry.refresh()
    assert (await registry.store.get(device.id)).last_seen == T0 + 9  # type: ignore[union-attr]


async def test_a_malformed_row_makes_the_device_unknown(place: Place) -> None:
    """A row that cannot be read is dropped from the copy (deny), and listeners hear of it."""
    registry = await started(place)
    device = await registry.add(new_device(status="approved")[0])
    heard: list[tuple[str, str]] = []
    registry.on_change(lambda new, old: heard.append((new.id, new.status)))
    place.raw(
        "UPDATE devices SET tags = ?, version = version + 1000 WHERE id = ?", ("[1]", device.id)
    )
    await registry.refresh()
    assert registry.get_cached(device.id) is None
    assert registry.owner_devices_cached(device.owner) == ()
    assert heard == [(device.id, "revoked")]


async def test_pending_devices_expire_through_the_follower(place: Place) -> None:
    """With pending_ttl set, the follower revokes devices left pending too long."""
    clock = Clock()
    registry = await started(place, pending_ttl=3600.0, clock=clock, wall_clock=lambda: T0 + 7200)
    old = await registry.add(new_device(created_at=T0)[0])
    young = await registry.add(new_device(created_at=T0 + 7000)[0])
    await registry.refresh()
    assert registry.get_cached(old.id).status == "pending"  # type: ignore[union-attr]  # swept at start, once a minute
    clock.now += 61
    await registry.refresh()
    assert registry.get_cached(old.id).status == "revoked"  # type: ignore[union-attr]
    assert registry.get_cached(young.id).status == "pending"  # type: ignore[union-attr]


async def test_keys_are_parsed_once(place: Place) -> None:
    """key_of returns the same parsed key object for a device; a bad PEM is device-key-invalid."""
    registry = await started(place)
    device = await registry.add(new_device()[0])
    assert registry.key_of(device) is registry.key_of(registry.get_cached(device.id))  # type: ignore[arg-type]
    broken = device.with_changes(id="dev-broken", public_key_pem="-----BEGIN nonsense")
    with pytest.raises(DeviceError) as caught:
        registry.key_of(broken)
    assert caught.value.code == "device-key-invalid"


async def test_a_failing_listener_does_not_stop_the_others(place: Place) -> None:
    """A listener that raises is logged; the write succeeds and later listeners still run."""
    registry = await started(place)
    heard: list[DeviceRecord] = []

    def broken(new: DeviceRecord, old: DeviceRecord | None) -> None:
        raise RuntimeError("listener bug")

    registry.on_change(broken)
    registry.on_change(lambda new, old: heard.append(new))
    device = await registry.add(new_device()[0])
    assert heard == [device]


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_a_store_that_went_back_is_reloaded(tmp_path: Path) -> None:
    """If the store's version is below the copy's (restored from backup), the copy is rebuilt
    from scratch instead of waiting for versions it has already passed."""
    path = tmp_path / "devices.db"
    registry = DeviceRegistry(SqliteDeviceStore(path))
    await registry.start()
    registry._task.cancel()  # type: ignore[union-attr]
    gone = await registry.add(new_device()[0])
    await registry.approve(gone.id, now=T0, actor="it")
    await registry.set_tags(gone.id, frozenset({"x"}), now=T0, actor="it")  # version 3
    await registry.refresh()
    await registry.store.close()
    remove_database(path)
    other = SqliteDeviceStore(path)
    kept = await other.add(new_device()[0])
    await other.close()
    assert await registry.refresh()
    assert registry.get_cached(gone.id) is None
    assert registry.get_cached(kept.id) == kept
    await registry.stop()
