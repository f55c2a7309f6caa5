"""Composition root, audit part: settings → audit store, checkpoint key, writer, trail, services.

Part of gateway.app (it reads settings; no stage imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.routing import BaseRoute

from gateway.app_services import Service
from gateway.audit.checkpoint import (
    Checkpointer,
    key_id,
    load_private_key,
    public_path,
    retired_keys,
    verification_keys,
)
from gateway.audit.query import StoreReader
from gateway.audit.redact import Redactor
from gateway.audit.store import AuditStore, open_audit_store
from gateway.audit.trail import AuditTrail
from gateway.audit.writer import AuditWriter
from gateway.decide import PolicyHolder
from gateway.pages import Pages
from gateway.settings import GatewaySettings
from gateway.web.audit_view import audit_routes
from gateway.web.guard import PolicyGuard, Resolver
from policies.geoip import GeoIP


@dataclass
class AuditParts:
    """What gateway.app needs from the audit side."""

    store: AuditStore
    writer: AuditWriter
    trail: AuditTrail
    checkpointer: Checkpointer | None
    services: list[Service] = field(default_factory=list)


def redactor_from(settings: GatewaySettings) -> Redactor:
    """The town's redaction choices as the writer applies them."""
    r = settings.audit.redact
    return Redactor(
        client_ip=r.client_ip,
        user_email=r.user_email,
        user_subject=r.user_subject,
        device_id=r.device_id,
        country=r.country,
        query=r.query,
        posture=r.posture,
    )


def _set_backlog_gauge(n: int) -> None:
    from gateway.observability import metrics

    metrics.audit_unindexed = n


def build_audit(settings: GatewaySettings, *, dry_run: bool) -> AuditParts:
    """The audit writer of this worker (one chain per worker process), unstarted."""
    audit = settings.audit
    store = open_audit_store(audit.store, audit.key_file.parent)
    checkpointer = None
    if not dry_run:
        checkpointer = Checkpointer(
            load_private_key(audit.key_file, create=True),
            export_path=audit.checkpoint_export,
            interval=audit.checkpoint_interval,
            url=audit.checkpoint_url,
            tsa_url=audit.tsa_url,
        )
    writer = AuditWriter(
        store,
        mode=audit.durability,
        flush_interval=audit.flush_interval,
        spool_dir=audit.spool_dir,
        fail_closed=audit.fail_closed,
        checkpointer=checkpointer,
        redactor=redactor_from(settings),
        on_backlog=_set_backlog_gauge,
    )
    parts = AuditParts(
        store=store, writer=writer, trail=AuditTrail(writer), checkpointer=checkpointer
    )

    async def start() -> None:
        try:
            await store.open()
        except Exception:
            # Unreachable now: the writer spools and drains when the store returns.
            import logging

            logging.getLogger("tabiji.audit").exception("audit store unavailable at start")
        await writer.start()

    async def stop() -> None:
        try:
            await writer.close()  # flushes everything and writes the closing checkpoint
        finally:
            await store.close()

    parts.services = [Service("audit", start, stop)]
    return parts


def audit_view_routes(
    settings: GatewaySettings,
    parts: AuditParts,
    *,
    holder: PolicyHolder,
    resolver: Resolver | None,
    pages: Pages,
    geoip: GeoIP | None,
) -> list[BaseRoute]:
    """The auditors' pages, guarded by `audit.view_policy` (absent: no audit pages at all)."""
    policy = settings.audit.view_policy
    if policy is None:
        return []
    # The published and retired keys too: checkpoints signed before a key rotation stay valid.
    key_file = settings.audit.key_file
    keys = verification_keys(public_path(key_file), *retired_keys(key_file))
    if parts.checkpointer is not None:
        keys[key_id(parts.checkpointer.public_key)] = parts.checkpointer.public_key
    reader = StoreReader(parts.store, keys or None, settings.audit.checkpoint_export)
    guard = PolicyGuard(
        holder=holder,
        policy=policy,
        resource="tabiji-audit",
        resolver=resolver,
        pages=pages,
        geoip=geoip,
        public_origin=settings.public_url,
    )
    return list(
        audit_routes(reader=reader, pages=pages, access=guard, record_view=parts.trail.view)
    )
