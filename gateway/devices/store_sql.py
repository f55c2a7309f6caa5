"""What the SQLite and PostgreSQL device stores share: every DeviceStore operation that is one
statement, written once over the dialect's placeholders and three primitives each store provides
(a versioned UPDATE … RETURNING, a read, a batch of unversioned updates).

How a change number is taken, how transactions and connections work, `add` and the change feed
stay in each store. Must not import gateway.settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from device_agent.report import PostureFacts
from gateway.devices.model import DeviceError, DeviceRecord, DeviceStatus, KeyStorageFact
from gateway.devices.store_rows import (
    check_tags,
    normalise_serial,
    posture_json,
    row_record,
    rows_or_skip,
    tags_json,
)

Row = Sequence[Any]


class SqlDeviceStore(ABC):
    """The shared half of a SQL DeviceStore; a subclass names its dialect and implements the
    primitives. Values are always bound; only the constant SQL pieces below are formatted in."""

    placeholder: ClassVar[str]  # a bound value: "?" (SQLite) or "%s" (PostgreSQL)
    json_placeholder: ClassVar[str]  # a bound JSON text, as the column stores it
    greatest: ClassVar[str]  # the larger of two values: MAX (SQLite) or GREATEST (PostgreSQL)
    select: ClassVar[str]  # SELECT <COLUMNS as the row codec reads them> FROM devices

    # -- the primitives -----------------------------------------------------------------------

    @abstractmethod
    async def _update(
        self,
        assignments: str,
        set_args: Sequence[Any],
        condition: str,
        where_args: Sequence[Any],
    ) -> Sequence[Row]:
        """`UPDATE devices SET <assignments>, version = <a fresh change number> WHERE
        <condition> RETURNING` the rows, in one transaction; no row matched: nothing changes and
        no change number is spent."""

    @abstractmethod
    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Row]:
        """The rows of one read."""

    @abstractmethod
    async def _update_each(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        """One statement for each argument tuple, in one transaction, with no change number."""

    # -- writes -------------------------------------------------------------------------------

    async def _change(
        self, assignments: str, set_args: Sequence[Any], condition: str, where_args: Sequence[Any]
    ) -> DeviceRecord | None:
        rows = await self._update(assignments, set_args, condition, where_args)
        return row_record(rows[0]) if rows else None

    async def _change_live(
        self, device_id: str, assignments: str, set_args: Sequence[Any]
    ) -> DeviceRecord | None:
        """Change a device that is not revoked (a revoked device is never changed again)."""
        return await self._change(
            assignments, set_args, f"id = {self.placeholder} AND status <> 'revoked'", (device_id,)
        )

    async def set_status(
        self, device_id: str, status: DeviceStatus, *, now: float, actor: str
    ) -> DeviceRecord | None:
        p = self.placeholder
        if status == "approved":
            changed = await self._change(
                f"status = 'approved', approved_at = {p}, actor = {p}",
                (now, actor),
                f"id = {p} AND status = 'pending'",
                (device_id,),
            )
        elif status == "revoked":
            return await self._change_live(
                device_id, f"status = 'revoked', revoked_at = {p}, actor = {p}", (now, actor)
            )
        else:
            raise ValueError(f"set_status sets approved or revoked, not {status!r}")
        if changed is not None:
            return changed
        current = await self.get(device_id)  # approving an approved device changes nothing
        return current if current is not None and current.status == "approved" else None

    async def set_tags(
        self, device_id: str, tags: frozenset[str], *, now: float, actor: str
    ) -> DeviceRecord | None:
        check_tags(tags)
        p = self.placeholder
        return await self._change_live(
            device_id, f"tags = {self.json_placeholder}, actor = {p}", (tags_json(tags), actor)
        )

    async def set_certificate(
        self, device_id: str, serial: str, not_after: float, *, now: float
    ) -> DeviceRecord | None:
        p = self.placeholder
        return await self._change_live(
            device_id,
            f"cert_serial = {p}, cert_not_after = {p}",
            (normalise_serial(serial), not_after),
        )

    async def set_key_storage(
        self, device_id: str, key_storage: KeyStorageFact, *, now: float
    ) -> DeviceRecord | None:
        return await self._change_live(
            device_id, f"key_storage = {self.placeholder}", (key_storage,)
        )

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
        # One conditional UPDATE: two workers or replicas racing on one report cannot both win
        # (PostgreSQL re-checks the WHERE clause on the row the first one committed).
        p = self.placeholder
        return await self._change(
            f"posture = {self.json_placeholder}, posture_at = {p}, posture_reported_at = {p},"
            f" posture_counter = {p}, loopback_port = {p},"
            f" last_seen = {self.greatest}(COALESCE(last_seen, 0), {p})",
            (posture_json(facts), received_at, reported_at, counter, loopback_port, received_at),
            f"id = {p} AND status <> 'revoked' AND posture_counter < {p}",
            (device_id, counter),
        )

    async def touch(self, seen: Sequence[tuple[str, float]]) -> None:
        # last_seen is shown to IT, never decided on: it does not bump the change counter, so
        # replicas' caches are not reloaded for every request a device makes.
        if not seen:
            return
        p = self.placeholder
        later = f"id = {p} AND (last_seen IS NULL OR last_seen < {p})"
        await self._update_each(
            f"UPDATE devices SET last_seen = {p} WHERE {later}",  # noqa: S608  # constant pieces; values are bound
            [(when, device_id, when) for device_id, when in seen],
        )

    async def expire_pending(self, older_than: float, *, now: float) -> int:
        p = self.placeholder
        rows = await self._update(
            f"status = 'revoked', revoked_at = {p}, actor = 'expired'",
            (now,),
            f"status = 'pending' AND created_at < {p}",
            (older_than,),
        )
        return len(rows)

    # -- reads --------------------------------------------------------------------------------

    async def _one(self, column: str, value: object) -> DeviceRecord | None:
        rows = await self._fetch(f"{self.select} WHERE {column} = {self.placeholder}", (value,))
        return row_record(rows[0]) if rows else None

    async def get(self, device_id: str) -> DeviceRecord | None:
        return await self._one("id", device_id)

    async def by_thumbprint(self, thumbprint: str) -> DeviceRecord | None:
        return await self._one("key_thumbprint", thumbprint)

    async def by_cert_serial(self, serial: str) -> DeviceRecord | None:
        try:
            wanted = normalise_serial(serial)
        except DeviceError:
            return None
        return await self._one("cert_serial", wanted)

    async def list(
        self,
        *,
        status: DeviceStatus | None = None,
        owner: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> Sequence[DeviceRecord]:
        p = self.placeholder
        where: list[str] = []
        args: list[object] = []
        if status is not None:
            where.append(f"status = {p}")
            args.append(status)
        if owner is not None:
            where.append(f"owner_issuer = {p} AND owner_subject = {p}")
            args.extend(owner)
        sql = self.select + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY created_at, id LIMIT {p}"
        args.append(max(0, int(limit)))
        return rows_or_skip(await self._fetch(sql, args))
