"""Server-side sessions: opaque cookie ids, records in the StateStore, an in-process cache in
front of it, revocation (with a feed to every worker and replica) and serialised IdP refresh.

Must not import gateway.settings, authlib or the OIDC module: the refresher is a callable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Protocol

from gateway.identity.model import Identity
from gateway.state.base import StateStore

log = logging.getLogger("tabiji.sessions")

# StateStore namespaces and the feed channel (code constants: see gateway/state/base.py).
SESSION_NS = "session"  # sha256-hex(cookie id) -> main or host record (JSON)
SEEN_NS = "session-seen"  # main hash -> last activity (its own key: see _touch)
TOMBSTONE_NS = "session-revoked"  # main hash -> "1" while a revoked session could be resurrected
LOGIN_NS = "login"  # OIDC `state` -> provider, PKCE verifier, nonce, request id, binding hash
HANDOFF_REQ_NS = "handoff-req"  # request id -> route host, return path, binding hash
HANDOFF_NS = "handoff"  # single-use hand-off code -> main hash, host, request id
BCL_JTI_NS = "bcl-jti"  # back-channel logout token ids already used
DEVICE_NS = "session-device"  # main hash -> the device bound to the session and when (JSON)
REVOCATIONS = "revocations"

# The OIDC client's error codes for a refresh (gateway/identity/oidc.py).
REFRESH_REJECTED = "oidc-refresh-rejected"  # the IdP says no: the session ends
REFRESH_FAILED = "oidc-refresh-failed"  # transient: keep the session, try again later

COOKIE_ID_BYTES = 32  # 256 bits from secrets.token_urlsafe
MAX_COOKIE_ID_LENGTH = 128
FEED_POLL_INTERVAL = 0.5
REFRESH_LOCK_TTL = 30.0
REFRESH_RETRY_DELAY = 60.0


def new_session_id() -> str:
    """A fresh opaque cookie value: 256 random bits, URL-safe base64."""
    return secrets.token_urlsafe(COOKIE_ID_BYTES)


def session_hash(cookie_id: str) -> str:
    """sha256-hex of a cookie id: the store key, and safe to log (it cannot be used as a cookie)."""
    return hashlib.sha256(cookie_id.encode()).hexdigest()


class LoginFacts(Protocol):
    """What a completed OIDC login (or refresh) tells the session; oidc.OidcLogin has these."""

    @property
    def issuer(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def email_verified(self) -> bool: ...
    @property
    def name(self) -> str | None: ...
    @property
    def groups(self) -> Collection[str]: ...
    @property
    def groups_overage(self) -> bool: ...
    @property
    def amr(self) -> Collection[str]: ...
    @property
    def acr(self) -> str | None: ...
    @property
    def sid(self) -> str | None: ...
    @property
    def id_token(self) -> str | None: ...
    @property
    def refresh_token(self) -> str | None: ...


# Redeems the session's refresh token at its provider (main.provider, main.refresh_token); the
# whole record is passed so the OIDC client can keep the identity when the provider answers a
# refresh without an ID token (see routes.oidc_refresher).
Refresher = Callable[["MainSession"], Awaitable[LoginFacts]]
RevokedListener = Callable[[frozenset[str]], None]


@dataclass(frozen=True, slots=True)
class MainSession:
    """The session created at the gateway's public URL after an OIDC login."""

    hash: str
    provider: str
    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None
    groups: tuple[str, ...]
    groups_overage: bool
    amr: tuple[str, ...]
    acr: str | None
    idp_sid: str | None
    host: str  # the public URL's authority: the only host this cookie is valid on
    created: float
    expires: float  # absolute: created + lifetime
    idle_timeout: float
    last_seen: float
    refresh_token: str | None
    id_token: str | None  # kept only as the id_token_hint of RP-initiated logout
    refresh_at: float | None
    # The ID token's other claims, for the policy's `claim` criterion (as bearer tokens have).
    claims: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "hash"}
        data["kind"] = "main"
        data["groups"] = list(self.groups)
        data["amr"] = list(self.amr)
        data["claims"] = dict(self.claims)
        return json.dumps(data, separators=(",", ":")).encode()

    def identity(self) -> Identity:
        """The Identity this session proves; `session_hash` is the main hash (the `sid`)."""
        return Identity(
            issuer=self.issuer,
            subject=self.subject,
            method="session",
            provider=self.provider,
            email=self.email,
            email_verified=self.email_verified,
            name=self.name,
            groups=frozenset(self.groups),
            groups_overage=self.groups_overage,
            amr=frozenset(self.amr),
            acr=self.acr,
            session_hash=self.hash,
            idp_sid=self.idp_sid,
            expires_at=self.expires,
            claims=MappingProxyType(dict(self.claims)),
        )


@dataclass(frozen=True, slots=True)
class HostSession:
    """A route host's own session, created from a hand-off; lives as long as its parent."""

    hash: str
    parent: str
    host: str
    created: float
    expires: float

    def to_json(self) -> bytes:
        data: dict[str, object] = {
            "kind": "host",
            "parent": self.parent,
            "host": self.host,
            "created": self.created,
            "expires": self.expires,
        }
        return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One user session for `tabiji sessions list` (no tokens)."""

    hash: str
    provider: str
    issuer: str
    subject: str
    email: str | None
    name: str | None
    created: float
    expires: float
    last_seen: float
    hosts: tuple[str, ...]


class _Malformed(Exception):
    pass


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _Malformed(key)
    return value


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _Malformed(key)
    return value


def _num(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(key)
    return float(value)


def _strs(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(key)
    return tuple(value)


def parse_record(key_hash: str, raw: bytes) -> MainSession | HostSession | None:
    """A stored record, or None when it is not one we wrote (never trusted half-way)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise _Malformed("not an object")
        kind = data.get("kind")
        if kind == "host":
            return HostSession(
                key_hash,
                _str(data, "parent"),
                _str(data, "host"),
                _num(data, "created"),
                _num(data, "expires"),
            )
        if kind != "main":
            raise _Malformed("kind")
        refresh_at = data.get("refresh_at")
        return MainSession(
            hash=key_hash,
            provider=_str(data, "provider"),
            issuer=_str(data, "issuer"),
            subject=_str(data, "subject"),
            email=_opt_str(data, "email"),
            email_verified=data.get("email_verified") is True,
            name=_opt_str(data, "name"),
            groups=_strs(data, "groups"),
            groups_overage=data.get("groups_overage") is True,
            amr=_strs(data, "amr"),
            acr=_opt_str(data, "acr"),
            idp_sid=_opt_str(data, "idp_sid"),
            host=_str(data, "host"),
            created=_num(data, "created"),
            expires=_num(data, "expires"),
            idle_timeout=_num(data, "idle_timeout"),
            last_seen=_num(data, "last_seen"),
            refresh_token=_opt_str(data, "refresh_token"),
            id_token=_opt_str(data, "id_token"),
            refresh_at=None if refresh_at is None else _num(data, "refresh_at"),
            claims=_claims(data.get("claims")),
        )
    except (ValueError, _Malformed) as exc:
        log.error("session record %s… is malformed (%s): treated as absent", key_hash[:12], exc)
        return None


DeviceBinding = tuple[str, float]  # (device id, bound at: unix seconds)


def parse_binding(raw: bytes | None) -> DeviceBinding | None:
    """A stored device binding, or None when absent or not one we wrote."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        device, at = data["device"], data["at"]
    except (ValueError, KeyError, TypeError):
        log.error("a session's device binding is malformed: treated as absent")
        return None
    if not isinstance(device, str) or isinstance(at, bool) or not isinstance(at, int | float):
        log.error("a session's device binding is malformed: treated as absent")
        return None
    return device, float(at)


class _MainState:
    """The cached, mutable view of one main session in this process."""

    __slots__ = (
        "binding",
        "can_refresh",
        "expires",
        "host",
        "identity",
        "idle",
        "refresh_at",
        "seen",
        "written",
    )

    def __init__(self, main: MainSession, seen: float, binding: DeviceBinding | None) -> None:
        identity = main.identity()
        if binding is not None:
            identity = replace(identity, device_id=binding[0])
        self.identity = identity
        self.binding = binding
        self.host = main.host
        self.expires = main.expires
        self.idle = main.idle_timeout
        self.seen = seen  # the latest activity this process knows of
        self.written = seen  # the last activity time written to the store
        self.refresh_at = main.refresh_at
        self.can_refresh = main.refresh_token is not None


class _Entry:
    """A cookie hash known to this process: which host it is for and which main it belongs to."""

    __slots__ = ("checked", "host", "kind", "main")

    def __init__(self, kind: Literal["main", "host"], main: str, host: str, checked: float):
        self.kind = kind
        self.main = main
        self.host = host
        self.checked = checked


class SessionManager:
    """Creates, finds and ends sessions; one per process, on a store shared by all of them.

    `public_host` is the authority of the gateway's public URL, where main sessions live.
    `lookup` is the hot path: with a warm cache it is two dict lookups and never suspends.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        public_host: str,
        lifetime: float,
        idle_timeout: float,
        touch_interval: float = 60.0,
        recheck_interval: float = 30.0,
        refresh_interval: float = 900.0,
        refresher: Refresher | None = None,
        cache_size: int = 100_000,
        refresh_lock_ttl: float = REFRESH_LOCK_TTL,
    ) -> None:
        if lifetime <= 0 or idle_timeout <= 0 or cache_size < 1:
            raise ValueError("lifetime, idle_timeout and cache_size must be positive")
        self._store = store
        self._public_host = public_host
        self._lifetime = lifetime
        self._idle_timeout = idle_timeout
        self._touch_interval = touch_interval
        self._recheck = recheck_interval
        self._refresh_interval = refresh_interval
        self._refresher = refresher
        self._refresh_lock_ttl = refresh_lock_ttl
        self._cache_size = cache_size
        self._entries: dict[str, _Entry] = {}
        self._mains: dict[str, _MainState] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[RevokedListener] = []

    @property
    def public_host(self) -> str:
        return self._public_host

    @property
    def lifetime(self) -> float:
        return self._lifetime

    # -- creating ---------------------------------------------------------------------------

    async def create_main(self, login: LoginFacts, provider: str, now: float) -> tuple[str, str]:
        """A new main session for a completed login: (cookie id, main hash).

        Always a new random id (no session fixation: nothing the browser sent is reused).
        """
        cookie_id = new_session_id()
        main_hash = session_hash(cookie_id)
        can_refresh = self._refresher is not None and login.refresh_token is not None
        main = MainSession(
            hash=main_hash,
            provider=provider,
            issuer=login.issuer,
            subject=login.subject,
            email=login.email,
            email_verified=login.email_verified,
            name=login.name,
            groups=tuple(sorted(login.groups)),
            groups_overage=login.groups_overage,
            amr=tuple(sorted(login.amr)),
            acr=login.acr,
            idp_sid=login.sid,
            host=self._public_host,
            created=now,
            expires=now + self._lifetime,
            idle_timeout=self._idle_timeout,
            last_seen=now,
            refresh_token=login.refresh_token,
            id_token=login.id_token,
            refresh_at=now + self._refresh_interval if can_refresh else None,
            claims=_kept_claims(login),
        )
        ttl = self._lifetime
        await self._store.put(SESSION_NS, main_hash, main.to_json(), ttl)
        await self._store.put(SEEN_NS, main_hash, _seen_bytes(now), ttl)
        for index in _indexes(main):
            await self._store.index_add(index, main_hash, ttl)
        self._remember(main_hash, _Entry("main", main_hash, main.host, now), main, now)
        return cookie_id, main_hash

    async def create_host(self, main_hash: str, host: str, now: float) -> str | None:
        """A host session for `host` under a live main session: the cookie id, or None when the
        main session has ended (its host session then never exists)."""
        main = await self.get_main(main_hash)
        if main is None or now >= main.expires:
            return None
        cookie_id = new_session_id()
        record = HostSession(session_hash(cookie_id), main_hash, host, now, main.expires)
        ttl = main.expires - now
        await self._store.put(SESSION_NS, record.hash, record.to_json(), ttl)
        await self._store.index_add(f"children:{main_hash}", record.hash, ttl)
        return cookie_id

    async def end_host(self, cookie_id: str) -> None:
        """Forget one host session (replaced by a new hand-off); its main session lives on."""
        key = session_hash(cookie_id)
        record = await self._get_record(key)
        if isinstance(record, HostSession):
            await self._store.delete(SESSION_NS, key)
            await self._store.index_remove(f"children:{record.parent}", key)
        self._entries.pop(key, None)

    # -- reading ----------------------------------------------------------------------------

    async def _get_record(self, key_hash: str) -> MainSession | HostSession | None:
        raw = await self._store.get(SESSION_NS, key_hash)
        return None if raw is None else parse_record(key_hash, raw)

    async def get_main(self, main_hash: str) -> MainSession | None:
        """The stored main session (None when absent, ended or not a main record)."""
        record = await self._get_record(main_hash)
        return record if isinstance(record, MainSession) else None

    async def _read_seen(self, main_hash: str) -> float:
        raw = await self._store.get(SEEN_NS, main_hash)
        try:
            return float(raw) if raw is not None else 0.0
        except ValueError:
            return 0.0

    def _remember(
        self,
        key: str,
        entry: _Entry,
        main: MainSession,
        seen: float,
        binding: DeviceBinding | None = None,
    ) -> None:
        if key not in self._entries and len(self._entries) >= self._cache_size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        state = self._mains.get(main.hash)
        fresh = _MainState(main, max(seen, main.last_seen), binding)
        if state is not None:
            # Keep what this process knows better than the store: later activity, and a local
            # refresh back-off.
            fresh.seen = max(fresh.seen, state.seen)
            fresh.written = max(fresh.written, state.written)
            if state.refresh_at is not None and fresh.refresh_at is not None:
                fresh.refresh_at = max(fresh.refresh_at, state.refresh_at)
        elif len(self._mains) >= self._cache_size:
            self._mains.pop(next(iter(self._mains)))
        self._mains[main.hash] = fresh

    async def _load(self, key: str, now: float) -> tuple[_Entry, _MainState] | None:
        """Read a cookie's record (and its parent) from the store into the cache."""
        record = await self._get_record(key)
        if record is None:
            self._entries.pop(key, None)
            return None
        if isinstance(record, HostSession):
            main = await self.get_main(record.parent)
            if main is None:
                self._entries.pop(key, None)
                return None
            entry = _Entry("host", main.hash, record.host, now)
        else:
            main = record
            entry = _Entry("main", main.hash, main.host, now)
        seen = await self._read_seen(main.hash)
        binding = parse_binding(await self._store.get(DEVICE_NS, main.hash))
        self._remember(key, entry, main, seen, binding)
        return entry, self._mains[main.hash]

    async def lookup(self, cookie_id: str, host: str, now: float) -> Identity | None:
        """The identity of a session cookie presented at `host` (canonical authority), or None.

        Checks: the record exists, belongs to this host (a host session only on its own host; a
        main session only on the public URL), the absolute lifetime and the idle timeout.
        """
        if not cookie_id or len(cookie_id) > MAX_COOKIE_ID_LENGTH:
            return None
        key = hashlib.sha256(cookie_id.encode()).hexdigest()
        entry = self._entries.get(key)
        state = None
        if entry is not None and now - entry.checked < self._recheck:
            state = self._mains.get(entry.main)
        if entry is None or state is None:
            # A miss, a stale entry (re-checked every recheck_interval so a lost feed message
            # cannot keep a revoked session alive), or its main was dropped by the feed.
            loaded = await self._load(key, now)
            if loaded is None:
                return None
            entry, state = loaded
        if entry.host != host:
            # A cookie replayed on another host (or a main cookie off the public URL).
            return None
        main_hash = entry.main
        if now >= state.expires:
            await self.revoke(main_hash, "expired")
            return None
        if now - state.seen > state.idle:
            # Another worker or replica may have seen activity this process has not: re-read.
            state.seen = max(state.seen, await self._read_seen(main_hash))
            if now - state.seen > state.idle:
                await self.revoke(main_hash, "idle")
                return None
        state.seen = max(state.seen, now)
        if now - state.written >= self._touch_interval:
            state.written = now
            self._spawn(self._touch(main_hash, now, state.expires))
        if (
            state.can_refresh
            and state.refresh_at is not None
            and now >= state.refresh_at
            and main_hash not in self._refreshing
        ):
            # One refresh per session in this process; the store lock covers the others. The
            # request that noticed goes on with the current session: nobody waits for the IdP.
            self._refreshing.add(main_hash)
            self._spawn(self._refresh(main_hash, now))
        return state.identity

    def device_binding(self, main_hash: str) -> DeviceBinding | None:
        """The device bound to a session this process has just looked up (O(1), no I/O)."""
        state = self._mains.get(main_hash)
        return state.binding if state is not None else None

    async def bind_device(self, main_hash: str, device_id: str, now: float) -> bool:
        """Bind a device to a live main session (and so to its host sessions), for every worker
        and replica; False when the session has ended.

        The binding has its own key (like activity) so it never races a refresh's rewrite of the
        record; the "updated" feed message makes every cache reload it.
        """
        main = await self.get_main(main_hash)
        if main is None or now >= main.expires:
            return False
        value = json.dumps({"device": device_id, "at": now}, separators=(",", ":")).encode()
        await self._store.put(DEVICE_NS, main_hash, value, main.expires - now)
        if await self._store.get(TOMBSTONE_NS, main_hash) is not None:
            # Revoked meanwhile: the binding must not outlive the session.
            await self._store.delete(DEVICE_NS, main_hash)
            return False
        self._mains.pop(main_hash, None)
        await self._store.publish(REVOCATIONS, f"updated:{main_hash}")
        return True

    # -- background work --------------------------------------------------------------------

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background writes and refreshes (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _touch(self, main_hash: str, now: float, expires: float) -> None:
        """Write the last activity time, off the request path; errors are logged, not raised.

        Activity has its own key so this blind write never races a refresh's update of the
        record (no lost update, no read-modify-write).
        """
        try:
            if expires - now > 0:
                await self._store.put(SEEN_NS, main_hash, _seen_bytes(now), expires - now)
        except Exception:
            log.warning("could not record session activity for %s…", main_hash[:12], exc_info=True)

    async def _refresh(self, main_hash: str, now: float) -> None:
        """Refresh the IdP tokens once for all workers and replicas (the store lock), then
        publish "updated" so every cache reloads the new groups and MFA facts."""
        try:
            async with self._store.lock(f"refresh:{main_hash}", self._refresh_lock_ttl) as won:
                if won:
                    await self._refresh_locked(main_hash, now)
                else:
                    # Another worker has held it for the whole TTL (a hung IdP call?): not
                    # ours to do now; the next due lookup tries again.
                    self._back_off(main_hash, now)
        except Exception:
            log.exception("session refresh for %s… failed", main_hash[:12])
            self._back_off(main_hash, now)
        finally:
            self._refreshing.discard(main_hash)

    def _back_off(self, main_hash: str, now: float) -> None:
        state = self._mains.get(main_hash)
        if state is not None:
            state.refresh_at = now + min(REFRESH_RETRY_DELAY, self._refresh_interval)

    async def _refresh_failed(self, main_hash: str, exc: Exception, now: float) -> None:
        code = getattr(exc, "code", None)
        if code == REFRESH_REJECTED:
            # The IdP says the grant is gone (user disabled, consent withdrawn): end it now.
            log.info("the IdP rejected the refresh of %s…: session ended", main_hash[:12])
            await self.revoke(main_hash, "refresh-rejected")
            return
        # REFRESH_FAILED or anything unexpected: transient until proven otherwise.
        log.warning(
            "refresh of %s… failed (%s): kept, retried later",
            main_hash[:12],
            code or type(exc).__name__,
        )
        self._back_off(main_hash, now)

    async def _refresh_locked(self, main_hash: str, now: float) -> None:
        main = await self.get_main(main_hash)
        if main is None or main.refresh_token is None or self._refresher is None:
            return
        if main.refresh_at is None or main.refresh_at > now:
            # Another worker refreshed while we waited for the lock: just reload.
            self._mains.pop(main_hash, None)
            return
        try:
            login = await self._refresher(main)
        except Exception as exc:
            await self._refresh_failed(main_hash, exc, now)
            return
        if (login.issuer, login.subject) != (main.issuer, main.subject):
            # A refresh must never turn one user's session into another's.
            log.error("refresh of %s… answered for another subject: ended", main_hash[:12])
            await self.revoke(main_hash, "refresh-subject-mismatch")
            return
        updated = replace(
            main,
            email=login.email or main.email,
            email_verified=login.email_verified if login.email else main.email_verified,
            name=login.name or main.name,
            groups=tuple(sorted(login.groups)),
            groups_overage=login.groups_overage,
            amr=tuple(sorted(login.amr)) or main.amr,
            acr=login.acr or main.acr,
            refresh_token=login.refresh_token or main.refresh_token,
            id_token=login.id_token or main.id_token,
            refresh_at=now + self._refresh_interval,
            claims=_kept_claims(login) or main.claims,
        )
        ttl = main.expires - now
        if ttl <= 0:
            return
        await self._store.put(SESSION_NS, main_hash, updated.to_json(), ttl)
        if await self._store.get(TOMBSTONE_NS, main_hash) is not None:
            # Revoked while we refreshed: our write must not bring the session back.
            await self._store.delete(SESSION_NS, main_hash)
            return
        self._mains.pop(main_hash, None)
        await self._store.publish(REVOCATIONS, f"updated:{main_hash}")

    # -- ending -----------------------------------------------------------------------------

    def on_revoked(self, callback: RevokedListener) -> None:
        """Call `callback(main hashes)` whenever the feed reports ended sessions (any replica)."""
        self._listeners.append(callback)

    def _drop(self, main_hash: str) -> None:
        self._mains.pop(main_hash, None)
        self._entries.pop(main_hash, None)

    async def revoke(self, main_hash: str, reason: str) -> bool:
        """End a main session and every host session under it, everywhere; True if it existed."""
        main = await self.get_main(main_hash)
        # The tombstone first: a refresh writing concurrently sees it and deletes its write.
        await self._store.put(TOMBSTONE_NS, main_hash, b"1", self._lifetime)
        children = f"children:{main_hash}"
        for child in await self._store.index_members(children):
            await self._store.delete(SESSION_NS, child)
            await self._store.index_remove(children, child)
            self._entries.pop(child, None)
        await self._store.delete(SESSION_NS, main_hash)
        await self._store.delete(SEEN_NS, main_hash)
        await self._store.delete(DEVICE_NS, main_hash)
        if main is not None:
            for index in _indexes(main):
                await self._store.index_remove(index, main_hash)
        self._drop(main_hash)
        await self._store.publish(REVOCATIONS, f"revoked:{main_hash}")
        log.info("session %s… ended: %s", main_hash[:12], reason)
        return main is not None

    async def _revoke_index(self, index: str, reason: str) -> int:
        count = 0
        for member in await self._store.index_members(index):
            if await self.revoke(member, reason):
                count += 1
            await self._store.index_remove(index, member)
        return count

    async def revoke_user(self, issuer: str, subject: str) -> int:
        """End every session of the user (issuer, subject); the number ended."""
        return await self._revoke_index(f"user:{issuer}|{subject}", "user revoked")

    async def revoke_email(self, email: str) -> int:
        """End every session whose login carried this e-mail address (any provider)."""
        return await self._revoke_index(f"email:{email.strip().lower()}", "e-mail revoked")

    async def revoke_idp_sid(self, issuer: str, sid: str) -> int:
        """End the sessions of one IdP session (`sid`), as back-channel logout asks."""
        return await self._revoke_index(f"idpsid:{issuer}|{sid}", "IdP session ended")

    async def list_sessions(self) -> list[SessionSummary]:
        """Every live main session with the hosts it was handed to, oldest first."""
        mains: list[MainSession] = []
        hosts: dict[str, list[str]] = {}
        async for key, raw in self._store.scan(SESSION_NS):
            record = parse_record(key, raw)
            if isinstance(record, MainSession):
                mains.append(record)
            elif isinstance(record, HostSession):
                hosts.setdefault(record.parent, []).append(record.host)
        summaries = []
        for main in mains:
            seen = max(main.last_seen, await self._read_seen(main.hash))
            summaries.append(
                SessionSummary(
                    main.hash,
                    main.provider,
                    main.issuer,
                    main.subject,
                    main.email,
                    main.name,
                    main.created,
                    main.expires,
                    seen,
                    tuple(sorted(hosts.get(main.hash, ()))),
                )
            )
        summaries.sort(key=lambda s: (s.created, s.hash))
        return summaries

    # -- the feed ---------------------------------------------------------------------------

    def apply_feed(self, messages: list[str]) -> frozenset[str]:
        """Drop cached sessions the messages name; tell listeners which ones ended."""
        revoked: set[str] = set()
        for message in messages:
            kind, _, main_hash = message.partition(":")
            if kind == "revoked":
                self._drop(main_hash)
                revoked.add(main_hash)
            elif kind == "updated":
                self._mains.pop(main_hash, None)  # reloaded from the store on the next lookup
        ended = frozenset(revoked)
        if ended:
            for listener in self._listeners:
                try:
                    listener(ended)
                except Exception:
                    log.exception("a revocation listener failed")
        return ended

    async def run_feed(
        self, stop: asyncio.Event, poll_interval: float = FEED_POLL_INTERVAL
    ) -> None:
        """Follow the revocation feed until `stop` is set (one task per process)."""
        cursor: str | None = None
        failing = False
        while not stop.is_set():
            try:
                messages, cursor = await self._store.read_since(REVOCATIONS, cursor)
                self.apply_feed(messages)
                if failing:
                    log.warning("the revocation feed can be read again")
                    failing = False
            except Exception:
                # The recheck interval still bounds how long a missed revocation can last. Once
                # per outage, not twice a second.
                if not failing:
                    log.warning(
                        "could not read the revocation feed: a cached session is honoured at "
                        "most %g s after its last check with the store",
                        self._recheck,
                        exc_info=True,
                    )
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_interval)


# JWT plumbing and facts the session already keeps in their own fields: not policy claims.
_PLUMBING_CLAIMS = frozenset(
    {
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "nonce",
        "at_hash",
        "c_hash",
        "s_hash",
        "azp",
        "auth_time",
        "sid",
        "email",
        "email_verified",
        "name",
        "amr",
        "acr",
    }
)
MAX_CLAIMS_BYTES = 16 * 1024


def _kept_claims(login: LoginFacts) -> dict[str, object]:
    """The login's ID token claims worth keeping (oidc.OidcLogin.claims), JSON-safe and small:
    a token of huge claims keeps only its scalar ones rather than bloating every lookup."""
    claims = getattr(login, "claims", None)
    if not isinstance(claims, Mapping):
        return {}
    kept: dict[str, object] = {
        str(k): v
        for k, v in claims.items()
        if k not in _PLUMBING_CLAIMS and isinstance(v, str | int | float | bool | list | dict)
    }
    try:
        size = len(json.dumps(kept))
    except (TypeError, ValueError):
        size = MAX_CLAIMS_BYTES + 1
    if size > MAX_CLAIMS_BYTES:
        kept = {k: v for k, v in kept.items() if isinstance(v, str | int | float | bool)}
        kept = {k: v for k, v in kept.items() if not isinstance(v, str) or len(v) <= 256}
    return kept


def _claims(value: object) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Malformed("claims")
    return value


def _seen_bytes(now: float) -> bytes:
    return repr(float(now)).encode()


def _indexes(main: MainSession) -> list[str]:
    indexes = [f"user:{main.issuer}|{main.subject}"]
    if main.email:
        indexes.append(f"email:{main.email.strip().lower()}")
    if main.idp_sid:
        indexes.append(f"idpsid:{main.issuer}|{main.idp_sid}")
    return indexes
