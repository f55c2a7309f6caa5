"""The StateStore interface: the shared state several gateway workers and replicas agree on.

Sessions, single-use values (login state, hand-off codes, replay caches), per-user indexes and a
revocation feed. Implementations: gateway/state/sqlite.py (default), gateway/state/redis.py.
Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from gateway.errors import GatewayError

# Namespaces are code constants; no ':' or glob characters, so a scan of one namespace (Redis
# SCAN MATCH) can never match keys of another.
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


class StateUnavailable(GatewayError):
    """The store could not be reached or answered with an error: callers fail closed (503)."""

    code = "state-unavailable"
    status = 503


class StateStore(Protocol):
    """Keys live in namespaces; every value has a TTL in seconds and is bytes.

    Every method but `ping` raises StateUnavailable when the store cannot answer; a namespace
    outside [A-Za-z0-9_.-] or a TTL <= 0 is a ValueError.
    """

    async def open(self) -> None:
        """Connect / create tables. Idempotent."""

    async def close(self) -> None:
        """Release connections and background tasks."""

    async def ping(self) -> bool:
        """True when the store answers (readiness); False, never an exception, when it does not."""

    async def put(self, ns: str, key: str, value: bytes, ttl: float) -> None:
        """Store (overwrite) a value that expires after `ttl` seconds."""

    async def put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool:
        """Store only if absent (or expired); False if it exists — replay caches (`jti` seen)."""

    async def get(self, ns: str, key: str) -> bytes | None:
        """The value, or None when absent or expired."""

    async def take(self, ns: str, key: str) -> bytes | None:
        """Atomically get and delete: a single-use value can be taken once, by one replica."""

    async def delete(self, ns: str, key: str) -> None:
        """Remove a value (absent is fine)."""

    def scan(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        """Every live (key, value) in a namespace — for admin listings, never the hot path."""

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        """Add a member to a set (e.g. a user's sessions); the set lives at least `ttl` more."""

    async def index_members(self, index: str) -> list[str]:
        """The members of a set (empty when absent)."""

    async def index_remove(self, index: str, member: str) -> None:
        """Remove one member of a set."""

    async def publish(self, channel: str, message: str) -> None:
        """Append to an ordered feed every worker and replica reads (revocations)."""

    async def read_since(self, channel: str, cursor: str | None) -> tuple[list[str], str]:
        """Messages after `cursor` (at most 1000, oldest first) and the next cursor.

        Cursor None means "from now on": no messages and the cursor of the newest one. Cursors
        are opaque strings of one store kind; a malformed one is a ValueError.
        """

    def lock(self, name: str, ttl: float) -> AbstractAsyncContextManager[bool]:
        """A lock across workers and replicas, held at most `ttl` s; yields False if not won
        within `ttl` (IdP token refresh is serialised per session with it)."""


def check_namespace(ns: str) -> None:
    """Reject a namespace that could overlap another one (ValueError: a programming error)."""
    if not _NAMESPACE.match(ns):
        raise ValueError(f"state namespace must match [A-Za-z0-9_.-]{{1,64}}: {ns!r}")


def check_ttl(ttl: float) -> None:
    """Every value expires: a TTL must be a positive number of seconds."""
    if not ttl > 0:  # also rejects NaN
        raise ValueError(f"state TTL must be > 0 seconds: {ttl!r}")


@asynccontextmanager
async def polled_lock(
    acquire: Callable[[], Awaitable[bool]],
    release: Callable[[], Awaitable[None]],
    ttl: float,
    interval: float = 0.02,
) -> AsyncIterator[bool]:
    """Try `acquire` until it wins or `ttl` s pass; yield whether it won; `release` if it did.

    `acquire` must store an owner token with the TTL and `release` delete it only while it is
    still ours, so a holder that outlived its TTL never frees the lock of the next holder.
    """
    check_ttl(ttl)
    deadline = time.monotonic() + ttl
    won = await acquire()
    while not won and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(interval, left))
        won = await acquire()
    try:
        yield won
    finally:
        if won:
            await release()
