"""`tabiji sessions …` and `tabiji keys …`: IT's commands for sessions and assertion keys.

They act on the shared store and key directory named by the config, so they reach every worker
and replica: a revoked session ends on the next request (each worker follows the revocation feed)
and its WebSockets close. Part of the CLI (reads settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from gateway.settings import CONFIG_ENV, GatewaySettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _session_manager(settings: GatewaySettings) -> Any:
    from gateway.identity.sessions import SessionManager
    from gateway.state.factory import open_state_store

    session = settings.identity.session
    store = open_state_store(session.store, base_dir=settings.assertion.key_dir.parent)
    manager = SessionManager(
        store,
        public_host="-",  # never looks anything up: lists and revokes only
        lifetime=session.lifetime,
        idle_timeout=session.idle_timeout,
    )
    return store, manager


async def _sessions(settings: GatewaySettings, args: argparse.Namespace) -> int:
    store, manager = _session_manager(settings)
    await store.open()
    try:
        if args.action == "list":
            summaries = await manager.list_sessions()
            if args.user:
                wanted = args.user.strip().lower()
                summaries = [s for s in summaries if (s.email or "").lower() == wanted]
            if args.json:
                print(
                    json.dumps(
                        [
                            {
                                "session": s.hash[:16],
                                "provider": s.provider,
                                "issuer": s.issuer,
                                "subject": s.subject,
                                "email": s.email,
                                "name": s.name,
                                "created": _when(s.created),
                                "expires": _when(s.expires),
                                "last_seen": _when(s.last_seen),
                                "hosts": list(s.hosts),
                            }
                            for s in summaries
                        ],
                        ensure_ascii=False,
                    )
                )
            else:
                print(f"{'SESSION':<17} {'USER':<32} {'PROVIDER':<10} {'LAST SEEN':<21} HOSTS")
                for s in summaries:
                    user = s.email or f"{s.issuer} {s.subject}"
                    hosts = ", ".join(s.hosts) or "-"
                    seen = _when(s.last_seen)
                    print(f"{s.hash[:16]:<17} {user:<32} {s.provider:<10} {seen:<21} {hosts}")
                print(f"{len(summaries)} session(s)", file=sys.stderr)
            return EXIT_OK
        if args.user:
            ended = await manager.revoke_email(args.user)
            who = args.user
        else:
            issuer, subject = args.subject
            ended = await manager.revoke_user(issuer, subject)
            who = f"{issuer} {subject}"
        await _audit_admin(settings, "session.revoke", {"user": who, "sessions": ended})
        if args.json:
            print(json.dumps({"ok": True, "user": who, "ended": ended}, ensure_ascii=False))
        else:
            print(f"{who}: {ended} session(s) ended; every gateway refuses them from now on")
        return EXIT_OK
    finally:
        await store.close()


async def _audit_admin(settings: GatewaySettings, action: str, detail: dict[str, Any]) -> None:
    """IT's actions are audit records too (their own short chain, verified like the rest)."""
    if not settings.audit.enabled:
        return
    from gateway.wire_audit import build_audit

    parts = build_audit(settings, dry_run=False)
    for service in parts.services:
        await service.start()
    try:
        parts.trail.admin(action, detail, actor=_operator())
    finally:
        for service in reversed(parts.services):
            await service.stop()


def _operator() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()} (cli)"
    except Exception:  # no user name in a bare container: say where, not who
        return f"{socket.gethostname()} (cli)"


def cmd_sessions(args: argparse.Namespace, settings: GatewaySettings) -> int:
    if args.action == "revoke" and not (args.user or args.subject):
        print("sessions revoke needs --user EMAIL or --subject ISSUER SUBJECT", file=sys.stderr)
        return EXIT_USAGE
    from gateway.state.base import StateUnavailable

    try:
        return asyncio.run(_sessions(settings, args))
    except StateUnavailable as error:
        # The store is down: say so, and that nothing was ended (no traceback for IT to decode).
        print(
            f"the session store cannot be reached ({error.detail}); nothing was changed: "
            "run the command again once it answers",
            file=sys.stderr,
        )
        return EXIT_FAILED


def cmd_keys(args: argparse.Namespace, settings: GatewaySettings) -> int:
    from gateway.assertion import AssertionKeyRing, KeyRingError

    ring = AssertionKeyRing(settings.assertion.key_dir)
    now = time.time()
    try:
        if args.action == "rotate":
            key = ring.rotate(now, publish_ahead=args.publish_ahead)
            detail = {"kid": key.kid, "activates": _when(key.activates)}
            asyncio.run(_audit_admin(settings, "assertion-key.rotate", detail))
            print(
                f"new key {key.kid} published now, signs from {_when(key.activates)}; "
                "the current key retires then and stays published until its tokens expire"
            )
            return EXIT_OK
        ring.load()
    except KeyRingError as error:
        print(f"{settings.assertion.key_dir}: {error}", file=sys.stderr)
        return EXIT_FAILED
    rows = [
        {
            "kid": key.kid,
            "activates": _when(key.activates),
            "retires": _when(key.retires) if key.retires is not None else None,
            "signing": key.activates <= now and (key.retires is None or now < key.retires),
        }
        for key in ring.keys
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            state = "signing" if row["signing"] else "published"
            print(f"{row['kid']}  {state:<9}  from {row['activates']}  until {row['retires']}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """`tabiji audit …` on the store, key and checkpoint export the config names."""
    from gateway.audit.cli import AuditCliConfig, run_audit
    from gateway.wire_audit import redactor_from

    audit = settings.audit
    config = AuditCliConfig(
        store_url=audit.store,
        base_dir=audit.key_file.parent,
        key_file=audit.key_file,
        checkpoint_export=audit.checkpoint_export,
        checkpoint_url=audit.checkpoint_url,
        tsa_url=audit.tsa_url,
        spool_dir=audit.spool_dir,
        redactor=redactor_from(settings),
        actor=_operator(),
    )
    return run_audit(args, config)


def add_admin_parsers(commands: Any) -> None:
    """The `sessions` and `keys` subcommands (handlers take the loaded settings)."""
    sessions = commands.add_parser(
        "sessions",
        help="list or end users' sessions (every replica)",
        description=(
            "List live sessions, or end every session of a user on every gateway sharing the "
            "session store: effective on the next request (within a second), and the user's "
            "open WebSockets close."
        ),
    )
    sessions.add_argument("action", choices=["list", "revoke"])
    sessions.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")
    sessions.add_argument("--user", metavar="EMAIL", help="the user's e-mail address")
    sessions.add_argument(
        "--subject", nargs=2, metavar=("ISSUER", "SUBJECT"), help="the user's issuer and subject"
    )
    sessions.add_argument("--json", action="store_true", help="machine-readable output")
    sessions.set_defaults(admin_handler=cmd_sessions)

    keys = commands.add_parser(
        "keys",
        help="list or rotate the identity assertion keys",
        description=(
            "The ES256 keys that sign X-Tabiji-Assertion. `rotate` publishes a new key at once "
            "and lets it sign after --publish-ahead seconds, so upstreams' JWKS caches know it "
            "first; the old key stays published until its last assertion has expired."
        ),
    )
    keys.add_argument("action", choices=["list", "rotate"])
    keys.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")
    keys.add_argument(
        "--publish-ahead", type=float, default=600.0, help="seconds before the new key signs"
    )
    keys.add_argument("--json", action="store_true", help="machine-readable output")
    keys.set_defaults(admin_handler=cmd_keys)

    from gateway.audit.cli import add_audit_parser

    def config_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")

    audit = add_audit_parser(commands, common=config_option)
    audit.set_defaults(admin_handler=cmd_audit)
