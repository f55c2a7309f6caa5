"""The login, hand-off and logout endpoints under /.tabiji/ (Starlette), the Pomerium model:
log in once at the public URL P, then hand each route host H its own host-only session through
a single-use, 60-second code bound to the browser that asked for it.

Must not import gateway.settings or authlib (the OIDC client is reached through ProviderLike).
Flows (P = the public URL's origin, H = a route host; P may equal H):
  H/.tabiji/login?rd=/x → H binding cookie, `handoff-req` → P/.tabiji/authorize?req=R
  P/.tabiji/authorize   → P session? mint code → H/.tabiji/handoff?code=C
                        : chooser page (several providers) or → P/.tabiji/oidc/start
  P/.tabiji/oidc/start  → P binding cookie, `login` by state → the provider
  P/.tabiji/oidc/callback → take `login`, check P binding, finish(), P session → hand-off
  H/.tabiji/handoff     → take code (host = H, H binding matches) → H session → /x
The hand-off code never reaches an upstream (/.tabiji/ is never forwarded), is sent with
Referrer-Policy: no-referrer, is taken by the first request that presents it, and is bound to
the H binding cookie of the browser that started at H: a code minted for a request someone else
prepared ends up burnt in the victim's browser, never usable by the one who prepared it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.identity.csrf import Csrf
from gateway.identity.model import Identity
from gateway.identity.resolve import (
    login_cookie_name,
    session_cookie_name,
    single_cookie,
)
from gateway.identity.returnto import safe_return_path
from gateway.identity.sessions import (
    BCL_JTI_NS,
    HANDOFF_NS,
    HANDOFF_REQ_NS,
    LOGIN_NS,
    LoginFacts,
    MainSession,
    SessionManager,
    new_session_id,
)
from gateway.pages import Pages, wants_json
from gateway.routing import canonical_authority
from gateway.state.base import StateStore, StateUnavailable
from gateway.web.endpoint_audit import Audit, audit_action
from gateway.web.forms import posted_by_own_page, read_form
from gateway.web.responses import error_page, for_forms, redirect, respond
from gateway.web.where import Where, where_of

log = logging.getLogger("tabiji.identity")

LOGIN_TTL = 600.0  # the `login` and `handoff-req` values and the binding cookies
HANDOFF_TTL = 60.0  # the hand-off code
MAX_FORM_BYTES = 16 * 1024
JST = timezone(timedelta(hours=9), "JST")
LOGGED_OUT_PATH = "/.tabiji/logged-out"
SIGNED_IN_PATH = "/.tabiji/"

# -- what we need from the OIDC client (gateway/identity/oidc.py has these) ----------------------


class LoginStartLike(Protocol):
    @property
    def authorization_url(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def nonce(self) -> str: ...
    @property
    def code_verifier(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """The stored half of a login start, handed back to `finish` (oidc.LoginExpectation)."""

    state: str
    nonce: str
    code_verifier: str


class LogoutTokenLike(Protocol):
    @property
    def issuer(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def sid(self) -> str | None: ...
    @property
    def jti(self) -> str: ...
    @property
    def expires_at(self) -> float: ...


class ProviderLike(Protocol):
    """One configured OpenID Provider (oidc.OidcProvider)."""

    @property
    def name(self) -> str: ...

    async def begin(self, now: float) -> LoginStartLike: ...

    async def finish(self, params: Mapping[str, str], expected: PendingLogin) -> LoginFacts: ...

    def end_session_url(
        self, id_token: str | None, post_logout_redirect_uri: str, state: str | None = None
    ) -> str | None: ...

    async def verify_logout_token(self, token: str) -> LogoutTokenLike: ...


class RateLimiterLike(Protocol):
    """gateway.state.ratelimit.RateLimiter."""

    def allow(self, key: str, now: float) -> bool: ...

    def retry_after(self, key: str, now: float) -> float: ...


# (route name, the providers it allows; empty = every provider) for a host and path, or None
RouteFor = Callable[[str, str], tuple[str, tuple[str, ...]] | None]
Endpoint = Callable[[Request], Awaitable[Response]]
# While the state store cannot answer, no login step can be done safely (state, PKCE verifier,
# hand-off code and the session itself live there): a page that says so, never a bare 500.
STORE_DOWN_RETRY_AFTER = b"10"


def login_url(host_origin: str, return_path: str) -> str:
    """Where to send a person without a session: the login endpoint of the host they asked,
    which comes back to `return_path` afterwards (the pipeline's 302 and its 401 JSON body)."""
    return f"{host_origin}/.tabiji/login?rd={quote(return_path, safe='')}"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _dumps(data: Mapping[str, object]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _loads(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class _Refused(Exception):
    """Stop the flow with an error page (or JSON) of this status and code."""

    def __init__(self, status: int, *, code: str, audit: str | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.audit = audit


def _cookie(name: str, value: str, *, https: bool, max_age: int | None = None) -> bytes:
    """A Set-Cookie value: host-only (no Domain), Path=/, HttpOnly, SameSite=Lax, Secure on
    HTTPS (which the __Host- prefix requires). Lax: the IdP's redirect back to the callback and
    P's redirect to the hand-off are top-level GET navigations, which carry Lax cookies."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if https:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode()


class IdentityEndpoints:
    """The endpoints' shared state; `routes()` lists them for build_internal_app."""

    def __init__(
        self,
        *,
        sessions: SessionManager,
        providers: Mapping[str, ProviderLike],
        public_origin: str,
        route_for: RouteFor,
        store: StateStore,
        pages: Pages,
        csrf: Csrf,
        limiter: RateLimiterLike,
        audit: Audit | None = None,
        clock: Callable[[], float] = time.time,
        labels: Mapping[str, str] | None = None,
        display_timezone: tzinfo = JST,
    ) -> None:
        scheme, _, authority = public_origin.rstrip("/").partition("://")
        if scheme not in ("http", "https") or not authority:
            raise ValueError(f"public_origin must be http(s)://host[:port]: {public_origin!r}")
        if not providers:
            raise ValueError("at least one identity provider is needed")
        self.public_scheme = scheme
        self.public_authority = canonical_authority(authority, scheme)
        self.public_origin = f"{scheme}://{self.public_authority}"
        if sessions.public_host != self.public_authority:
            raise ValueError("the session manager's public_host is not public_origin's authority")
        self.sessions = sessions
        self.providers = providers
        self.route_for = route_for
        self.store = store
        self.pages = pages
        self.csrf = csrf
        self.limiter = limiter
        self.audit_hook = audit
        self.clock = clock
        self.labels = dict(labels or {})
        self.tz = display_timezone

    def routes(self) -> list[Route]:
        guard = self._store_guard
        return [
            Route("/.tabiji/", guard(self.signed_in, code="login-unavailable"), methods=["GET"]),
            Route("/.tabiji/login", guard(self.login, code="login-unavailable"), methods=["GET"]),
            Route(
                "/.tabiji/authorize",
                guard(self.authorize, code="login-unavailable"),
                methods=["GET"],
            ),
            Route(
                "/.tabiji/oidc/start", guard(self.start, code="login-unavailable"), methods=["GET"]
            ),
            Route(
                "/.tabiji/oidc/callback",
                guard(self.callback, code="login-unavailable"),
                methods=["GET"],
            ),
            Route(
                "/.tabiji/handoff", guard(self.handoff, code="login-unavailable"), methods=["GET"]
            ),
            Route(
                "/.tabiji/logout",
                guard(self.logout_confirm, code="logout-unavailable"),
                methods=["GET"],
            ),
            Route(
                "/.tabiji/logout", guard(self.logout, code="logout-unavailable"), methods=["POST"]
            ),
            Route(
                LOGGED_OUT_PATH, guard(self.logged_out, code="logout-unavailable"), methods=["GET"]
            ),
            Route(
                "/.tabiji/oidc/backchannel-logout/{provider}",
                guard(self.backchannel_logout, code=None),
                methods=["POST"],
            ),
        ]

    def _store_guard(self, endpoint: Endpoint, *, code: str | None) -> Endpoint:
        """`endpoint`, answering 503 with the page `code` (ja/en) while the state store is
        down; `code` None (the provider's back-channel call) gets a JSON 503 it may retry.

        Nothing was granted when the store failed: a login step that cannot store or take its
        single-use value stops there, and a logout that cannot end the session says so rather
        than pretending it did.
        """

        async def guarded(request: Request) -> Response:
            try:
                return await endpoint(request)
            except StateUnavailable as exc:
                log.warning("%s refused: state store unavailable: %s", request.url.path, exc)
                retry = [(b"retry-after", STORE_DOWN_RETRY_AFTER)]
                if code is None:
                    return respond(
                        503,
                        b'{"error":"temporarily_unavailable"}',
                        [
                            (b"content-type", b"application/json"),
                            (b"cache-control", b"no-store"),
                            *retry,
                        ],
                    )
                return self._error(request, where_of(request), 503, code=code, extra=retry)

        return guarded

    # -- plumbing -----------------------------------------------------------------------------

    def _audit(self, action: str, where: Where, request: Request, **fields: object) -> None:
        audit_action(self.audit_hook, action, request, where, **fields)

    def _error(
        self,
        request: Request,
        where: Where,
        status: int,
        *,
        code: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> Response:
        return error_page(
            self.pages, request, https=where.https, status=status, code=code, extra=extra
        )

    def _page(
        self,
        request: Request,
        where: Where,
        template: str,
        *,
        status: int = 200,
        form: bool = False,
        form_target: str | None = None,
        extra: Sequence[tuple[bytes, bytes]] = (),
        **context: Any,
    ) -> Response:
        language = self.pages.language(request.scope["headers"])
        headers, body = self.pages.render_page(
            template, language=language, https=where.https, extra_css="identity.css", **context
        )
        if form:
            headers = for_forms(headers)  # the form posts with its Origin
        if form_target is not None:
            # CSP form-action also governs where the POST's redirect may go (CSP3 §6.4.1): the
            # logout ends at the provider's end_session endpoint, so that origin is allowed too.
            allow = f"form-action 'self' {form_target}".encode()
            headers = [
                (
                    k,
                    v.replace(b"form-action 'self'", allow)
                    if k == b"content-security-policy"
                    else v,
                )
                for k, v in headers
            ]
        return respond(status, body, [*headers, *extra])

    def _logout_target(self, provider: str) -> str | None:
        """The origin of the provider's end_session endpoint, when logout will go there."""
        known = self.providers.get(provider)
        url = known.end_session_url(None, self.public_origin) if known is not None else None
        if not url:
            return None
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"

    def _redirect(
        self,
        where: Where,
        location: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
        status: int = 302,
    ) -> Response:
        return redirect(self.pages, location, https=where.https, status=status, extra=extra)

    def _limited(self, request: Request, where: Where, bucket: str) -> Response | None:
        """429 with Retry-After when this client spent its `bucket` tokens, else None."""
        key = f"{bucket}:{where.client_ip}"
        now = self.clock()
        if self.limiter.allow(key, now):
            return None
        retry = max(1, math.ceil(self.limiter.retry_after(key, now)))
        self._audit("rate-limited", where, request, bucket=bucket)
        retry_after = (b"retry-after", str(retry).encode())
        return self._error(request, where, 429, code="rate-limited", extra=[retry_after])

    def _binding(self, request: Request, where: Where) -> tuple[str, bytes]:
        """The browser's binding value (reused when it has one, so two tabs logging in at once
        both succeed) and the Set-Cookie that (re)sets it for 10 minutes."""
        name = login_cookie_name(where.https)
        value = single_cookie(request.scope["headers"], name) or new_session_id()
        return value, _cookie(name, value, https=where.https, max_age=int(LOGIN_TTL))

    def _binding_matches(self, request: Request, where: Where, expected: object) -> bool:
        value = single_cookie(request.scope["headers"], login_cookie_name(where.https))
        if value is None or not isinstance(expected, str):
            return False
        return secrets.compare_digest(_digest(value), expected)

    def _clear(self, name: str, where: Where) -> tuple[bytes, bytes]:
        return (b"set-cookie", _cookie(name, "", https=where.https, max_age=0))

    async def _session(self, request: Request, where: Where) -> tuple[str, Identity] | None:
        cookie = single_cookie(request.scope["headers"], session_cookie_name(where.https))
        if cookie is None:
            return None
        identity = await self.sessions.lookup(cookie, where.authority, self.clock())
        return None if identity is None else (cookie, identity)

    def _on_public(self, where: Where) -> bool:
        return where.authority == self.public_authority

    def _allowed(self, host: str, path: str) -> tuple[str, ...] | None:
        """The providers that may log in for (host, path); None when host is no route host."""
        found = self.route_for(host, path)
        if found is None:
            if host == self.public_authority:
                return tuple(self.providers)
            return None
        names = found[1] or tuple(self.providers)
        return tuple(n for n in names if n in self.providers)

    # -- endpoints ----------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """Start a login for this host: bind the browser, remember where to return, go to P."""
        where = where_of(request)
        if (limited := self._limited(request, where, "login")) is not None:
            return limited
        default = SIGNED_IN_PATH if self._on_public(where) else "/"
        path = safe_return_path(request.query_params.get("rd"), default)
        if self._allowed(where.authority, path) is None:
            return self._error(request, where, 400, code="login-host-unknown")
        if await self._session(request, where) is not None:
            return self._redirect(where, path)  # already signed in here: no loop
        binding, set_binding = self._binding(request, where)
        req_id = secrets.token_urlsafe(32)
        value = {
            "host": where.authority,
            "scheme": where.scheme,
            "path": path,
            "binding": _digest(binding),
        }
        await self.store.put(HANDOFF_REQ_NS, req_id, _dumps(value), LOGIN_TTL)
        target = f"{self.public_origin}/.tabiji/authorize?{urlencode({'req': req_id})}"
        return self._redirect(where, target, [(b"set-cookie", set_binding)])

    async def _request(self, req_id: str | None) -> dict[str, Any] | None:
        if not req_id or len(req_id) > 128:
            return None
        req = _loads(await self.store.get(HANDOFF_REQ_NS, req_id))
        if req is None or not all(isinstance(req.get(k), str) for k in ("host", "scheme", "path")):
            return None
        return req

    def _public_only(self, request: Request, where: Where, bucket: str) -> Response | None:
        """404 off the public URL (these steps happen only at P), 429 when rate-limited."""
        if not self._on_public(where):
            return self._error(request, where, 404, code="route-not-found")
        return self._limited(request, where, bucket)

    async def authorize(self, request: Request) -> Response:
        """At P: hand the existing P session to the host, or choose a provider and log in."""
        where = where_of(request)
        if (refused := self._public_only(request, where, "login")) is not None:
            return refused
        req_id = request.query_params.get("req")
        req = await self._request(req_id)
        if req_id is None or req is None:
            return self._error(request, where, 400, code="login-request-invalid")
        allowed = self._allowed(req["host"], req["path"])
        if not allowed:
            return self._error(request, where, 400, code="login-host-unknown")
        session = await self._session(request, where)
        if session is not None and session[1].provider in allowed:
            assert session[1].session_hash is not None  # a session identity always has one
            return await self._continue(where, req_id, session[1].session_hash)
        if len(allowed) > 1:
            choices = [
                {
                    "name": name,
                    "label": self.labels.get(name, name),
                    "href": "/.tabiji/oidc/start?" + urlencode({"provider": name, "req": req_id}),
                }
                for name in allowed
            ]
            return self._page(request, where, "login_choose.html", providers=choices)
        start = "/.tabiji/oidc/start?" + urlencode({"provider": allowed[0], "req": req_id})
        return self._redirect(where, start)

    async def start(self, request: Request) -> Response:
        """At P: begin the authorization code flow with one provider (state, nonce, PKCE)."""
        where = where_of(request)
        if (refused := self._public_only(request, where, "login")) is not None:
            return refused
        req_id = request.query_params.get("req")
        req = await self._request(req_id)
        if req_id is None or req is None:
            return self._error(request, where, 400, code="login-request-invalid")
        name = request.query_params.get("provider", "")
        allowed = self._allowed(req["host"], req["path"]) or ()
        provider = self.providers.get(name)
        if provider is None or name not in allowed:
            return self._error(request, where, 400, code="login-provider-unknown")
        try:
            begun = await provider.begin(self.clock())
        except Exception as exc:
            log.warning("login start at %s failed: %s", name, exc)
            return self._error(request, where, 502, code="login-provider-unavailable")
        binding, set_binding = self._binding(request, where)
        value = {
            "provider": name,
            "nonce": begun.nonce,
            "code_verifier": begun.code_verifier,
            "req": req_id,
            "binding": _digest(binding),
        }
        await self.store.put(LOGIN_NS, _digest(begun.state), _dumps(value), LOGIN_TTL)
        return self._redirect(where, begun.authorization_url, [(b"set-cookie", set_binding)])

    async def callback(self, request: Request) -> Response:
        """At P: the provider sends the browser back; verify everything, create the session."""
        where = where_of(request)
        if (refused := self._public_only(request, where, "callback")) is not None:
            return refused
        try:
            return await self._callback(request, where)
        except _Refused as failure:
            self._audit("login-failed", where, request, reason=failure.audit or failure.code)
            return self._error(request, where, failure.status, code=failure.code)

    async def _callback(self, request: Request, where: Where) -> Response:
        params: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            if key in params:
                # A repeated parameter (two `state`s, two `code`s) is ambiguous: refused.
                raise _Refused(400, code="login-state-invalid", audit="repeated-parameter")
            params[key] = value
        state = params.get("state")
        if not state or len(state) > 512:
            raise _Refused(400, code="login-state-invalid")
        # Taken, not read: a state works once (a replayed callback finds nothing), on any
        # worker or replica (RFC 6749 §10.12, OIDC Core §15.5.2).
        stored = _loads(await self.store.take(LOGIN_NS, _digest(state)))
        if stored is None:
            raise _Refused(400, code="login-state-invalid")
        # Login CSRF: the callback must come to the browser that started this login.
        if not self._binding_matches(request, where, stored.get("binding")):
            raise _Refused(400, code="login-binding-invalid")
        name = stored.get("provider")
        provider = self.providers.get(name) if isinstance(name, str) else None
        nonce, verifier = stored.get("nonce"), stored.get("code_verifier")
        if provider is None or not isinstance(nonce, str) or not isinstance(verifier, str):
            raise _Refused(400, code="login-state-invalid")
        # Mix-up defence: the response is checked by the provider the *state* names, never by
        # one the response claims (RFC 9207; the OIDC client also checks `iss`).
        try:
            login = await provider.finish(params, PendingLogin(state, nonce, verifier))
        except Exception as exc:
            code = getattr(exc, "code", None)
            log.info("login at %s failed: %s", name, exc)
            shown = code if isinstance(code, str) and code in self.pages.catalogue else None
            raise _Refused(400, code=shown or "login-failed", audit=code or "login-failed") from exc
        now = self.clock()
        old = await self._session(request, where)
        cookie_id, main_hash = await self.sessions.create_main(login, provider.name, now)
        if old is not None and old[1].session_hash is not None:
            # The browser had another session here: it is replaced, so end it everywhere.
            await self.sessions.revoke(old[1].session_hash, "replaced by a new login")
        self._audit(
            "login-ok",
            where,
            request,
            provider=provider.name,
            issuer=login.issuer,
            subject=login.subject,
            email=login.email,
            session=main_hash,
            amr=sorted(login.amr),
        )
        session_cookie = _cookie(session_cookie_name(where.https), cookie_id, https=where.https)
        cookies = [
            (b"set-cookie", session_cookie),
            self._clear(login_cookie_name(where.https), where),
        ]
        req_id = stored.get("req")
        req_id = req_id if isinstance(req_id, str) else None
        response = await self._continue(where, req_id, main_hash)
        response.raw_headers.extend(cookies)
        return response

    async def _continue(self, where: Where, req_id: str | None, main_hash: str) -> Response:
        """After a login (or with a live P session): back to P's page, or a hand-off to H."""
        req = _loads(await self.store.take(HANDOFF_REQ_NS, req_id)) if req_id else None
        if req is None or not all(isinstance(req.get(k), str) for k in ("host", "scheme", "path")):
            return self._redirect(where, SIGNED_IN_PATH)
        path = safe_return_path(req["path"])
        if req["host"] == self.public_authority:
            return self._redirect(where, path)
        code = secrets.token_urlsafe(32)
        value = {
            "main": main_hash,
            "host": req["host"],
            "path": path,
            "binding": req.get("binding"),
        }
        await self.store.put(HANDOFF_NS, _digest(code), _dumps(value), HANDOFF_TTL)
        target = f"{req['scheme']}://{req['host']}/.tabiji/handoff?{urlencode({'code': code})}"
        return self._redirect(where, target)

    async def handoff(self, request: Request) -> Response:
        """At H: redeem the single-use code for this host's own session."""
        where = where_of(request)
        if (limited := self._limited(request, where, "callback")) is not None:
            return limited
        code = request.query_params.get("code", "")
        stored = None
        if 0 < len(code) <= 128:
            stored = _loads(await self.store.take(HANDOFF_NS, _digest(code)))
        # The code is for one host only: presented anywhere else it is refused (and burnt).
        if stored is None or stored.get("host") != where.authority:
            self._audit("login-failed", where, request, reason="handoff-invalid")
            return self._error(request, where, 400, code="handoff-invalid")
        if not self._binding_matches(request, where, stored.get("binding")):
            self._audit("login-failed", where, request, reason="handoff-binding-invalid")
            return self._error(request, where, 400, code="login-binding-invalid")
        main_hash = stored.get("main")
        cookie_id = None
        if isinstance(main_hash, str):
            cookie_id = await self.sessions.create_host(main_hash, where.authority, self.clock())
        if cookie_id is None:
            return self._error(request, where, 400, code="handoff-invalid")
        previous = single_cookie(request.scope["headers"], session_cookie_name(where.https))
        if previous is not None:
            await self.sessions.end_host(previous)
        path = safe_return_path(stored.get("path") if isinstance(stored.get("path"), str) else None)
        return self._redirect(
            where,
            path,
            [
                (
                    b"set-cookie",
                    _cookie(session_cookie_name(where.https), cookie_id, https=where.https),
                ),
                self._clear(login_cookie_name(where.https), where),
            ],
        )

    async def signed_in(self, request: Request) -> Response:
        """Who am I: the signed-in page with a logout button; to login when not signed in."""
        where = where_of(request)
        session = await self._session(request, where)
        if session is None:
            return self._redirect(where, login_url(where.origin, SIGNED_IN_PATH))
        identity = session[1]
        assert identity.session_hash is not None  # a session identity always has one
        return self._page(
            request,
            where,
            "signed_in.html",
            form=True,
            form_target=self._logout_target(identity.provider),
            identity=identity,
            provider_label=self.labels.get(identity.provider, identity.provider),
            groups=sorted(identity.groups),
            mfa=sorted(identity.amr),
            expires=self._when(identity.expires_at),
            csrf=self.csrf.token(identity.session_hash, "logout"),
        )

    def _when(self, at: float) -> str:
        return datetime.fromtimestamp(at, UTC).astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z")

    async def logout_confirm(self, request: Request) -> Response:
        """GET: a confirmation page whose form posts the logout (a GET never logs out)."""
        where = where_of(request)
        session = await self._session(request, where)
        if session is None:
            return self._page(request, where, "logged_out.html")
        identity = session[1]
        assert identity.session_hash is not None  # a session identity always has one
        return self._page(
            request,
            where,
            "logout.html",
            form=True,
            form_target=self._logout_target(identity.provider),
            identity=identity,
            csrf=self.csrf.token(identity.session_hash, "logout"),
        )

    async def logout(self, request: Request) -> Response:
        """POST: end the session on every host, then log out at the provider when it can."""
        where = where_of(request)
        if (limited := self._limited(request, where, "logout")) is not None:
            return limited
        form = await read_form(request, MAX_FORM_BYTES)
        if form is None:
            return self._error(request, where, 403, code="csrf-invalid")
        cookie_name = session_cookie_name(where.https)
        session = await self._session(request, where)
        if session is None:
            # Nothing to end: only this browser's (dead) cookie is cleared.
            return self._redirect(where, LOGGED_OUT_PATH, [self._clear(cookie_name, where)], 303)
        identity = session[1]
        assert identity.session_hash is not None  # a session identity always has one
        if not posted_by_own_page(
            self.csrf, form, request, where, session_hash=identity.session_hash, purpose="logout"
        ):
            self._audit("logout-refused", where, request, reason="csrf-invalid")
            return self._error(request, where, 403, code="csrf-invalid")
        main = await self.sessions.get_main(identity.session_hash)
        await self.sessions.revoke(identity.session_hash, "logout")
        self._audit(
            "logout",
            where,
            request,
            provider=identity.provider,
            issuer=identity.issuer,
            subject=identity.subject,
            session=identity.session_hash,
        )
        location = self._end_session(main) or LOGGED_OUT_PATH
        return self._redirect(where, location, [self._clear(cookie_name, where)], 303)

    def _end_session(self, main: MainSession | None) -> str | None:
        if main is None:
            return None
        provider = self.providers.get(main.provider)
        if provider is None:
            return None
        try:
            return provider.end_session_url(main.id_token, self.public_origin + LOGGED_OUT_PATH)
        except Exception:
            log.warning("no end-session URL from %s", main.provider, exc_info=True)
            return None

    async def logged_out(self, request: Request) -> Response:
        """The page after logout (also the provider's post_logout_redirect_uri)."""
        where = where_of(request)
        extra: list[tuple[bytes, bytes]] = []
        # A leftover cookie of an ended session is cleared; a live session is not touched (a GET
        # from another site must not log anyone out).
        name = session_cookie_name(where.https)
        if single_cookie(request.scope["headers"], name) is not None and (
            await self._session(request, where) is None
        ):
            extra.append(self._clear(name, where))
        return self._page(request, where, "logged_out.html", extra=extra)

    async def backchannel_logout(self, request: Request) -> Response:
        """OIDC Back-Channel Logout 1.0 §2.5-2.8: the provider ends a user's sessions here."""
        where = where_of(request)
        name = request.path_params.get("provider", "")
        provider = self.providers.get(name)
        form = await read_form(request, MAX_FORM_BYTES)
        token = form.get("logout_token") if form is not None else None
        if not self._on_public(where) or provider is None or not token:
            return _bcl_error()
        try:
            logout = await provider.verify_logout_token(token)
        except Exception as exc:
            log.info("back-channel logout from %s refused: %s", name, exc)
            self._audit("backchannel-logout-refused", where, request, provider=name)
            return _bcl_error()
        # §2.6 step 9 (recommended): a logout token is used once.
        ttl = max(60.0, logout.expires_at - self.clock() + 60.0)
        if not await self.store.put_new(BCL_JTI_NS, f"{name}|{logout.jti}", b"1", ttl):
            self._audit(
                "backchannel-logout-refused", where, request, provider=name, reason="replay"
            )
            return _bcl_error()
        if logout.sid:
            ended = await self.sessions.revoke_idp_sid(logout.issuer, logout.sid)
        elif logout.subject:
            ended = await self.sessions.revoke_user(logout.issuer, logout.subject)
        else:  # verify_logout_token guarantees one of them (§2.4)
            return _bcl_error()
        self._audit(
            "backchannel-logout",
            where,
            request,
            provider=name,
            issuer=logout.issuer,
            subject=logout.subject,
            idp_sid=logout.sid,
            ended=ended,
        )
        # §2.8: 200 on success, and the response must not be cached.
        return respond(200, b"", [(b"cache-control", b"no-store")])


def _bcl_error() -> Response:
    """§2.8: 400 with an OAuth error body; never why (the provider learns nothing from it)."""
    return respond(
        400,
        b'{"error":"invalid_request"}',
        [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
    )


def identity_routes(
    *,
    sessions: SessionManager,
    providers: Mapping[str, ProviderLike],
    public_origin: str,
    route_for: RouteFor,
    store: StateStore,
    pages: Pages,
    csrf: Csrf,
    limiter: RateLimiterLike,
    audit: Audit | None = None,
    clock: Callable[[], float] = time.time,
    labels: Mapping[str, str] | None = None,
) -> list[Route]:
    """The identity endpoints for build_internal_app(extra_routes=…)."""
    return IdentityEndpoints(
        sessions=sessions,
        providers=providers,
        public_origin=public_origin,
        route_for=route_for,
        store=store,
        pages=pages,
        csrf=csrf,
        limiter=limiter,
        audit=audit,
        clock=clock,
        labels=labels,
    ).routes()


def oidc_refresher(providers: Mapping[str, Any]) -> Callable[[MainSession], Any]:
    """The SessionManager's refresher for oidc.OidcProvider instances: redeems the refresh token
    at the session's provider, passing the stored identity as `previous` so a provider that
    answers without an ID token keeps the identity (oidc.OidcProvider.refresh)."""
    from gateway.identity.oidc import OidcError, OidcLogin  # authlib only when wired

    async def refresh(main: MainSession) -> OidcLogin:
        provider = providers.get(main.provider)
        if provider is None or main.refresh_token is None:
            raise OidcError("oidc-refresh-rejected", f"provider {main.provider!r} is gone")
        previous = OidcLogin(
            provider=main.provider,
            issuer=main.issuer,
            subject=main.subject,
            email=main.email,
            email_verified=main.email_verified,
            name=main.name,
            groups=frozenset(main.groups),
            groups_overage=main.groups_overage,
            amr=main.amr,
            acr=main.acr,
            sid=main.idp_sid,
            id_token=main.id_token,
            refresh_token=main.refresh_token,
        )
        login: OidcLogin = await provider.refresh(main.refresh_token, previous)
        return login

    return refresh


if TYPE_CHECKING:
    from gateway.identity.oidc import OidcProvider
    from gateway.state.ratelimit import RateLimiter

    def _oidc_provider_fits(provider: OidcProvider) -> ProviderLike:
        """mypy checks here that the real OIDC client satisfies ProviderLike."""
        return provider

    def _rate_limiter_fits(limiter: RateLimiter) -> RateLimiterLike:
        return limiter


def wants_login_json(headers: Collection[tuple[bytes, bytes]]) -> bool:
    """A request that is not a top-level navigation gets 401 JSON with the login URL instead of
    a 302 to another origin (single-page apps, fetch, XHR): Sec-Fetch-Mode other than
    "navigate", Accept: application/json, or X-Requested-With."""
    for key, value in headers:
        if key == b"sec-fetch-mode" and value.strip().lower() != b"navigate":
            return True
    return wants_json(headers)
