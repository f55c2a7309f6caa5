"""The device table's columns and the row ↔ DeviceRecord codec shared by the SQLite and PostgreSQL
stores, plus the checks every store applies before writing (tags, statuses, serials).

Pure: no I/O. Must not import gateway.settings.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Final, cast

from device_agent.report import PostureFacts, ReportInvalid
from gateway.devices.model import (
    STATUSES,
    DeviceError,
    DeviceRecord,
    DeviceStatus,
    KeyStorageFact,
    NewDevice,
)

log = logging.getLogger("tabiji.devices")

KEY_STORAGES: Final[tuple[KeyStorageFact, ...]] = ("tpm", "tpm-claimed", "software")
# Columns in DeviceRecord field order (the codec below relies on it).
COLUMNS: Final[tuple[str, ...]] = (
    "id",
    "owner_issuer",
    "owner_subject",
    "key_thumbprint",
    "public_key_pem",
    "key_storage",
    "status",
    "created_at",
    "owner_email",
    "hostname",
    "serial",
    "tags",
    "approved_at",
    "revoked_at",
    "last_seen",
    "cert_serial",
    "cert_not_after",
    "posture",
    "posture_at",
    "posture_reported_at",
    "posture_counter",
    "loopback_port",
    "version",
    "actor",
)
SELECT_COLUMNS: Final = ", ".join(COLUMNS)
# A record whose row could not be read: the registry drops the device from its cache (unknown,
# so every decision about it is a deny) instead of keeping an older, maybe approved, copy.
MALFORMED_PREFIX: Final = "!malformed: "
MAX_TAGS: Final = 32
_TAG: Final = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")
_SERIAL: Final = re.compile(r"^[0-9a-f]{1,64}$")


class MalformedRow(DeviceError):
    """A stored row that does not make a valid record (edited by hand, or a bug): refused."""

    code = "device-record-malformed"
    status = 500

    def __init__(self, device_id: str, detail: str) -> None:
        super().__init__(code="device-record-malformed", detail=f"{device_id}: {detail}")
        self.device_id = device_id


def check_tags(tags: frozenset[str]) -> frozenset[str]:
    """Tags are short lowercase names (policies match them exactly); refuse anything else."""
    if len(tags) > MAX_TAGS:
        raise DeviceError(code="device-tag-invalid", detail=f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise DeviceError(
                code="device-tag-invalid",
                detail=f"{str(tag)[:70]!r}: 1-64 of a-z 0-9 . _ : - (lowercase)",
            )
    return tags


def already_enrolled(key_taken: bool, detail: str) -> DeviceError:
    """The refusal for a new device whose key (or, by a bug, id) the registry already has."""
    if key_taken:
        return DeviceError(
            code="device-key-already-enrolled",
            detail="this key is enrolled as another device",
            status=409,
        )
    return DeviceError(code="device-already-exists", detail=detail, status=409)


def normalise_serial(serial: str) -> str:
    """Certificate serials as lowercase hex without leading zeros (nginx gives uppercase)."""
    text = serial.strip().lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
    if not _SERIAL.match(text):
        raise DeviceError(code="device-certificate-invalid", detail="serial is not hex")
    return text


def check_new(device: NewDevice) -> None:
    """What a new device must be before it is stored."""
    # Programming errors of the caller (enrolment), not refusals anyone should see.
    if device.status not in ("pending", "approved"):
        raise ValueError("a new device is pending or approved")
    if device.key_storage not in KEY_STORAGES:
        raise ValueError(f"unknown key storage {device.key_storage!r}")
    if not device.id or not device.key_thumbprint or not device.public_key_pem:
        raise ValueError("a new device needs an id, a key and its thumbprint")
    check_tags(device.tags)


def new_row(device: NewDevice, version: int) -> tuple[Any, ...]:
    """The INSERT values for a new device, in COLUMNS order."""
    values: dict[str, Any] = {
        "id": device.id,
        "owner_issuer": device.owner_issuer,
        "owner_subject": device.owner_subject,
        "key_thumbprint": device.key_thumbprint,
        "public_key_pem": device.public_key_pem,
        "key_storage": device.key_storage,
        "status": device.status,
        "created_at": device.created_at,
        "owner_email": device.owner_email,
        "hostname": device.hostname,
        "serial": device.serial,
        "tags": tags_json(device.tags),
        "approved_at": device.created_at if device.status == "approved" else None,
        "revoked_at": None,
        "last_seen": None,
        "cert_serial": None,
        "cert_not_after": None,
        "posture": None,
        "posture_at": None,
        "posture_reported_at": None,
        "posture_counter": -1,
        "loopback_port": None,
        "version": version,
        "actor": device.actor,
    }
    return tuple(values[c] for c in COLUMNS)


def tags_json(tags: frozenset[str]) -> str:
    return json.dumps(sorted(tags), separators=(",", ":"))


def posture_json(facts: PostureFacts) -> str:
    return json.dumps(facts.to_json(), sort_keys=True, separators=(",", ":"))


def _opt_float(value: object, name: str) -> float | None:
    if value is None:
        return None
    return _float(value, name)


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} is not a number")
    return float(value)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is not an integer")
    return value


def _text(value: object, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} is not text")
    return value


def row_record(row: Sequence[Any]) -> DeviceRecord:
    """A record from a row in COLUMNS order; MalformedRow (never a crash) if any value is off."""
    raw_id = row[0] if row else None
    device_id = raw_id if isinstance(raw_id, str) else repr(raw_id)[:80]
    try:
        if len(row) != len(COLUMNS):
            raise ValueError(f"{len(row)} columns, expected {len(COLUMNS)}")
        v = dict(zip(COLUMNS, row, strict=True))
        status = _text(v["status"], "status")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        key_storage = _text(v["key_storage"], "key_storage")
        if key_storage not in KEY_STORAGES:
            raise ValueError(f"unknown key storage {key_storage!r}")
        tags = json.loads(_text(v["tags"], "tags"))
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags is not a list of text")
        posture = None
        if v["posture"] is not None:
            posture = PostureFacts.from_json(json.loads(_text(v["posture"], "posture")))
        port = v["loopback_port"]
        if port is not None:
            port = _int(port, "loopback_port")
        return DeviceRecord(
            id=_text(v["id"], "id"),
            owner_issuer=_text(v["owner_issuer"], "owner_issuer"),
            owner_subject=_text(v["owner_subject"], "owner_subject"),
            key_thumbprint=_text(v["key_thumbprint"], "key_thumbprint"),
            public_key_pem=_text(v["public_key_pem"], "public_key_pem"),
            key_storage=cast(KeyStorageFact, key_storage),
            status=cast(DeviceStatus, status),
            created_at=_float(v["created_at"], "created_at"),
            owner_email=_text(v["owner_email"], "owner_email", optional=True),
            hostname=_text(v["hostname"], "hostname"),
            serial=_text(v["serial"], "serial"),
            tags=frozenset(tags),
            approved_at=_opt_float(v["approved_at"], "approved_at"),
            revoked_at=_opt_float(v["revoked_at"], "revoked_at"),
            last_seen=_opt_float(v["last_seen"], "last_seen"),
            cert_serial=_text(v["cert_serial"], "cert_serial", optional=True),
            cert_not_after=_opt_float(v["cert_not_after"], "cert_not_after"),
            posture=posture,
            posture_at=_opt_float(v["posture_at"], "posture_at"),
            posture_reported_at=_opt_float(v["posture_reported_at"], "posture_reported_at"),
            posture_counter=_int(v["posture_counter"], "posture_counter"),
            loopback_port=port,
            version=_int(v["version"], "version"),
            actor=_text(v["actor"], "actor"),
        )
    except (ValueError, TypeError, KeyError, ReportInvalid) as exc:
        # json.JSONDecodeError is a ValueError; ReportInvalid: the stored posture fails the
        # same strict check a report does.
        raise MalformedRow(device_id, str(exc)[:200]) from exc


def row_or_marker(row: Sequence[Any]) -> DeviceRecord:
    """For the change feed: a record, or a marker that makes every replica forget the device."""
    try:
        return row_record(row)
    except MalformedRow as exc:
        log.error("device registry: unreadable row skipped (device unknown): %s", exc.detail)
        version = row[COLUMNS.index("version")] if len(row) == len(COLUMNS) else 0
        return malformed_marker(exc.device_id, version if isinstance(version, int) else 0, exc)


def malformed_marker(device_id: str, version: int, exc: MalformedRow) -> DeviceRecord:
    return DeviceRecord(
        id=device_id,
        owner_issuer="",
        owner_subject="",
        key_thumbprint="",
        public_key_pem="",
        key_storage="software",
        status="revoked",  # never trusted: the registry drops it, this is only belt and braces
        created_at=0.0,
        version=version,
        actor=MALFORMED_PREFIX + exc.detail,
    )


def is_malformed_marker(record: DeviceRecord) -> bool:
    return record.actor.startswith(MALFORMED_PREFIX) and not record.key_thumbprint


def rows_or_skip(rows: Sequence[Sequence[Any]]) -> list[DeviceRecord]:
    """For listings: the readable records; unreadable rows are logged and left out."""
    out = []
    for row in rows:
        try:
            out.append(row_record(row))
        except MalformedRow as exc:
            log.error("device registry: unreadable row left out of a listing: %s", exc.detail)
    return out
