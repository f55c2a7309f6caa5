"""Build the DeviceStore a URL names: sqlite:/// (embedded default) or postgresql:// (replicas).

Must not import gateway.settings; imports the PostgreSQL store only when a URL asks for it.
"""

from __future__ import annotations

from pathlib import Path

from gateway.devices.registry import RegistryStore
from gateway.devices.store_sqlite import SqliteDeviceStore
from gateway.state.factory import sqlite_path

ACCEPTED_FORMS = (
    "sqlite:///relative/path.db (relative to the configuration's directory), "
    "sqlite:////absolute/path.db, postgresql://user@host:port/database"
)


def open_device_store(
    url: str, *, base_dir: Path | None = None, schema: str | None = None
) -> RegistryStore:
    """The store for `url`, not yet opened (the registry's start() opens it); ValueError if the
    URL is malformed. `schema` places PostgreSQL's tables in a schema of their own."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return SqliteDeviceStore(
            sqlite_path(url, base_dir, what="device store", accepted=ACCEPTED_FORMS)
        )
    if scheme in ("postgresql", "postgres"):
        if not url.partition("://")[2]:
            raise ValueError(f"device store URL names no server; accepted: {ACCEPTED_FORMS}")
        from gateway.devices.store_postgres import PostgresDeviceStore

        return PostgresDeviceStore(url, schema=schema)
    raise ValueError(f"unsupported device store scheme {scheme!r}; accepted: {ACCEPTED_FORMS}")
