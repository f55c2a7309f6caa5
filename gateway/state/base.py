"""The StateStore interface: the shared state several gateway workers and replicas agree on.

Sessions, single-use values (login state, hand-off codes, replay caches), per-user indexes and a
revocation feed. Implementations: gateway/state/sqlite.py (default), gateway/state/redis.py.
Must not import gateway.settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class StateUnavailable(Exception):
    """The store could not be reached or answered with an error: callers fail closed."""

    code = "state-unavailable"


class StateStore(Protocol):
    """Keys live in namespaces; every value has a TTL in seconds and is bytes."""

    async def open(self) -> None:
        """Connect / create tables. Idempotent."""

    async def close(self) -> None:
        """Release connections and background tasks."""

    async def ping(self) -> bool:
        """True when the store answers (readiness)."""

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
        """Messages after `cursor` and the next cursor; cursor None means "from now on"."""

    def lock(self, name: str, ttl: float) -> AbstractAsyncContextManager[bool]:
        """A lock across workers and replicas, held at most `ttl` s; yields False if not won
        within `ttl` (IdP token refresh is serialised per session with it)."""
