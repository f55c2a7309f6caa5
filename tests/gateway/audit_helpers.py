"""Helpers for the audit tests: events as the pipeline builds them, stores, keys, a filled chain."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.checkpoint import Checkpointer, load_private_key
from gateway.audit.record import AuditEvent
from gateway.audit.store import AuditStore
from gateway.audit.store_postgres import PostgresAuditStore
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.writer import AuditWriter

POSTGRES_URL = os.environ.get(
    "TABIJI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
T0 = 1_790_000_000_000_000  # a fixed UTC µs timestamp (2026-09)


def make_event(**changes: Any) -> AuditEvent:
    """An allowed request by a signed-in user on a managed device; any field can be changed."""
    fields: dict[str, Any] = {
        "kind": "request",
        "time_us": T0,
        "request_id": "01J9ZQ3K7Y8W",
        "route": "wiki",
        "method": "GET",
        "host": "wiki.town.example",
        "path": "/pages/budget",
        "client_ip": "192.0.2.10",
        "country": "JP",
        "user_issuer": "https://idp.town.example",
        "user_subject": "u-123",
        "user_email": "sato@town.example",
        "groups": ("staff", "finance"),
        "session_hash": "ab" * 32,
        "device_id": "dev-42",
        "posture": "linux 6.1 disk=on fw=on",
        "posture_age_s": 30,
        "policy_hash": "sha256:" + "cd" * 32,
        "rule": "staff-wiki",
        "decision": "allow",
        "reasons": (),
        "status": 200,
        "latency_ms": 12.3456789,
        "bytes_in": 512,
        "bytes_out": 2048,
    }
    fields.update(changes)
    return AuditEvent(**fields)


def deny_event(**changes: Any) -> AuditEvent:
    """A request the policy refused (stale posture)."""
    base: dict[str, Any] = {
        "decision": "deny",
        "reasons": ("device-posture-stale",),
        "status": 403,
        "rule": None,
        "bytes_out": 900,
    }
    return make_event(**{**base, **changes})


def error_event(**changes: Any) -> AuditEvent:
    """An upstream that did not answer: the gateway answered 502."""
    base: dict[str, Any] = {
        "decision": "error",
        "reasons": ("upstream-unreachable",),
        "status": 502,
    }
    return make_event(**{**base, **changes})


def malformed_event(**changes: Any) -> AuditEvent:
    """A request refused before routing (malformed target): no route, no user, no device."""
    base: dict[str, Any] = {
        "decision": "deny",
        "reasons": ("rejected",),
        "status": 400,
        "route": "",
        "path": "/%2e%2e/etc",
        "user_issuer": None,
        "user_subject": None,
        "user_email": None,
        "groups": (),
        "session_hash": None,
        "device_id": None,
        "posture": None,
        "posture_age_s": None,
        "policy_hash": None,
        "rule": None,
        "bytes_out": 0,
    }
    return make_event(**{**base, **changes})


def require_postgres(url: str = POSTGRES_URL) -> None:
    """Skip when the test PostgreSQL does not answer; fail instead when CI=true."""
    try:
        with psycopg.connect(url, connect_timeout=2):
            pass
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {url} is unreachable ({exc}); set TABIJI_TEST_POSTGRES_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def new_store(kind: str, tmp_path: Path) -> AuditStore:
    """An unopened store: SQLite in tmp_path, or PostgreSQL in a fresh schema."""
    if kind == "sqlite":
        return SqliteAuditStore(tmp_path / "audit.db", busy_timeout_ms=100)
    require_postgres()
    return PostgresAuditStore(
        POSTGRES_URL, schema=f"tabiji_audit_test_{secrets.token_hex(6)}", timeout=2.0
    )


async def dispose(store: AuditStore) -> None:
    """Close the store; drop a PostgreSQL test schema."""
    if isinstance(store, PostgresAuditStore):
        await store.drop_schema()
    await store.close()


@dataclass
class Filled:
    """A chain written through the writer, its key and its checkpoint export."""

    store: AuditStore
    key: Ed25519PrivateKey
    export: Path
    chain_id: str
    count: int


def audit_key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_private_key(tmp_path / "audit-key.pem", create=True)


async def fill(
    store: AuditStore,
    tmp_path: Path,
    n: int = 20,
    *,
    interval: float = 0.0,
    chain_id: str = "h:1:1",
) -> Filled:
    """Write `n` events (every third refused) through a writer with checkpoints every flush,
    then close it (closing checkpoint)."""
    key = audit_key(tmp_path)
    export = tmp_path / "checkpoints.jsonl"
    cp = Checkpointer(key, export_path=export, interval=interval)
    writer = AuditWriter(store, chain_id=chain_id, checkpointer=cp, spool_dir=tmp_path / "spool")
    for i in range(n):
        ev = deny_event if i % 3 == 0 else make_event
        writer.submit(ev(time_us=T0 + i * 1_000_000, request_id=f"req-{i}"))
        if i % 7 == 6:
            await writer.flush()
    await writer.close()
    return Filled(store, key, export, chain_id, n)
