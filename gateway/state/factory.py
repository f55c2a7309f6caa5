"""Build the StateStore a URL names (sqlite:// or redis://, rediss://, unix://); say it safely.

Must not import gateway.settings; imports the Redis store only when a Redis URL asks for it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from gateway.state.base import StateStore
from gateway.state.sqlite import SqliteStateStore

ACCEPTED_FORMS = (
    "sqlite:///relative/path.db (relative to the configuration's directory), "
    "sqlite:////absolute/path.db, redis://[:password@]host[:port][/db], "
    "rediss://[:password@]host[:port][/db] (TLS), unix:///path/to/redis.sock[?db=N]"
)


def open_state_store(
    url: str, *, base_dir: Path | None = None, redis_prefix: str = "tabiji:"
) -> StateStore:
    """The store for `url`, not yet opened (the caller awaits `open()`); ValueError if malformed.

    SQLite URLs follow the SQLAlchemy convention: three slashes and a relative path, resolved
    against `base_dir`; four slashes (an empty segment, then the absolute path) for an absolute one.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # urlsplit checks the port only when it is read
    except ValueError as exc:
        raise ValueError(
            f"state store URL is malformed ({exc}); accepted: {ACCEPTED_FORMS}"
        ) from exc
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return SqliteStateStore(sqlite_path(url, base_dir))
    if scheme in ("redis", "rediss", "unix"):
        if scheme == "unix" and not parts.path.startswith("/"):
            raise ValueError(
                f"unix:// state store URL needs an absolute socket path: {describe_store(url)}"
            )
        if scheme != "unix" and not parts.hostname:
            raise ValueError(f"{scheme}:// state store URL needs a host: {describe_store(url)}")
        from gateway.state.redis import RedisStateStore

        return RedisStateStore(url, prefix=redis_prefix)
    raise ValueError(
        f"unsupported state store URL {describe_store(url)}; accepted: {ACCEPTED_FORMS}"
    )


def sqlite_path(
    url: str, base_dir: Path | None, *, what: str = "state store", accepted: str = ACCEPTED_FORMS
) -> Path:
    """The file a sqlite:/// URL names (`what` and `accepted` only word the errors): three
    slashes and a path relative to `base_dir`, or four slashes and an absolute path."""
    rest = url[len("sqlite:") :]
    if not rest.startswith("///") or "?" in rest or "#" in rest:
        raise ValueError(f"SQLite {what} URL {url!r} is not one of: {accepted}")
    raw = rest[3:]
    if raw in ("", "/") or raw.endswith("/"):
        raise ValueError(f"SQLite {what} URL {url!r} names no file")
    if raw.startswith("/"):
        return Path(raw)
    if base_dir is None:
        raise ValueError(f"SQLite {what} URL {url!r} is relative but no base directory is set")
    return base_dir / raw


def describe_store(url: str) -> str:
    """The URL without user info and query (either may carry a password): for logs and /ready."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:  # any user info may be a password (redis://secret@host is one, misplaced)
        rest = "***@" + rest.rsplit("@", 1)[1]
    rest = rest.split("?", 1)[0].split("#", 1)[0]  # unix://…?password=… carries one in the query
    return f"{scheme}{sep}{rest}"
