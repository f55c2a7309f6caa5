"""The DeviceStore contract, run against SQLite and the real PostgreSQL: add, read, list,
approve, revoke (terminal), tags, certificates, posture counters, last-seen, pending expiry,
the change feed, the race between replicas, unreadable rows and an unreachable store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from registry_helpers import ISSUER, KINDS, T0, Place, new_device, place_fixture

from device_agent.report import PostureFacts
from gateway.devices.model import DeviceError, RegistryUnavailable
from gateway.devices.store_factory import open_device_store
from gateway.devices.store_postgres import PostgresDeviceStore
from gateway.devices.store_rows import MalformedRow, is_malformed_marker
from gateway.devices.store_sqlite import SqliteDeviceStore

pytestmark = pytest.mark.anyio
FACTS = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=None)


@pytest.fixture(params=KINDS)
async def place(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Place]:
    """One test's device store location, SQLite or a fresh PostgreSQL schema."""
    async for p in place_fixture(request.param, tmp_path):
        yield p


async def accept(store: object, device_id: str, counter: int, **changes: object) -> object:
    args: dict[str, object] = {
        "counter": counter,
        "facts": FACTS,
        "reported_at": T0 + counter,
        "received_at": T0 + counter + 1,
        "loopback_port": 47801,
    }
    args.update(changes)
    return await store.accept_posture(device_id, **args)  # type: ignore[attr-defined]


async def test_add_and_read_back(place: Place) -> None:
    """A new device comes back with every field, by id and by key thumbprint."""
    store = await place.store()
    device, _ = new_device(tags=frozenset({"town-issued"}), key_storage="tpm-claimed")
    added = await store.add(device)
    assert added.id == device.id
    assert added.status == "pending"
    assert added.key_storage == "tpm-claimed"
    assert added.tags == frozenset({"town-issued"})
    assert added.owner == (ISSUER, "u-sato")
    assert added.owner_email == "sato@town.example"
    assert added.posture is None
    assert added.posture_counter == -1
    assert added.approved_at is None
    assert added.version > 0
    assert await store.get(device.id) == added
    assert await store.by_thumbprint(device.key_thumbprint) == added
    assert await store.get("dev-nope") is None
    assert await store.ping()


async def test_an_approved_enrolment_is_approved_at_creation(place: Place) -> None:
    """A device created approved (auto-approval) carries its approval time."""
    store = await place.store()
    added = await store.add(new_device(status="approved", actor="policy:auto")[0])
    assert (added.status, added.approved_at, added.actor) == ("approved", T0, "policy:auto")


async def test_a_key_enrols_once(place: Place) -> None:
    """A second device with the same key is refused 409 and nothing is stored; so is a taken id."""
    store = await place.store()
    first, key = new_device()
    await store.add(first)
    before = place.snapshot()
    with pytest.raises(DeviceError) as caught:
        await store.add(new_device(key, owner_subject="u-ito")[0])
    assert (caught.value.code, caught.value.status) == ("device-key-already-enrolled", 409)
    with pytest.raises(DeviceError) as taken:
        await store.add(new_device(id=first.id)[0])
    assert (taken.value.code, taken.value.status) == ("device-already-exists", 409)
    assert place.snapshot() == before


async def test_a_new_device_must_be_pending_or_approved(place: Place) -> None:
    """Creating a device already revoked is a programming error, refused before any write."""
    store = await place.store()
    before = place.snapshot()
    with pytest.raises(ValueError, match="pending or approved"):
        await store.add(new_device(status="revoked")[0])
    assert place.snapshot() == before


async def test_list_filters_by_status_and_owner(place: Place) -> None:
    """list() narrows by status and owner, oldest first, and honours the limit."""
    store = await place.store()
    a = await store.add(new_device(created_at=T0 + 1)[0])
    b = await store.add(new_device(created_at=T0 + 2, status="approved")[0])
    c = await store.add(new_device(created_at=T0 + 3, owner_subject="u-ito")[0])
    assert [d.id for d in await store.list()] == [a.id, b.id, c.id]
    assert [d.id for d in await store.list(status="pending")] == [a.id, c.id]
    assert [d.id for d in await store.list(status="approved")] == [b.id]
    assert [d.id for d in await store.list(owner=(ISSUER, "u-ito"))] == [c.id]
    assert [d.id for d in await store.list(owner=("https://other", "u-ito"))] == []
    assert [d.id for d in await store.list(status="pending", owner=(ISSUER, "u-sato"))] == [a.id]
    assert [d.id for d in await store.list(limit=2)] == [a.id, b.id]


async def test_approve_then_revoke_and_revoked_is_final(place: Place) -> None:
    """Approve sets time and actor; revoke is terminal: nothing changes a revoked device."""
    store = await place.store()
    device = await store.add(new_device()[0])
    approved = await store.set_status(device.id, "approved", now=T0 + 10, actor="it@town")
    assert approved is not None
    assert (approved.status, approved.approved_at, approved.actor) == (
        "approved",
        T0 + 10,
        "it@town",
    )
    assert approved.version > device.version
    again = await store.set_status(device.id, "approved", now=T0 + 20, actor="other")
    assert again == approved  # approving twice changes nothing
    revoked = await store.set_status(device.id, "revoked", now=T0 + 30, actor="it@town")
    assert revoked is not None
    assert (revoked.status, revoked.revoked_at) == ("revoked", T0 + 30)
    frozen = place.snapshot()
    assert await store.set_status(device.id, "approved", now=T0 + 40, actor="x") is None
    assert await store.set_status(device.id, "revoked", now=T0 + 40, actor="x") is None
    assert await store.set_tags(device.id, frozenset({"a"}), now=T0 + 40, actor="x") is None
    assert await store.set_certificate(device.id, "abc", T0 + 99, now=T0 + 40) is None
    assert await store.set_key_storage(device.id, "tpm", now=T0 + 40) is None
    assert await accept(store, device.id, 5) is None
    assert await store.set_status("dev-nope", "approved", now=T0, actor="x") is None
    assert place.snapshot() == frozen


async def test_the_database_itself_keeps_revoked_final(place: Place) -> None:
    """Even a hand-written UPDATE cannot bring a revoked device back (a trigger refuses)."""
    store = await place.store()
    device = await store.add(new_device()[0])
    await store.set_status(device.id, "revoked", now=T0, actor="it")
    with pytest.raises(Exception, match="revoked device stays revoked"):
        place.raw("UPDATE devices SET status = 'approved' WHERE id = ?", (device.id,))
    assert (await store.get(device.id)).status == "revoked"  # type: ignore[union-attr]


async def test_tags_are_replaced_and_checked(place: Place) -> None:
    """set_tags replaces the set; a tag outside the allowed shape is refused unchanged."""
    store = await place.store()
    device = await store.add(new_device(tags=frozenset({"old"}))[0])
    tagged = await store.set_tags(
        device.id, frozenset({"town-issued", "fin:2"}), now=T0, actor="it"
    )
    assert tagged is not None
    assert tagged.tags == frozenset({"town-issued", "fin:2"})
    assert tagged.actor == "it"
    before = place.snapshot()
    for bad in ("Upper", "", "space tag", "x" * 65, "ü"):
        with pytest.raises(DeviceError) as caught:
            await store.set_tags(device.id, frozenset({bad}), now=T0, actor="it")
        assert caught.value.code == "device-tag-invalid"
    with pytest.raises(DeviceError):
        await store.set_tags(device.id, frozenset(f"t{i}" for i in range(33)), now=T0, actor="it")
    assert place.snapshot() == before


async def test_certificate_serial_is_found_in_any_spelling(place: Place) -> None:
    """The certificate serial is stored normalised and found as nginx (uppercase) writes it."""
    store = await place.store()
    device = await store.add(new_device(status="approved")[0])
    with_cert = await store.set_certificate(device.id, "00AB12CD", T0 + 86400, now=T0)
    assert with_cert is not None
    assert (with_cert.cert_serial, with_cert.cert_not_after) == ("ab12cd", T0 + 86400)
    assert await store.by_cert_serial("AB12CD") == with_cert
    assert await store.by_cert_serial("ab:12:cd") == with_cert
    assert await store.by_cert_serial("ffff") is None
    assert await store.by_cert_serial("not hex") is None


async def test_key_storage_is_upgraded_after_attestation(place: Place) -> None:
    """A tpm-claimed key becomes tpm once attestation is verified."""
    store = await place.store()
    device = await store.add(new_device(key_storage="tpm-claimed")[0])
    upgraded = await store.set_key_storage(device.id, "tpm", now=T0)
    assert upgraded is not None
    assert upgraded.key_storage == "tpm"


async def test_posture_needs_a_larger_counter(place: Place) -> None:
    """A report is stored only with a counter above the last; equal or lower changes nothing."""
    store = await place.store()
    device = await store.add(new_device()[0])
    stored = await accept(store, device.id, 3)
    assert stored is not None
    assert stored.posture == FACTS  # type: ignore[attr-defined]
    assert stored.posture_counter == 3  # type: ignore[attr-defined]
    assert stored.posture_reported_at == T0 + 3  # type: ignore[attr-defined]
    assert stored.posture_at == T0 + 4  # type: ignore[attr-defined]
    assert stored.loopback_port == 47801  # type: ignore[attr-defined]
    assert stored.last_seen == T0 + 4  # type: ignore[attr-defined]
    before = place.snapshot()
    assert await accept(store, device.id, 3, facts=PostureFacts(os="macos")) is None
    assert await accept(store, device.id, 2) is None
    assert place.snapshot() == before
    later = await accept(store, device.id, 4, loopback_port=None)
    assert later is not None
    assert later.loopback_port is None  # type: ignore[attr-defined]
    assert await accept(store, "dev-nope", 9) is None


async def test_two_replicas_racing_on_one_report_accept_it_once(place: Place) -> None:
    """Two store instances storing the same counter at once: exactly one wins, every time."""
    one, two = await place.store(), await place.store()
    device = await one.add(new_device()[0])
    for counter in range(10):
        results = await asyncio.gather(
            accept(one, device.id, counter), accept(two, device.id, counter)
        )
        assert sum(r is not None for r in results) == 1
    final = await one.get(device.id)
    assert final is not None
    assert final.posture_counter == 9


async def test_touch_moves_last_seen_forward_only_and_is_not_a_change(place: Place) -> None:
    """last_seen is batched, never goes back, and does not bump the change version."""
    store = await place.store()
    a = await store.add(new_device()[0])
    b = await store.add(new_device()[0])
    _, version = await store.changed_since(0)
    await store.touch([(a.id, T0 + 50), (b.id, T0 + 60), ("dev-nope", T0)])
    await store.touch([(a.id, T0 + 40)])
    assert (await store.get(a.id)).last_seen == T0 + 50  # type: ignore[union-attr]
    assert (await store.get(b.id)).last_seen == T0 + 60  # type: ignore[union-attr]
    changed, now_version = await store.changed_since(version)
    assert (list(changed), now_version) == ([], version)
    await store.touch([])


async def test_expire_pending_revokes_only_old_pending_devices(place: Place) -> None:
    """Pending devices older than the cut-off are revoked (actor "expired"); others stay."""
    store = await place.store()
    old = await store.add(new_device(created_at=T0)[0])
    young = await store.add(new_device(created_at=T0 + 100)[0])
    approved = await store.add(new_device(created_at=T0, status="approved")[0])
    assert await store.expire_pending(T0 + 50, now=T0 + 200) == 1
    expired = await store.get(old.id)
    assert expired is not None
    assert (expired.status, expired.revoked_at, expired.actor) == ("revoked", T0 + 200, "expired")
    assert (await store.get(young.id)).status == "pending"  # type: ignore[union-attr]
    assert (await store.get(approved.id)).status == "approved"  # type: ignore[union-attr]
    assert await store.expire_pending(T0 + 50, now=T0 + 300) == 0


async def test_changed_since_returns_every_change_in_order(place: Place) -> None:
    """Each write gets a larger version; changed_since(v) gives exactly the later changes, in
    version order, and the version to ask from next time."""
    store = await place.store()
    _, start = await store.changed_since(0)
    a = await store.add(new_device()[0])
    b = await store.add(new_device()[0])
    after_adds = b.version
    a2 = await store.set_status(a.id, "approved", now=T0, actor="it")
    b2 = await accept(store, b.id, 1)
    assert a2 is not None
    assert b2 is not None
    assert start < a.version < b.version < a2.version < b2.version  # type: ignore[attr-defined]
    changed, current = await store.changed_since(start)
    assert [(r.id, r.version) for r in changed] == [(a.id, a2.version), (b.id, b2.version)]  # type: ignore[attr-defined]
    assert current == b2.version  # type: ignore[attr-defined]
    later, _ = await store.changed_since(after_adds)
    assert [r.id for r in later] == [a.id, b.id]
    nothing, unchanged = await store.changed_since(current)
    assert (list(nothing), unchanged) == ([], current)
    refused = await store.set_status("dev-nope", "approved", now=T0, actor="it")
    assert refused is None
    assert (await store.changed_since(current))[1] == current  # a refused write is no change


async def test_a_follower_misses_no_change_under_concurrent_writers(place: Place) -> None:
    """Three store instances write at once while a fourth follows the feed: after a last poll
    the follower's view equals the table — no version was handed out and committed out of order
    behind its back."""
    writers = [await place.store() for _ in range(3)]
    reader = await place.store()
    devices = [await writers[0].add(new_device()[0]) for _ in range(3)]
    view: dict[str, int] = {}
    cursor = 0
    done = False

    async def write(store: object, device_id: str) -> None:
        for i in range(25):
            await store.set_tags(device_id, frozenset({f"t{i}"}), now=T0, actor="it")  # type: ignore[attr-defined]

    async def follow() -> None:
        nonlocal cursor
        while not done:
            changed, cursor = await reader.changed_since(cursor)
            view.update((r.id, r.version) for r in changed)
            await asyncio.sleep(0)

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(write(w, d.id) for w, d in zip(writers, devices, strict=True)))
    done = True
    await follower
    changed, cursor = await reader.changed_since(cursor)
    view.update((r.id, r.version) for r in changed)
    stored = {r.id: r.version for r in await reader.list()}
    assert view == stored


async def test_an_unreadable_row_never_crashes(place: Place) -> None:
    """A row edited into nonsense: get() refuses precisely, list() leaves it out, the change
    feed marks the device so caches forget it."""
    store = await place.store()
    good = await store.add(new_device()[0])
    bad = await store.add(new_device()[0])
    _, version = await store.changed_since(0)
    place.raw(
        "UPDATE devices SET posture = ?, version = version + 1000 WHERE id = ?",
        ('{"os": "amiga"}', bad.id),
    )
    with pytest.raises(MalformedRow) as caught:
        await store.get(bad.id)
    assert (caught.value.code, caught.value.status) == ("device-record-malformed", 500)
    assert [d.id for d in await store.list()] == [good.id]
    changed, _ = await store.changed_since(version)
    assert [(r.id, is_malformed_marker(r)) for r in changed] == [(bad.id, True)]
    assert changed[0].status == "revoked"


async def test_an_unreachable_store_is_unavailable(tmp_path: Path) -> None:
    """A store that cannot be opened raises RegistryUnavailable (fail closed), never a crash."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sqlite = SqliteDeviceStore(blocker / "devices.db")
    with pytest.raises(RegistryUnavailable) as caught:
        await sqlite.open()
    assert caught.value.code == "device-registry-unavailable"
    assert not await sqlite.ping()
    await sqlite.close()
    postgres = PostgresDeviceStore("postgresql://nobody@127.0.0.1:1/none", timeout=1.0)
    with pytest.raises(RegistryUnavailable):
        await postgres.open()
    assert not await postgres.ping()
    await postgres.close()


async def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    """The SQLite file holds owners' e-mail addresses: mode 0600 in a 0700 directory."""
    store = SqliteDeviceStore(tmp_path / "new" / "devices.db")
    await store.open()
    await store.close()
    assert (tmp_path / "new" / "devices.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_store_urls(tmp_path: Path) -> None:
    """open_device_store reads sqlite:/// (relative or absolute) and postgresql:// URLs."""
    relative = open_device_store("sqlite:///devices.db", base_dir=tmp_path)
    assert isinstance(relative, SqliteDeviceStore)
    assert relative.path == tmp_path / "devices.db"
    absolute = open_device_store("sqlite:////var/lib/tabiji/devices.db")
    assert isinstance(absolute, SqliteDeviceStore)
    assert absolute.path == Path("/var/lib/tabiji/devices.db")
    assert isinstance(open_device_store("postgresql://db/tabiji"), PostgresDeviceStore)
    assert isinstance(open_device_store("postgres://db/tabiji", schema="dev"), PostgresDeviceStore)
    for bad in ("sqlite://devices.db", "sqlite:///", "redis://x", "postgresql://", "devices.db"):
        with pytest.raises(ValueError, match="device store"):
            open_device_store(bad, base_dir=tmp_path)
    with pytest.raises(ValueError, match="relative"):
        open_device_store("sqlite:///devices.db")
