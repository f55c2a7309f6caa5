"""`tabiji devices ca status|prepare|activate|prune|bundle`: rotating the device CA without
downtime (prepare → reload the ingress → activate → prune after one certificate lifetime).

Works on the CA directory the config names; every change is an audit admin record. Part of the
CLI (gateway/devices/cli.py calls it with the settings' values); must not import gateway.settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from gateway.devices.ca import BUNDLE_FILE, CARotationError, DeviceCA, TrustedCA

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1

# (action, detail, actor) → an audit admin record.
AdminRecorder = Callable[[str, dict[str, Any], str], Awaitable[None]]


def add_ca_parser(sub: Any, common: Callable[..., None]) -> None:
    """`devices ca …` under the `devices` subcommands; `common(parser, change=…)` adds --config,
    --json and (for changes) --actor."""
    ca = sub.add_parser(
        "ca",
        help="show or rotate the device CA",
        description=(
            "Rotate the device CA without downtime: `prepare` makes a next CA that every gateway "
            "accepts at once (reload the ingress with the bundle), `activate` makes it issue "
            "and keeps the old one trusted, `prune` forgets old CAs once all they issued has "
            "expired. The gateways sharing the CA directory pick each step up by themselves."
        ),
    )
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    status = actions.add_parser("status", help="every trusted CA and its role")
    common(status)
    for name, text in (
        ("prepare", "create the next CA (trusted at once, not issuing yet)"),
        ("activate", "make the prepared CA issue; the old one stays trusted"),
        ("prune", "forget retired CAs whose certificates have all expired"),
    ):
        common(actions.add_parser(name, help=text), change=True)
    bundle = actions.add_parser("bundle", help="print every trusted CA (the ingress's file)")
    bundle.add_argument("-o", "--output", type=Path, help="write it here instead of stdout")
    common(bundle)


def _row(ca: TrustedCA, now: float, keep: float) -> dict[str, Any]:
    cert = ca.certificate
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    expired = cert.not_valid_after_utc.timestamp() <= now
    return {
        "role": ca.role,
        "name": str(names[0].value) if names else cert.subject.rfc4514_string(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "retired_at": _iso(ca.retired_at),
        "prunable": ca.role == "retired"
        and (expired or (ca.retired_at is not None and ca.retired_at + keep <= now)),
        "path": str(ca.path),
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def run_ca(
    args: argparse.Namespace,
    directory: Path,
    *,
    keep: float,
    record: AdminRecorder | None,
    actor: str,
) -> int:
    """Run one `devices ca …` action on the CA in `directory`; `keep`: how long a retired CA
    stays trusted (the certificate lifetime)."""
    ca = DeviceCA(directory, lifetime=keep)
    now = time.time()
    detail: dict[str, Any]
    try:
        if args.ca_command == "status":
            rows = [_row(entry, now, keep) for entry in ca.trusted()]
            if args.json:
                print(json.dumps(rows))
            else:
                for row in rows:
                    when = f"  retired {row['retired_at']}" if row["retired_at"] else ""
                    mark = "  (prunable)" if row["prunable"] else ""
                    print(
                        f"{row['role']:<8} {row['sha256'][:16]}  {row['name']}  "
                        f"until {row['not_after']}{when}{mark}"
                    )
            return EXIT_OK
        if args.ca_command == "bundle":
            if args.output:
                args.output.write_text(ca.bundle_pem, encoding="ascii")
            else:
                sys.stdout.write(ca.bundle_pem)
            return EXIT_OK
        if args.ca_command == "prepare":
            new = ca.prepare(now)
            detail = {"next": _fingerprint(new)}
            advice = (
                f"next CA {_fingerprint(new)[:16]} prepared: every gateway accepts its "
                f"certificates now. Reload the ingress with {directory / BUNDLE_FILE}, then run "
                "`tabiji devices ca activate`"
            )
        elif args.ca_command == "activate":
            old, new = ca.activate(now)
            detail = {"retired": _fingerprint(old), "current": _fingerprint(new)}
            advice = (
                f"CA {_fingerprint(new)[:16]} now issues; {_fingerprint(old)[:16]} stays trusted "
                f"until its certificates expire (`tabiji devices ca prune` after {keep / 86400:g}"
                " days). Agents get certificates of the new CA as they renew"
            )
        else:
            gone = ca.prune(now, keep)
            detail = {"pruned": [_fingerprint(entry.certificate) for entry in gone]}
            advice = (
                f"{len(gone)} retired CA(s) forgotten; reload the ingress with "
                f"{directory / BUNDLE_FILE}"
                if gone
                else "nothing to prune"
            )
    except CARotationError as error:
        print(str(error), file=sys.stderr)
        return EXIT_FAILED
    if record is not None:
        recorder = record

        async def write() -> None:
            await recorder(f"device-ca.{args.ca_command}", detail, args.actor or actor)

        asyncio.run(write())
    print(json.dumps({"ok": True, **detail}) if args.json else advice)
    return EXIT_OK
