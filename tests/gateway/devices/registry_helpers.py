"""Helpers for the device registry tests: keys, new devices, their owner's completed login,
stores of both kinds (a fresh PostgreSQL schema per test, dropped afterwards) and raw access to
a store's rows."""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import key_thumbprint, public_key_pem
from gateway.devices.model import NewDevice
from gateway.devices.registry import RegistryStore
from gateway.devices.store_postgres import PostgresDeviceStore
from gateway.devices.store_sqlite import SqliteDeviceStore

POSTGRES_URL = os.environ.get(
    "TABIJI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
T0 = 1_790_000_000.0  # a fixed unix time (2026-09)
ISSUER = "https://idp.town.example"
KINDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Login:
    """A completed OIDC login (what gateway.identity.sessions.LoginFacts asks)."""

    issuer: str = ISSUER
    subject: str = "u-sato"
    email: str | None = "sato@town.example"
    email_verified: bool = True
    name: str | None = "佐藤 花子"
    groups: frozenset[str] = frozenset({"staff"})
    groups_overage: bool = False
    amr: frozenset[str] = frozenset({"pwd"})
    acr: str | None = None
    sid: str | None = None
    id_token: str | None = None
    refresh_token: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


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


class Place:
    """Where one test's devices live: a SQLite file or a PostgreSQL schema; opens any number of
    store instances on it (as several workers or replicas would)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "devices.db"
        self.schema = f"tabiji_devices_test_{secrets.token_hex(6)}"
        self.stores: list[RegistryStore] = []
        if kind == "postgres":
            require_postgres()

    def new_store(self) -> RegistryStore:
        store: RegistryStore
        if self.kind == "sqlite":
            store = SqliteDeviceStore(self.path, busy_timeout=5.0)
        else:
            store = PostgresDeviceStore(POSTGRES_URL, schema=self.schema, timeout=5.0)
        self.stores.append(store)
        return store

    async def store(self) -> RegistryStore:
        store = self.new_store()
        await store.open()
        return store

    def raw(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL directly (placeholders written `?`), as an operator at a SQL prompt would."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.path, isolation_level=None) as conn:
                return conn.execute(sql, args).fetchall()
        with psycopg.connect(
            POSTGRES_URL, options=f"-c search_path={self.schema}", autocommit=True
        ) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []

    def row(self, device_id: str) -> tuple[Any, ...]:
        """The device's stored row exactly as the database holds it (every column)."""
        rows = self.raw("SELECT * FROM devices WHERE id = ?", (device_id,))
        assert len(rows) == 1
        return rows[0]

    def snapshot(self) -> list[tuple[Any, ...]]:
        """Every stored row in id order, and the change counter: to prove nothing changed."""
        if self.kind == "sqlite":
            counter = self.raw("SELECT version FROM device_version")
        else:
            counter = self.raw("SELECT last_value, is_called FROM device_version_seq")
        return [*self.raw("SELECT * FROM devices ORDER BY id"), *counter]

    async def dispose(self) -> None:
        for store in self.stores:
            if isinstance(store, PostgresDeviceStore):
                await store.drop_schema()
                break
        for store in self.stores:
            await store.close()


async def place_fixture(kind: str, tmp_path: Path) -> AsyncIterator[Place]:
    place = Place(kind, tmp_path)
    try:
        yield place
    finally:
        await place.dispose()


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_device(
    key: ec.EllipticCurvePrivateKey | None = None, **changes: Any
) -> tuple[NewDevice, ec.EllipticCurvePrivateKey]:
    """A pending laptop of sato@town.example with a fresh P-256 key; any field can be changed."""
    key = key or make_key()
    public = key.public_key()
    fields: dict[str, Any] = {
        "id": "dev-" + secrets.token_hex(6),
        "owner_issuer": ISSUER,
        "owner_subject": "u-sato",
        "owner_email": "sato@town.example",
        "key_thumbprint": key_thumbprint(public),
        "public_key_pem": public_key_pem(public),
        "key_storage": "software",
        "status": "pending",
        "hostname": "sato-laptop",
        "serial": "PF3ABC12",
        "created_at": T0,
    }
    fields.update(changes)
    return NewDevice(**fields), key
