"""`tabiji devices list|show|approve|revoke|tag`: IT's commands for the device registry.

They act on the store the config names, so every replica sees the change within a second (each
follows the store's change feed); a revoked device's open WebSockets close. Every change is an
audit admin record (actor: --actor, else the OS user). Part of the CLI: cmd_devices reads the
settings, run_devices does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.devices.model import STATUSES, DeviceError, DeviceRecord
from gateway.devices.registry import DeviceRegistry
from gateway.devices.store_factory import open_device_store

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

# (action, detail, actor) → an audit admin record.
AdminRecorder = Callable[[str, dict[str, Any], str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DevicesCliConfig:
    """What the device commands need, built from the settings by cmd_devices."""

    store_url: str  # sqlite:///… or postgresql://…
    base_dir: Path  # relative sqlite paths are resolved against it
    record_admin: AdminRecorder | None = None  # None: audit disabled (the log still says it)


# --------------------------------------------------------------------------- parser


def add_devices_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `devices` and its subcommands (they take --config like the other admin commands)."""
    from gateway.settings import CONFIG_ENV

    devices: argparse.ArgumentParser = commands.add_parser(
        "devices",
        help="list, approve, revoke and tag enrolled devices (every replica)",
        description=(
            "IT's view of the device registry. Changes reach every gateway sharing the device "
            "store within a second and are written to the audit trail. "
            "Exit 0 ok, 1 unknown device or refused change, 2 usage error."
        ),
    )
    sub = devices.add_subparsers(dest="devices_command", metavar="SUBCOMMAND", required=True)

    def common(parser: argparse.ArgumentParser, *, change: bool = False) -> None:
        parser.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        if change:
            parser.add_argument(
                "--actor", help="who makes the change, for the audit trail (default: OS user)"
            )

    listing = sub.add_parser("list", help="list devices", description="List devices, oldest first.")
    listing.add_argument("--status", choices=STATUSES, help="only devices in this state")
    listing.add_argument("--owner", metavar="EMAIL|SUBJECT", help="only this user's devices")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    common(listing)

    show = sub.add_parser("show", help="one device in full", description="Show one device.")
    show.add_argument("device_id", metavar="DEVICE_ID")
    common(show)

    approve = sub.add_parser(
        "approve",
        help="approve a pending device",
        description="Approve a pending device: it may then be used where policies allow.",
    )
    approve.add_argument("device_id", metavar="DEVICE_ID")
    common(approve, change=True)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a device for good",
        description=(
            "Revoke a device: every gateway refuses it from the next request, its open "
            "WebSockets close, its certificate is refused. Revocation cannot be undone "
            "(the device enrols again)."
        ),
    )
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    common(revoke, change=True)

    tag = sub.add_parser(
        "tag",
        help="add or remove a device's tags",
        description=(
            "Change a device's tags (policies can require them, e.g. `town-issued`). "
            "Tags are 1-64 of a-z 0-9 . _ : - (lowercase)."
        ),
    )
    tag.add_argument("device_id", metavar="DEVICE_ID")
    tag.add_argument("--add", action="append", default=[], metavar="TAG", help="add a tag")
    tag.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove a tag")
    tag.add_argument("--clear", action="store_true", help="remove every tag first")
    common(tag, change=True)

    from gateway.devices.ca_cli import add_ca_parser

    add_ca_parser(sub, common)  # `devices ca …`: rotating the device CA
    devices.set_defaults(admin_handler=cmd_devices)
    return devices


# --------------------------------------------------------------------------- running


def cmd_devices(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """`tabiji devices …` on the store the config names."""
    if args.devices_command == "ca":
        from gateway.devices.ca_cli import run_ca

        recorder = _audit_recorder(settings) if settings.audit.enabled else None
        keep = settings.devices.certificate_lifetime
        return run_ca(args, settings.devices.ca_dir, keep=keep, record=recorder, actor=_operator())
    config = DevicesCliConfig(
        store_url=settings.devices.store,
        base_dir=settings.audit.key_file.parent,
        record_admin=_audit_recorder(settings) if settings.audit.enabled else None,
    )
    return run_devices(args, config)


def _audit_recorder(settings: GatewaySettings) -> AdminRecorder:
    async def record(action: str, detail: dict[str, Any], actor: str) -> None:
        from gateway.wire_audit import build_audit

        parts = build_audit(settings, dry_run=False)
        for service in parts.services:
            await service.start()
        try:
            parts.trail.admin(action, detail, actor=actor)
        finally:
            for service in reversed(parts.services):
                await service.stop()

    return record


def run_devices(args: argparse.Namespace, config: DevicesCliConfig) -> int:
    if args.devices_command == "tag" and not (args.add or args.remove or args.clear):
        print("devices tag needs --add TAG, --remove TAG or --clear", file=sys.stderr)
        return EXIT_USAGE
    if args.devices_command == "list" and args.limit < 1:
        print("--limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = open_device_store(config.store_url, base_dir=config.base_dir)
    except ValueError as error:
        print(f"devices.store: {error}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run(args, config, DeviceRegistry(store)))


async def _run(args: argparse.Namespace, config: DevicesCliConfig, registry: DeviceRegistry) -> int:
    try:
        await registry.store.open()
        if args.devices_command == "list":
            return await _list(args, registry)
        if args.devices_command == "show":
            record = await registry.get(args.device_id)
            if record is None:
                return _unknown(args.device_id, args.json)
            _print_record(record, args.json)
            return EXIT_OK
        return await _change(args, config, registry)
    except DeviceError as error:
        if args.json:
            print(json.dumps({"ok": False, "error": error.code, "detail": error.detail}))
        else:
            print(f"{error.code}: {error.detail}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await registry.store.close()


async def _list(args: argparse.Namespace, registry: DeviceRegistry) -> int:
    records: Sequence[DeviceRecord] = await registry.list(status=args.status, limit=args.limit)
    if args.owner:
        wanted = args.owner.strip().lower()
        records = [
            r
            for r in records
            if (r.owner_email or "").lower() == wanted or r.owner_subject == args.owner.strip()
        ]
    if args.json:
        print(json.dumps([record_json(r) for r in records], ensure_ascii=False))
        return EXIT_OK
    now = time.time()
    print(
        f"{'DEVICE':<24} {'STATUS':<9} {'OWNER':<30} {'HOST':<18} {'KEY':<12} {'POSTURE':<9} TAGS"
    )
    for r in records:
        posture = _age(now - r.posture_at) if r.posture_at is not None else "-"
        print(
            f"{r.id:<24} {r.status:<9} {_owner(r)[:30]:<30} {r.hostname[:18]:<18} "
            f"{r.key_storage:<12} {posture:<9} {','.join(sorted(r.tags)) or '-'}"
        )
    print(f"{len(records)} device(s)", file=sys.stderr)
    return EXIT_OK


async def _change(
    args: argparse.Namespace, config: DevicesCliConfig, registry: DeviceRegistry
) -> int:
    device_id: str = args.device_id
    actor = args.actor or _operator()
    now = time.time()
    before = await registry.get(device_id)
    if before is None:
        return _unknown(device_id, args.json)
    detail: dict[str, Any] = {"device": device_id, "owner": _owner(before)}
    if args.devices_command == "approve":
        if before.status == "approved":
            record, action = before, ""  # nothing to do, nothing to record
        else:
            record, action = await registry.approve(device_id, now=now, actor=actor), "approve"
    elif args.devices_command == "revoke":
        record, action = await registry.revoke(device_id, now=now, actor=actor), "revoke"
    else:
        tags = set() if args.clear else set(before.tags)
        tags = (tags | {t.strip().lower() for t in args.add}) - {
            t.strip().lower() for t in args.remove
        }
        record = await registry.set_tags(device_id, frozenset(tags), now=now, actor=actor)
        action = "tag"
        detail["tags"] = ",".join(sorted(record.tags))
        detail["before"] = ",".join(sorted(before.tags))
    if action and config.record_admin is not None:
        await config.record_admin(f"device.{action}", detail, actor)
    if args.json:
        print(json.dumps({"ok": True, "device": record_json(record)}, ensure_ascii=False))
    elif args.devices_command == "approve":
        done = "was already approved" if not action else "approved"
        print(f"{device_id} ({_owner(record)}, {record.hostname}): {done}")
    elif args.devices_command == "revoke":
        print(
            f"{device_id} ({_owner(record)}, {record.hostname}): revoked; every gateway refuses "
            "it from the next request"
        )
    else:
        print(f"{device_id}: tags {','.join(sorted(record.tags)) or '(none)'}")
    return EXIT_OK


def _unknown(device_id: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": "device-unknown", "detail": device_id}))
    else:
        print(f"no device {device_id!r} in the registry", file=sys.stderr)
    return EXIT_FAILED


# --------------------------------------------------------------------------- output


def record_json(record: DeviceRecord) -> dict[str, Any]:
    """A device as JSON (ISO 8601 UTC times): for --json and machine readers."""
    return {
        "id": record.id,
        "status": record.status,
        "owner": {
            "issuer": record.owner_issuer,
            "subject": record.owner_subject,
            "email": record.owner_email,
        },
        "hostname": record.hostname,
        "serial": record.serial,
        "key_storage": record.key_storage,
        "key_thumbprint": record.key_thumbprint,
        "tags": sorted(record.tags),
        "created": _when(record.created_at),
        "approved": _when(record.approved_at),
        "revoked": _when(record.revoked_at),
        "last_seen": _when(record.last_seen),
        "certificate": (
            {"serial": record.cert_serial, "not_after": _when(record.cert_not_after)}
            if record.cert_serial
            else None
        ),
        "posture": record.posture.to_json() if record.posture is not None else None,
        "posture_at": _when(record.posture_at),
        "posture_reported_at": _when(record.posture_reported_at),
        "posture_counter": record.posture_counter,
        "actor": record.actor,
    }


def _print_record(record: DeviceRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record_json(record), ensure_ascii=False))
        return
    data = record_json(record)
    owner = data.pop("owner")
    data["owner"] = f"{owner['email'] or '-'} ({owner['issuer']} {owner['subject']})"
    posture = data.pop("posture")
    data["tags"] = ", ".join(data["tags"]) or "-"
    cert = data.pop("certificate")
    data["certificate"] = f"{cert['serial']} until {cert['not_after']}" if cert else "-"
    for key, value in data.items():
        print(f"{key + ':':<21} {'-' if value is None else value}")
    print("posture:")
    for key, value in sorted((posture or {}).items()):
        print(f"  {key + ':':<19} {value}")
    if not posture:
        print("  (no report accepted yet)")


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _owner(record: DeviceRecord) -> str:
    return record.owner_email or record.owner_subject


def _operator() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()} (cli)"
    except Exception:  # no user name in a bare container: say where, not who
        return f"{socket.gethostname()} (cli)"
