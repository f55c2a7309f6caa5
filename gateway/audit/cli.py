"""`tabiji audit query|export|verify|stats|keygen|retention`: the auditors' command line.

gateway/cli.py builds an AuditCliConfig from the settings and calls run_audit(args, config);
this module must not import gateway.settings. Views and exports are themselves recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import io
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import orjson

from gateway.audit.chain import new_chain_id
from gateway.audit.checkpoint import (
    Checkpoint,
    Checkpointer,
    append_export,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_path,
    retired_keys,
    rotate_key,
    verification_keys,
)
from gateway.audit.query import AuditFilter, VerifyReport
from gateway.audit.record import EVENT_FIELDS, AuditEvent, AuditRecord
from gateway.audit.redact import Redactor
from gateway.audit.store import AuditStore, AuditStoreUnavailable, open_audit_store
from gateway.audit.verify import PROBLEMS, verify
from gateway.audit.writer import AuditWriter

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
_RELATIVE: Final = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
CSV_COLUMNS: Final[tuple[str, ...]] = ("chain_id", "seq", "prev_hash", "hash", *EVENT_FIELDS)


@dataclass(frozen=True, slots=True)
class AuditCliConfig:
    """What the audit commands need, built by gateway/cli.py from the settings."""

    store_url: str  # sqlite:///… or postgresql://…
    base_dir: Path  # relative sqlite paths are resolved against it (the config file's dir)
    key_file: Path  # the Ed25519 audit signing key (0600)
    public_key_file: Path | None = None  # for verify; default: <key_file>.pub, else the key
    checkpoint_export: Path | None = None  # the auditors' JSON-lines copy of the checkpoints
    checkpoint_url: str | None = None
    tsa_url: str | None = None
    spool_dir: Path | None = None
    redactor: Redactor = field(default_factory=Redactor)
    actor: str | None = None  # who runs the command (default: the OS user)


# --------------------------------------------------------------------------- parsing


def parse_time(text: str, now_us: int | None = None) -> int:
    """UTC µs from "24h" / "7d" / "30m" (ago), "now", or ISO 8601 (no offset means UTC)."""
    now = time.time_ns() // 1000 if now_us is None else now_us
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)] * 1_000_000
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a time like 24h, 7d, 30m, now or 2026-04-01T09:00+09:00"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=parse_time, help="from (24h, 7d, now, ISO 8601; UTC default)")
    p.add_argument("--until", type=parse_time, help="until, exclusive (same forms)")
    p.add_argument("--user", help="e-mail or subject")
    p.add_argument("--device", help="device id")
    p.add_argument("--route", help="route name")
    p.add_argument("--decision", choices=["allow", "deny", "error", "info"])
    p.add_argument("--reason", help="a reason code, e.g. device-posture-stale")
    p.add_argument("--kind", choices=["request", "admin", "view"])
    p.add_argument("--text", help="substring of path, host, request id or action")


def add_audit_parser(
    subparsers: Any, common: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """Add `audit` and its subcommands; returns the `audit` parser (the caller sets
    set_defaults(handler=…)). `common` adds shared options (e.g. --config) to every subcommand,
    so `tabiji audit verify --config FILE` works."""
    audit: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="query, export and verify the audit trail",
        description=(
            "The tamper-evident audit trail: one hash-chained record per decision. "
            "Exit 0 ok, 1 check failed (verify), 2 usage error."
        ),
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    q = sub.add_parser(
        "query",
        help="list records (newest first)",
        description="List matching records, newest first. Recorded as a view.",
    )
    _filter_args(q)
    q.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    q.add_argument("--offset", type=int, default=0)
    fmt = q.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON array of records")
    fmt.add_argument("--csv", action="store_true", help="CSV with every field")

    e = sub.add_parser(
        "export",
        help="export records (oldest first) as CSV or JSON lines",
        description="Export matching records, oldest first. Recorded as a view.",
    )
    _filter_args(e)
    e.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    e.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")

    v = sub.add_parser(
        "verify",
        help="check every chain and signed checkpoint",
        description="Walk every chain and check the signed checkpoints (DB and export). "
        "Exit 0 when everything holds, 1 naming the first bad record.",
    )
    v.add_argument("--json", action="store_true")
    v.add_argument(
        "--public-key",
        type=Path,
        action="append",
        help="verify with this public key file, or every *.pub in this directory; repeat it "
        "for the keys before a rotation (default: the configured key and its retired keys)",
    )
    v.add_argument("--export", type=Path, help="the checkpoint export to check against")

    s = sub.add_parser("stats", help="counts over time and the most refused")
    _filter_args(s)
    s.add_argument("--bucket", type=int, default=3600, help="seconds per bucket (default 3600)")
    s.add_argument("--json", action="store_true")

    k = sub.add_parser("keygen", help="create the audit signing key (0600) and its .pub")
    k.add_argument("--key-file", type=Path, help="where (default: the configured key file)")
    k.add_argument(
        "--rotate",
        action="store_true",
        help="replace the existing key with a new one; the old public key is kept as "
        "<key file>.retired-<key id>.pub so old checkpoints still verify",
    )

    r = sub.add_parser(
        "retention",
        help="delete records older than N days (up to a signed checkpoint)",
        description="Delete records older than N days, per chain only up to the newest signed "
        "checkpoint before the cutoff; writes a signed retention checkpoint (DB and export) "
        "and an admin record, so verify keeps passing.",
    )
    r.add_argument("--days", type=int, required=True)
    r.add_argument("--json", action="store_true")
    if common is not None:
        for parser in (q, e, v, s, k, r):
            common(parser)
    return audit


def filter_from_args(args: argparse.Namespace) -> AuditFilter:
    return AuditFilter(
        since_us=getattr(args, "since", None),
        until_us=getattr(args, "until", None),
        user=getattr(args, "user", None),
        device=getattr(args, "device", None),
        route=getattr(args, "route", None),
        decision=getattr(args, "decision", None),
        reason=getattr(args, "reason", None),
        kind=getattr(args, "kind", None),
        text=getattr(args, "text", None),
    )


# --------------------------------------------------------------------------- output


def utc_iso(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / 1e6, UTC).isoformat(timespec="microseconds")


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | dict):
        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    text = str(v)
    # CSV/formula injection (OWASP): a cell starting with = + - @ is opened as a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(records: Sequence[AuditRecord], out: IO[str], header: bool = True) -> None:
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(["time_utc", *CSV_COLUMNS])
    for r in records:
        d = r.to_dict()
        w.writerow([utc_iso(r.time_us), *(_csv_value(d[c]) for c in CSV_COLUMNS)])


def table(records: Sequence[AuditRecord]) -> str:
    headers = ("time (UTC)", "decision", "user", "device", "route", "request", "status", "reasons")
    rows = [
        (
            utc_iso(r.time_us)[:19],
            r.decision,
            r.user or "-",
            r.event.device_id or "-",
            r.route or "-",
            f"{r.event.method} {r.event.host}{r.event.path}"[:60]
            if r.kind == "request"
            else (r.event.action or r.kind),
            str(r.event.status),
            ",".join(r.reasons) or "-",
        )
        for r in records
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def report_text(report: VerifyReport) -> str:
    if report.ok:
        last = utc_iso(report.last_checkpoint_us) if report.last_checkpoint_us else "none"
        return (
            f"OK: {report.records_checked} records in {report.chains_checked} chain(s), "
            f"{report.checkpoints_checked} signed checkpoint(s); last checkpoint {last}"
        )
    bad = report.first_bad
    assert bad is not None
    return (
        f"FAILED: chain {bad.chain_id or '-'} seq {bad.seq}: {bad.what} — "
        f"{PROBLEMS.get(bad.what, '')}" + (f" ({bad.detail})" if bad.detail else "")
    )


# --------------------------------------------------------------------------- commands


def run_audit(args: argparse.Namespace, config: AuditCliConfig) -> int:
    """Run one `tabiji audit …` subcommand; returns the exit code."""
    if args.audit_command == "keygen":
        if getattr(args, "rotate", False):
            return _rotate(args.key_file or config.key_file)
        return _keygen(args.key_file or config.key_file)
    try:
        return asyncio.run(_run(args, config))
    except AuditStoreUnavailable as exc:
        print(f"audit store unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _keygen(path: Path) -> int:
    if path.exists():
        print(f"{path} exists; refusing to overwrite an audit key", file=sys.stderr)
        return EXIT_FAILED
    generate_key(path)
    print(f"audit key written to {path} (0600); give {public_path(path)} to the auditors")
    return EXIT_OK


def _rotate(path: Path) -> int:
    if not path.exists():
        print(f"{path} does not exist; create it with `tabiji audit keygen`", file=sys.stderr)
        return EXIT_FAILED
    old_id, new = rotate_key(path)
    print(
        f"audit key {old_id} retired (public key kept beside it as "
        f"{path.name}.retired-{old_id}.pub); new key "
        f"{key_id(new)} written to {path}. Give {public_path(path)} to the auditors and "
        "restart the gateways one by one: each signs with the new key from its restart"
    )
    return EXIT_OK


def verification_keys_for(
    config: AuditCliConfig, overrides: Sequence[Path] | None = None
) -> dict[str, Any]:
    """The key ring verify checks checkpoints with: the given files/directories only (an
    auditor's own copies), else the configured public key, the key file and its retired keys."""
    if overrides:
        return verification_keys(*overrides)
    key = config.key_file
    readable = key if os.access(key, os.R_OK) else None  # an auditor may not read the signing key
    return verification_keys(config.public_key_file, public_path(key), readable, *retired_keys(key))


def public_key_for(config: AuditCliConfig, override: Path | None = None) -> Any:
    for candidate in (
        override,
        config.public_key_file,
        public_path(config.key_file),
        config.key_file,
    ):
        if candidate is not None and candidate.exists():
            return load_public_key(candidate)
    return None


def _checkpointer(config: AuditCliConfig) -> Checkpointer | None:
    try:
        key = load_private_key(config.key_file)
    except (OSError, ValueError):
        return None  # an auditor without the signing key: views are recorded unsigned-for-now
    return Checkpointer(
        key, export_path=config.checkpoint_export, url=config.checkpoint_url, tsa_url=config.tsa_url
    )


async def _record(store: AuditStore, config: AuditCliConfig, event: AuditEvent) -> None:
    """Record the auditor's own view/action in a short chain of this CLI process."""
    writer = AuditWriter(
        store,
        chain_id=new_chain_id(),
        mode="durable",
        checkpointer=_checkpointer(config),
        redactor=config.redactor,
        spool_dir=config.spool_dir,
    )
    await writer.start()
    try:
        await writer.submit_durable(event)
    finally:
        await writer.close()


def _view_event(config: AuditCliConfig, action: str, filt: AuditFilter, **extra: Any) -> AuditEvent:
    detail = {f"filter.{k}": v for k, v in asdict(filt).items() if v is not None}
    detail.update(extra)
    return AuditEvent(
        kind="view" if action in ("audit.query", "audit.export", "audit.stats") else "admin",
        time_us=time.time_ns() // 1000,
        decision="info",
        action=action,
        actor=config.actor or getpass.getuser(),
        detail=detail,
    )


async def _run(args: argparse.Namespace, config: AuditCliConfig) -> int:
    store = open_audit_store(config.store_url, config.base_dir)
    await store.open()
    try:
        command = _COMMANDS[args.audit_command]
        return await command(store, args, config)
    finally:
        await store.close()


async def _cmd_verify(store: AuditStore, args: argparse.Namespace, config: AuditCliConfig) -> int:
    export = args.export or config.checkpoint_export
    report = await verify(store, verification_keys_for(config, args.public_key), export)
    if args.json:
        print(orjson.dumps(asdict(report)).decode())
    else:
        print(report_text(report), file=sys.stdout if report.ok else sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


async def _cmd_query(store: AuditStore, args: argparse.Namespace, config: AuditCliConfig) -> int:
    filt = filter_from_args(args)
    records = await store.query(filt, args.limit, args.offset)
    if args.json:
        print(orjson.dumps([r.to_dict() for r in records]).decode())
    elif args.csv:
        write_csv(records, sys.stdout)
    else:
        print(table(records))
    await _record(store, config, _view_event(config, "audit.query", filt, count=len(records)))
    return EXIT_OK


async def _cmd_export(store: AuditStore, args: argparse.Namespace, config: AuditCliConfig) -> int:
    filt = filter_from_args(args)
    count = await _export(store, filt, args.format, args.output)
    await _record(
        store, config, _view_event(config, "audit.export", filt, count=count, format=args.format)
    )
    print(f"{count} record(s) exported", file=sys.stderr)
    return EXIT_OK


async def _cmd_stats(store: AuditStore, args: argparse.Namespace, config: AuditCliConfig) -> int:
    filt = filter_from_args(args)
    st = await store.stats(filt, args.bucket)
    if args.json:
        print(orjson.dumps(asdict(st)).decode())
    else:
        print(f"total {st.total}, refused {st.denied}")
        for start, total, denied in st.series:
            print(f"  {utc_iso(start)[:19]}  {total:>8}  {denied:>8}")
        for title, top in (
            ("users", st.top_users),
            ("devices", st.top_devices),
            ("reasons", st.top_reasons),
        ):
            print(f"most refused {title}: " + ", ".join(f"{v} ({n})" for v, n in top))
    await _record(store, config, _view_event(config, "audit.stats", filt))
    return EXIT_OK


async def _cmd_retention(
    store: AuditStore, args: argparse.Namespace, config: AuditCliConfig
) -> int:
    return await _retention(store, config, args.days, args.json)


_COMMANDS: Final[
    dict[str, Callable[[AuditStore, argparse.Namespace, AuditCliConfig], Awaitable[int]]]
] = {
    "verify": _cmd_verify,
    "query": _cmd_query,
    "export": _cmd_export,
    "stats": _cmd_stats,
    "retention": _cmd_retention,
}


async def _export(store: AuditStore, filt: AuditFilter, fmt: str, output: Path | None) -> int:
    """Stream oldest first in pages (the store pages newest first: walk the offsets back)."""
    total = await store.count(filt)
    out: IO[str] = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    page = 1000
    try:
        if fmt == "csv":
            write_csv([], out)
        done = 0
        while done < total:
            offset = max(0, total - done - page)
            chunk = await store.query(filt, total - done - offset, offset)
            chunk.reverse()
            if fmt == "csv":
                buf = io.StringIO()
                write_csv(chunk, buf, header=False)
                out.write(buf.getvalue())
            else:
                out.write("".join(orjson.dumps(r.to_dict()).decode() + "\n" for r in chunk))
            done += len(chunk)
            if not chunk:
                break
    finally:
        if output:
            out.close()
    return total


async def _retention(store: AuditStore, config: AuditCliConfig, days: int, as_json: bool) -> int:
    if days < 1:
        print("--days must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    key = load_private_key(config.key_file)
    cutoff = time.time_ns() // 1000 - days * 86400 * 1_000_000
    made: list[Checkpoint] = []

    def sign(chain_id: str, seq: int, head: str, count: int) -> Checkpoint:
        cp = Checkpoint(chain_id, seq, head, time.time_ns() // 1000, count, "retention")
        cp = cp.signed(key)
        made.append(cp)
        return cp

    deleted = await store.delete_before(cutoff, sign)
    if config.checkpoint_export is not None:
        for cp in made:  # after the commit: an exported retention point always exists in the DB
            append_export(config.checkpoint_export, cp)
    event = AuditEvent(
        kind="admin",
        time_us=time.time_ns() // 1000,
        decision="info",
        action="audit.retention",
        actor=config.actor or getpass.getuser(),
        detail={
            "days": days,
            "cutoff_us": cutoff,
            "chains": len(deleted),
            "deleted": sum(deleted.values()),
        },
    )
    await _record(store, config, event)
    if as_json:
        print(orjson.dumps({"cutoff_us": cutoff, "deleted": deleted}).decode())
    else:
        print(
            f"deleted {sum(deleted.values())} record(s) older than {utc_iso(cutoff)} "
            f"from {len(deleted)} chain(s)"
        )
    return EXIT_OK
