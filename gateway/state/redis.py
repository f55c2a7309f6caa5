"""The multi-replica StateStore on Redis (redis.asyncio): the one module that imports redis.

Key layout under a prefix: kv:{ns}:{key}, ix:{index}, feed:{channel} (a stream), lock:{name}.
Must not import gateway.settings.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.state.base import StateUnavailable, check_namespace, check_ttl, polled_lock

_FEED_BATCH = 1000
_FEED_MAXLEN = 10_000
_SCAN_BATCH = 500
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}\Z")

# SADD, then extend (never shorten) the set's expiry: PEXPIRE GT alone treats a key without a
# TTL as infinite, so a fresh set would never get one.
_INDEX_ADD = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# Release a lock only while it still holds our token: a holder that outlived its TTL must not
# delete the lock the next holder took.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _ms(ttl: float) -> int:
    """A TTL in whole milliseconds, at least 1 (PX 0 is an error)."""
    return max(1, int(ttl * 1000))


class RedisStateStore:
    """StateStore on Redis ≥ 6.2 (GETDEL, exclusive XRANGE); several replicas share it.

    Socket timeouts and a single retry make an outage fail fast (StateUnavailable) instead of
    hanging the request.
    """

    def __init__(self, url: str, prefix: str = "tabiji:", *, timeout: float = 2.0) -> None:
        self._url = url
        self._prefix = prefix
        self._timeout = timeout
        self._redis: aioredis.Redis | None = None

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StateUnavailable("the Redis state store is not open")
        return self._redis

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Any Redis or socket error means the store is unavailable: callers fail closed."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis state store: {type(exc).__name__}: {exc}") from exc

    def _kv(self, ns: str, key: str) -> str:
        return f"{self._prefix}kv:{ns}:{key}"

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client and check the server answers (StateUnavailable if not). Idempotent.

        The client stays usable after a failed check: later calls reconnect on their own.
        """
        if self._redis is None:
            try:
                self._redis = aioredis.Redis.from_url(
                    self._url,
                    socket_timeout=self._timeout,
                    socket_connect_timeout=self._timeout,
                    # One retry covers a pooled connection that died with a server restart;
                    # more would multiply the wait a request spends on an outage.
                    retry=Retry(NoBackoff(), 1),
                    decode_responses=False,
                )
            except ValueError as exc:
                raise StateUnavailable(f"Redis state store URL: {exc}") from exc
        with self._errors():
            await self._r.ping()

    async def close(self) -> None:
        """Close the client and its connection pool."""
        client, self._redis = self._redis, None
        if client is not None:
            with self._errors():
                await client.aclose()

    async def ping(self) -> bool:
        """True when PING answers."""
        try:
            with self._errors():
                return bool(await self._r.ping())
        except StateUnavailable:
            return False

    # -- values -----------------------------------------------------------------------------

    async def put(self, ns: str, key: str, value: bytes, ttl: float) -> None:
        """SET PX."""
        check_namespace(ns)
        check_ttl(ttl)
        with self._errors():
            await self._r.set(self._kv(ns, key), value, px=_ms(ttl))

    async def put_new(self, ns: str, key: str, value: bytes, ttl: float) -> bool:
        """SET NX PX: an expired key is already gone, so it counts as absent."""
        check_namespace(ns)
        check_ttl(ttl)
        with self._errors():
            return bool(await self._r.set(self._kv(ns, key), value, px=_ms(ttl), nx=True))

    async def get(self, ns: str, key: str) -> bytes | None:
        """GET."""
        check_namespace(ns)
        with self._errors():
            return _bytes_or_none(await self._r.get(self._kv(ns, key)))

    async def take(self, ns: str, key: str) -> bytes | None:
        """GETDEL: one command, so of racing replicas only one gets the value."""
        check_namespace(ns)
        with self._errors():
            return _bytes_or_none(await self._r.getdel(self._kv(ns, key)))

    async def delete(self, ns: str, key: str) -> None:
        """DEL."""
        check_namespace(ns)
        with self._errors():
            await self._r.delete(self._kv(ns, key))

    async def scan(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        """SCAN MATCH then MGET per batch; keys that expired in between are skipped."""
        check_namespace(ns)
        head = self._kv(ns, "")
        # The prefix may hold glob characters: escape them for MATCH.
        match = re.sub(r"([*?\[\]\\])", r"\\\1", head) + "*"
        cursor: int = 0
        while True:
            with self._errors():
                cursor, keys = await self._r.scan(cursor, match=match, count=_SCAN_BATCH)
                values = await self._r.mget(keys) if keys else []
            for raw_key, value in zip(keys, values, strict=True):
                if value is not None:
                    yield _text(raw_key)[len(head) :], _bytes(value)
            if cursor == 0:
                return

    # -- index sets -------------------------------------------------------------------------

    async def index_add(self, index: str, member: str, ttl: float) -> None:
        """SADD and extend the set's PEXPIRE to at least `ttl`, atomically (Lua)."""
        check_ttl(ttl)
        with self._errors():
            await self._eval(_INDEX_ADD, [f"{self._prefix}ix:{index}"], [member, _ms(ttl)])

    async def index_members(self, index: str) -> list[str]:
        """SMEMBERS."""
        with self._errors():
            members = await self._r.smembers(f"{self._prefix}ix:{index}")
        return sorted(_text(m) for m in members)

    async def index_remove(self, index: str, member: str) -> None:
        """SREM."""
        with self._errors():
            await self._r.srem(f"{self._prefix}ix:{index}", member)

    # -- feed -------------------------------------------------------------------------------

    async def publish(self, channel: str, message: str) -> None:
        """XADD with MAXLEN ~ 10000: the feed is bounded; readers poll far more often."""
        with self._errors():
            await self._r.xadd(
                f"{self._prefix}feed:{channel}",
                {"m": message},
                maxlen=_FEED_MAXLEN,
                approximate=True,
            )

    async def read_since(self, channel: str, cursor: str | None) -> tuple[list[str], str]:
        """XRANGE from just after the cursor; None → the stream's last id (or 0-0 when empty)."""
        stream = f"{self._prefix}feed:{channel}"
        if cursor is None:
            with self._errors():
                last = await self._r.xrevrange(stream, count=1)
            return [], _entry_id(last[0]) if last else "0-0"
        if not _STREAM_ID.match(cursor):
            raise ValueError(f"not a Redis stream cursor: {cursor!r}")
        with self._errors():
            entries = await self._r.xrange(stream, min=f"({cursor}", count=_FEED_BATCH)
        if not entries:
            return [], cursor
        messages = [_text((fields or {})[b"m"]) for _, fields in entries]
        return messages, _entry_id(entries[-1])

    # -- lock -------------------------------------------------------------------------------

    def lock(self, name: str, ttl: float) -> AbstractAsyncContextManager[bool]:
        """SET NX PX with a random token; released by a Lua compare-and-delete."""
        key = f"{self._prefix}lock:{name}"
        token = secrets.token_bytes(16)

        async def acquire() -> bool:
            with self._errors():
                return bool(await self._r.set(key, token, px=_ms(ttl), nx=True))

        async def release() -> None:
            with self._errors():
                await self._eval(_UNLOCK, [key], [token])

        return polled_lock(acquire, release, ttl)

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        # EVAL (not EVALSHA): the scripts are tiny and a flushed script cache cannot break them.
        return await self._r.eval(script, len(keys), *keys, *args)


def _bytes(value: bytes | str | memoryview) -> bytes:
    """A reply as bytes (the client is built with decode_responses=False, so bytes already)."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _text(value: bytes | str | memoryview) -> str:
    """A key, member, id or message as text (we only ever wrote text there)."""
    return value if isinstance(value, str) else bytes(value).decode()


def _bytes_or_none(value: bytes | str | memoryview | None) -> bytes | None:
    return None if value is None else _bytes(value)


def _entry_id(entry: Any) -> str:
    """The id of one XRANGE/XREVRANGE entry (id, fields)."""
    return _text(entry[0])
