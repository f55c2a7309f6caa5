"""Build the DeviceStore a URL names: sqlite:/// (embedded default) or postgresql:// (replicas).

Must not import gateway.settings; imports the PostgreSQL store only when a URL asks for it.
"""

from __future__ import annotations

from pathlib import Path

from gateway.devices.registry import RegistryStore
from gateway.devices.store_sqlite import SqliteDeviceStore

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
        return SqliteDeviceStore(_sqlite_path(url, base_dir))
    if scheme in ("postgresql", "postgres"):
        if not url.partition("://")[2]:
            raise ValueError(f"device store URL names no server; accepted: {ACCEPTED_FORMS}")
        from gateway.devices.store_postgres import PostgresDeviceStore

        return PostgresDeviceStore(url, schema=schema)
    raise ValueError(f"unsupported device store scheme {scheme!r}; accepted: {ACCEPTED_FORMS}")


def _sqlite_path(url: str, base_dir: Path | None) -> Path:
    rest = url[len("sqlite:") :]
    if not rest.startswith("///") or "?" in rest or "#" in rest:
        raise ValueError(f"SQLite device store URL {url!r} is not one of: {ACCEPTED_FORMS}")
    raw = rest[3:]
    if raw in ("", "/") or raw.endswith("/"):
        raise ValueError(f"SQLite device store URL {url!r} names no file")
    if raw.startswith("/"):
        return Path(raw)
    if base_dir is None:
        raise ValueError(f"SQLite device store URL {url!r} is relative, with no base directory")
    return base_dir / raw
