"""The device registry as the request pipeline sees it: an in-process copy of every device, read
in O(1) with no I/O, kept fresh by a follower that polls the store's change feed.

A revocation or posture change made on any replica reaches every replica within one poll
(0.5 s by default). If the follower cannot reach the store for longer than `stale_after`, the copy
is treated as empty (every device unknown → deny) until it can again. Writes go to the store,
then into the copy at once, then to the change listeners (the pipeline closes WebSockets).
Only on the way to a refusal may one device be re-read from the store (`reread`, a few times
per device per poll interval at most), so a report or enrolment just accepted by another replica is
honoured on the next request. Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import PostureFacts, ReportInvalid, load_public_key
from gateway.devices.model import (
    DeviceError,
    DeviceRecord,
    DeviceStatus,
    DeviceStore,
    KeyStorageFact,
    NewDevice,
    RegistryUnavailable,
)
from gateway.devices.store_rows import is_malformed_marker, normalise_serial

log = logging.getLogger("tabiji.devices")

# (new, old): `old` is None for a device this process had not seen. Called on the event loop;
# must not block. An exception in a listener is logged and never reaches the writer.
DeviceChange = Callable[[DeviceRecord, DeviceRecord | None], None]
SEEN_BUFFER_MAX: Final = 100_000  # last-seen times kept while the store is down (then dropped)
EXPIRE_EVERY: Final = 60.0  # seconds between sweeps of pending devices past their TTL
REREAD_TRACKED_MAX: Final = 10_000  # devices whose last re-read times are remembered (bounded)
# Re-reads of one device per poll interval: a refusal, then the agent's fresh report on another
# replica, then the retry must still get its own re-read; a client refused in a loop may not
# cost the store more than this.
REREAD_PER_DEVICE: Final = 3
# Re-reads per poll interval for the whole process: a device id in a refused proof is chosen by
# the client, so invented ids must not turn refusals into unbounded store reads.
REREAD_BUDGET: Final = 20


class RegistryStore(DeviceStore, Protocol):
    """The stores in this package: DeviceStore plus the key-storage upgrade after attestation."""

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord | None: ...


class DeviceRegistry:
    """The hot-path view of the device store, shared by every request of one worker process.

    `stale_after` bounds how long a change made elsewhere (a revocation on another replica) can go
    unseen here: past it, without a successful poll, every lookup answers "unknown" (fail closed).
    With the defaults a working follower shows a change within 0.5 s, and a broken one stops
    trusting its copy after 5 s.
    """

    def __init__(
        self,
        store: RegistryStore,
        *,
        poll_interval: float = 0.5,
        stale_after: float = 5.0,
        pending_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if stale_after <= poll_interval:
            raise ValueError("stale_after must be longer than poll_interval")
        self.store = store
        self._poll_interval = poll_interval
        self._stale_after = stale_after
        self._pending_ttl = pending_ttl
        self._clock = clock
        self._wall = wall_clock
        self._devices: dict[str, DeviceRecord] = {}
        self._by_serial: dict[str, str] = {}
        self._by_owner: dict[tuple[str, str], dict[str, None]] = {}  # an ordered set of ids
        self._keys: dict[str, tuple[str, ec.EllipticCurvePublicKey]] = {}
        self._listeners: list[DeviceChange] = []
        self._seen: dict[str, float] = {}
        self._cursor = 0
        self._last_ok: float | None = None
        self._last_expiry = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._reread_at: dict[str, list[float]] = {}
        self._reread_window = float("-inf")
        self._reread_spent = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load every device and follow changes. A store that cannot be reached
        is not fatal: the copy stays empty (every device unknown) until the follower succeeds."""
        try:
            await self.store.open()
        except RegistryUnavailable as exc:
            log.error("device registry: store unavailable at start: %s", exc.detail)
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self.follow(), name="tabiji-device-follower")

    async def stop(self) -> None:
        """Stop following, write the buffered last-seen times, close the store."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RegistryUnavailable):
            await self._flush_seen()
        await self.store.close()

    async def follow(self) -> None:
        """Poll the change feed every `poll_interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._poll_interval)
            await self.refresh()

    async def refresh(self) -> bool:
        """One poll: apply changes since the last one, flush last-seen, expire pending devices.
        True when the copy is now up to date with the store."""
        try:
            await self._expire_pending()  # first, so this very poll brings its changes
            records, current = await self.store.changed_since(self._cursor)
            if current < self._cursor:
                # The store went backwards (restored from a backup, replaced): reload it all.
                log.warning("device registry: store version went back; reloading every device")
                self._cursor = 0
                records, current = await self.store.changed_since(0)
                self._replace_all(records)
            else:
                for record in records:
                    self._apply(record)
            self._cursor = max(self._cursor, current)
            self._last_ok = self._clock()
            await self._flush_seen()
        except RegistryUnavailable as exc:
            self._log_failure(exc.detail)
            return False
        except Exception as exc:  # a bug must not stop the follower; staleness fails closed
            self._log_failure(f"{type(exc).__name__}: {exc}")
            return False
        if self._failing:
            log.warning("device registry: store reachable again")
            self._failing = False
        return True

    def _log_failure(self, detail: str) -> None:
        if not self._failing:  # once per outage, not twice a second
            log.error("device registry: cannot follow the store: %s", detail)
        self._failing = True

    # -- hot path (no I/O) ------------------------------------------------------------------

    @property
    def age(self) -> float:
        """Seconds since the copy was last confirmed up to date (inf before the first time)."""
        return float("inf") if self._last_ok is None else self._clock() - self._last_ok

    @property
    def fresh(self) -> bool:
        """The copy may be trusted: the follower succeeded within `stale_after` seconds."""
        return self.age <= self._stale_after

    def get_cached(self, device_id: str) -> DeviceRecord | None:
        """The device, or None when unknown here — or when the copy is stale (fail closed)."""
        if not self.fresh:
            return None
        return self._devices.get(device_id)

    def by_cert_serial_cached(self, serial_hex: str) -> DeviceRecord | None:
        """The device whose current certificate has this serial (hex, any case)."""
        if not self.fresh:
            return None
        try:
            device_id = self._by_serial.get(normalise_serial(serial_hex))
        except DeviceError:
            return None
        return None if device_id is None else self._devices.get(device_id)

    def owner_devices_cached(self, owner: tuple[str, str]) -> tuple[DeviceRecord, ...]:
        """The devices of one user (issuer, subject), oldest first; () when stale."""
        if not self.fresh:
            return ()
        ids = self._by_owner.get(owner)
        return tuple(self._devices[i] for i in ids) if ids else ()

    async def reread(self, device_id: str) -> DeviceRecord | None:
        """The device as the store has it now, for a request about to be refused on what the
        copy says (unknown device, old posture): another replica may have just accepted its
        enrolment or report, and this copy learns of it only at its next poll.

        At most REREAD_PER_DEVICE store reads per device and REREAD_BUDGET in all per poll
        interval (a client refused in a loop, or one inventing device ids, costs the store a
        bounded amount); past them, and when the store cannot answer, the cached copy. Never
        on the allow path: an allowed request is never slowed down, and a revocation still
        reaches it within one poll. None when the copy is stale (fail closed, as `get_cached`).
        """
        if not self.fresh:
            return None
        now = self._clock()
        recent = [t for t in self._reread_at.get(device_id, ()) if now - t < self._poll_interval]
        if len(recent) >= REREAD_PER_DEVICE:
            return self._devices.get(device_id)
        if now - self._reread_window >= self._poll_interval:
            self._reread_window, self._reread_spent = now, 0
        if self._reread_spent >= REREAD_BUDGET:
            return self._devices.get(device_id)
        self._reread_spent += 1
        if len(self._reread_at) >= REREAD_TRACKED_MAX:
            self._reread_at.clear()  # bounded: an attacker's invented ids cannot grow it
        self._reread_at[device_id] = [*recent, now]
        try:
            record = await self.store.get(device_id)
        except Exception as exc:  # the refusal stands; the follower reports the outage (once)
            log.debug("device registry: re-read of one device failed: %s", type(exc).__name__)
            return self._devices.get(device_id)
        if record is not None:
            self._apply(record)
        return self._devices.get(device_id)

    def key_of(self, record: DeviceRecord) -> ec.EllipticCurvePublicKey:
        """The device's public key, parsed once per key (not per request)."""
        cached = self._keys.get(record.id)
        if cached is not None and cached[0] == record.public_key_pem:
            return cached[1]
        try:
            key = load_public_key(record.public_key_pem)
        except ReportInvalid as exc:
            raise DeviceError(code="device-key-invalid", detail=exc.detail, status=500) from exc
        self._keys[record.id] = (record.public_key_pem, key)
        return key

    def seen(self, device_id: str, now: float) -> None:
        """Note that the device was used; written to the store in batches by the follower."""
        if self._seen.get(device_id, 0.0) < now and (
            device_id in self._seen or len(self._seen) < SEEN_BUFFER_MAX
        ):
            self._seen[device_id] = now

    def on_change(self, callback: DeviceChange) -> Callable[[], None]:
        """Call `callback(new, old)` for every change this process learns of; returns a function
        that unsubscribes."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    # -- reads and writes through the store --------------------------------------------------

    async def get(self, device_id: str) -> DeviceRecord | None:
        """The device as the store has it now (for the posture intake and the admin pages)."""
        record = await self.store.get(device_id)
        if record is not None:
            self._apply(record)
        return record

    async def list(
        self,
        *,
        status: DeviceStatus | None = None,
        owner: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> Sequence[DeviceRecord]:
        return await self.store.list(status=status, owner=owner, limit=limit)

    async def add(self, device: NewDevice) -> DeviceRecord:
        return self._apply(await self.store.add(device))

    async def approve(self, device_id: str, *, now: float, actor: str) -> DeviceRecord:
        record = await self.store.set_status(device_id, "approved", now=now, actor=actor)
        return await self._written(device_id, record)

    async def revoke(self, device_id: str, *, now: float, actor: str) -> DeviceRecord:
        record = await self.store.set_status(device_id, "revoked", now=now, actor=actor)
        return await self._written(device_id, record)

    async def set_tags(
        self, device_id: str, tags: frozenset[str], *, now: float, actor: str
    ) -> DeviceRecord:
        record = await self.store.set_tags(device_id, tags, now=now, actor=actor)
        return await self._written(device_id, record)

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord:
        record = await self.store.set_certificate(device_id, serial, not_after, now=now)
        return await self._written(device_id, record)

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord:
        record = await self.store.set_key_storage(device_id, key_storage, now=now)
        return await self._written(device_id, record)

    async def accept_posture(
        self,
        device_id: str,
        *,
        counter: int,
        facts: PostureFacts,
        reported_at: float,
        received_at: float,
        loopback_port: int | None,
    ) -> DeviceRecord | None:
        """Store a verified report (see DeviceStore.accept_posture); None when it lost."""
        record = await self.store.accept_posture(
            device_id,
            counter=counter,
            facts=facts,
            reported_at=reported_at,
            received_at=received_at,
            loopback_port=loopback_port,
        )
        return None if record is None else self._apply(record)

    async def expire_pending(self, older_than: float, *, now: float) -> int:
        """Revoke pending devices created before `older_than`; the follower picks them up."""
        return await self.store.expire_pending(older_than, now=now)

    async def _written(self, device_id: str, record: DeviceRecord | None) -> DeviceRecord:
        if record is not None:
            return self._apply(record)
        # The store changed nothing: say why (the device is unknown, or revoked for good).
        current = await self.get(device_id)
        if current is None:
            raise DeviceError(code="device-unknown", detail=device_id, status=404)
        raise DeviceError(code="device-revoked", detail=device_id, status=409)

    async def _flush_seen(self) -> None:
        if not self._seen:
            return
        batch, self._seen = self._seen, {}
        try:
            await self.store.touch(sorted(batch.items()))
        except BaseException:
            for device_id, when in batch.items():  # keep them for the next flush
                self.seen(device_id, when)
            raise

    async def _expire_pending(self) -> None:
        if self._pending_ttl is None or self._clock() - self._last_expiry < EXPIRE_EVERY:
            return
        self._last_expiry = self._clock()
        now = self._wall()
        expired = await self.store.expire_pending(now - self._pending_ttl, now=now)
        if expired:
            log.info("device registry: %d pending device(s) expired unapproved", expired)

    # -- the copy ----------------------------------------------------------------------------

    def _apply(self, record: DeviceRecord) -> DeviceRecord:
        """Put a record into the copy unless the copy already has a newer one; tell listeners."""
        old = self._devices.get(record.id)
        if old is not None and old.version >= record.version:
            return old if old.version > record.version else record
        if is_malformed_marker(record):
            # An unreadable row: the device becomes unknown here; listeners see it as revoked
            # (its WebSockets close) rather than keep an older, perhaps approved, copy.
            self._forget(record.id)
            if old is not None:
                self._publish(record, old)
            return record
        self._unindex(old)
        self._devices[record.id] = record
        self._index(record)
        self._publish(record, old)
        return record

    def _replace_all(self, records: Sequence[DeviceRecord]) -> None:
        previous = self._devices
        self._devices, self._by_serial, self._by_owner = {}, {}, {}
        for record in records:
            if is_malformed_marker(record):
                continue
            self._devices[record.id] = record
            self._index(record)
            self._publish(record, previous.get(record.id))
        for device_id in previous.keys() - self._devices.keys():
            self._keys.pop(device_id, None)

    def _forget(self, device_id: str) -> None:
        old = self._devices.pop(device_id, None)
        self._unindex(old)
        self._keys.pop(device_id, None)

    def _index(self, record: DeviceRecord) -> None:
        if record.cert_serial:
            self._by_serial[record.cert_serial] = record.id
        self._by_owner.setdefault(record.owner, {})[record.id] = None

    def _unindex(self, record: DeviceRecord | None) -> None:
        if record is None:
            return
        if record.cert_serial and self._by_serial.get(record.cert_serial) == record.id:
            del self._by_serial[record.cert_serial]
        ids = self._by_owner.get(record.owner)
        if ids is not None:
            ids.pop(record.id, None)
            if not ids:
                del self._by_owner[record.owner]

    def _publish(self, new: DeviceRecord, old: DeviceRecord | None) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(new, old)
            except Exception:
                log.exception("device registry: a change listener failed")
