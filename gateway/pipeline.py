"""The request pipeline, in order, in one place: peer → target → route → identity → device →
decide → forward, and an audit record of every decision.

Stages gather facts; only the decision allows; only this module turns a decision or an error into a
response, and any unexpected error means refusal (fail closed). Must not import gateway.settings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, replace
from time import perf_counter_ns, time
from typing import Any, Protocol
from urllib.parse import quote

from gateway.context import DeviceContext, Peer, RequestContext
from gateway.decide import Verdict
from gateway.devices.stage import (
    NO_DEVICE,
    NOTE_REGISTRY_STALE,
    DeviceCheck,
    DeviceCheckRequired,
    DeviceRefused,
)
from gateway.errors import (
    AccessDenied,
    AuditUnavailable,
    BadRequestTarget,
    GatewayError,
    LoginRequired,
    UnknownHost,
)
from gateway.forward import ClientDisconnected, Forwarder, ForwardResult, ResponseAborted
from gateway.headers import new_request_id, upstream_request_headers
from gateway.identity.model import Identity
from gateway.identity.resolve import IdentityRejected
from gateway.observability import AccessLog, request_id_var
from gateway.pages import Pages, header_value, wants_json
from gateway.peer import TrustedProxies, resolve_peer
from gateway.routing import Route, RouteTable, canonical_authority
from gateway.target import Target, normalise_target

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RESERVED_PREFIX = "/.tabiji"
DEVICE_CHECK_PATH = RESERVED_PREFIX + "/device/check"
_UNENROLLED = "device-unenrolled"
log = logging.getLogger("tabiji.pipeline")


class Decider(Protocol):
    """Turns the gathered facts into a verdict (gateway.decide: the policy engine)."""

    def decide(self, ctx: RequestContext) -> Verdict: ...


class IdentityStage(Protocol):
    """Who is asking: a bearer token or the session cookie (gateway.identity.resolve)."""

    async def resolve(
        self, headers: list[tuple[bytes, bytes]], authority: str, https: bool, now: float
    ) -> Identity | None: ...


class DeviceStage(Protocol):
    """Which enrolled device the request comes from (gateway.devices.stage)."""

    @property
    def dropped_headers(self) -> frozenset[bytes]: ...

    async def check(
        self,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        peer: Peer,
        target: Target,
        method: str,
        identity: Identity | None,
        now: float,
    ) -> DeviceCheck: ...

    async def recheck(
        self, check: DeviceCheck, *, identity: Identity | None, now: float
    ) -> DeviceCheck | None: ...


class AssertionStage(Protocol):
    """The signed identity assertion (and optional plain headers) for the upstream."""

    def upstream_headers(
        self, identity: Identity, route: Route, now: float, device: DeviceContext | None = None
    ) -> Sequence[tuple[str, str]]: ...


class AuditTrail(Protocol):
    """Where every decision is recorded (gateway.audit): batched, or durable before release."""

    durable: bool

    def healthy(self) -> bool: ...

    def record(self, outcome: Outcome) -> None: ...

    async def record_durable(self, outcome: Outcome) -> None: ...


class StageClock(Protocol):
    """Accumulates time per pipeline stage (exported for the bench)."""

    def add(self, stage: str, ns: int) -> None: ...


class RequestMetrics(Protocol):
    """Counts requests by route, status and decision."""

    def request_started(self) -> None: ...

    def request_finished(
        self, route: str, status: int, decision: str, upstream_seconds: float | None
    ) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What the audit trail, access log and metrics need of a request (mutable while it runs)."""

    started: float  # unix seconds when the request arrived
    started_ns: int  # perf_counter_ns at arrival, for the latency
    request_id: str = "-"
    route: str = "-"
    status: int = 0
    decision: str = "error"
    code: str = ""
    policy_hash: str = "-"
    rule: str | None = None
    reasons: tuple[str, ...] = ()
    result: ForwardResult | None = None
    ctx: RequestContext | None = None  # set once the request is routed
    peer: Peer | None = None
    country: str | None = None
    finished_ns: int = 0
    method: str = ""  # from the request line, kept for refusals made before routing
    target: Target | None = None
    client_ip: str = ""  # the socket's peer, until a Peer is resolved
    device_id: str | None = None  # the device a refused proof or certificate named
    notes: tuple[str, ...] = ()  # audit-only causes beside a refusal's reasons (device stage)


_DENIALS = (AccessDenied, LoginRequired, IdentityRejected, DeviceCheckRequired)


def _is_navigation(headers: list[tuple[bytes, bytes]]) -> bool:
    """A browser's top-level navigation (never a fetch, a program or a single-page app's call)."""
    fetch_mode = header_value(headers, b"sec-fetch-mode")
    return (fetch_mode is None or fetch_mode == b"navigate") and not wants_json(headers)


def _record_refusal(outcome: Outcome, error: GatewayError) -> tuple[str, ...]:
    """Note a refusal in the outcome; returns its reason codes (policy reasons for a deny)."""
    reasons: tuple[str, ...] = getattr(error, "reasons", ())
    if isinstance(error, IdentityRejected):
        # Its code is the precise reason (token-expired…): on record, and the page's title.
        outcome.reasons = (error.code,)
    elif isinstance(error, DeviceRefused):
        # The reason a person sees, then the precise cause (proof-wrong-url…) for the record.
        outcome.reasons = (*reasons, *error.notes)
    else:
        notes = tuple(note for note in outcome.notes if note not in reasons)
        outcome.reasons = (*reasons, *notes) if reasons and notes else reasons
    outcome.status, outcome.code = error.status, error.code
    outcome.decision = "deny" if isinstance(error, _DENIALS) else "error"
    if outcome.request_id == "-":
        outcome.request_id = new_request_id([], False)
    return reasons


class Pipeline:
    """Handles every HTTP and WebSocket request that is not the gateway's own endpoint."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        trusted_proxies: TrustedProxies,
        decider: Decider,
        forwarder: Forwarder,
        pages: Pages,
        internal_app: ASGIApp,
        stages: StageClock,
        metrics: RequestMetrics,
        access_log: AccessLog | None,
        identity: IdentityStage | None = None,
        assertions: AssertionStage | None = None,
        audit: AuditTrail | None = None,
        devices: DeviceStage | None = None,
    ) -> None:
        self.routes = routes
        self.identity = identity
        self.devices = devices
        self._dropped = devices.dropped_headers if devices is not None else frozenset()
        self.assertions = assertions
        self.audit = audit
        self.trusted_proxies = trusted_proxies
        self.decider = decider
        self.forwarder = forwarder
        self.pages = pages
        self.internal_app = internal_app
        self.stages = stages
        self.metrics = metrics
        self.access_log = access_log

    # -- the stages, each a small synchronous step --------------------------------------------

    def _peer(self, scope: Scope) -> Peer:
        client = scope.get("client")
        client_ip = client[0] if client else "0.0.0.0"  # noqa: S104 — a unix socket has no peer IP
        return resolve_peer(client_ip, scope["scheme"], scope["headers"], self.trusted_proxies)

    @staticmethod
    def _target(scope: Scope, peer: Peer) -> Target:
        raw = scope.get("extensions", {}).get("tabiji.raw_target")
        if raw is None:
            query = scope.get("query_string", b"")
            raw = scope.get("raw_path", b"/") + (b"?" + query if query else b"")
        target = normalise_target(raw)
        # RFC 9112 §3.2.2: an absolute-form target names the authority; it must agree with Host.
        if target.authority is not None and (
            canonical_authority(target.authority, peer.scheme) != peer.authority
        ):
            raise BadRequestTarget(
                "absolute-form authority differs from Host", code="target-authority-mismatch"
            )
        return target

    def _route(self, peer: Peer, target: Target) -> Route:
        route = self.routes.match(peer.authority, target.path)
        if route is None:
            raise UnknownHost(f"no route for {peer.authority}{target.path}")
        return route

    async def _identify(
        self, scope: Scope, route: Route, peer: Peer, https: bool, now: float
    ) -> Identity | None:
        # A public route never looks at credentials: nothing to verify, nothing to leak.
        if route.public or self.identity is None:
            return None
        return await self.identity.resolve(scope["headers"], peer.authority, https, now)

    def _check_audit(self) -> None:
        audit = self.audit
        if audit is not None and not audit.healthy():
            # audit.fail_closed: with no durable record possible, nothing is served.
            raise AuditUnavailable("audit records cannot be written")

    @staticmethod
    def _login_or_deny(
        ctx: RequestContext,
        verdict: Verdict,
        check: DeviceCheck,
        headers: list[tuple[bytes, bytes]],
    ) -> GatewayError:
        """A refusal; a request nobody signed in for is sent to log in instead (if it can be),
        and a browser whose session has no (fresh) device binding to the device check."""
        target = ctx.target
        back = target.path + ("?" + target.query if target.query else "")
        reasons = verdict.reasons
        if ctx.identity is None and "user-unauthenticated" in reasons:
            origin = f"{ctx.peer.scheme}://{ctx.peer.authority}"
            return LoginRequired(f"{origin}/.tabiji/login?rd={quote(back, safe='')}")
        if _UNENROLLED in reasons:
            if NOTE_REGISTRY_STALE in check.notes:
                # Not the device's fault: the gateway could not tell (and must not send the
                # browser to attest a device it could not look up either).
                reasons = tuple(
                    "device-registry-stale" if reason == _UNENROLLED else reason
                    for reason in reasons
                )
            elif check.binding_needed and ctx.identity is not None and _is_navigation(headers):
                # Relative (RFC 9110 §10.2.2): the device check on this same host, never an
                # origin taken from the Host header.
                return DeviceCheckRequired(
                    f"{DEVICE_CHECK_PATH}?rd={quote(back, safe='')}", reasons
                )
        return AccessDenied(reasons)

    async def _assert_identity(
        self, ctx: RequestContext, outcome: Outcome, now: float
    ) -> Sequence[tuple[str, str]]:
        """The gateway's own upstream headers; a durable audit record lands before forwarding."""
        if self.audit is not None and self.audit.durable:
            await self.audit.record_durable(outcome)
        identity = ctx.identity
        if identity is None or self.assertions is None:
            return ()
        return self.assertions.upstream_headers(identity, ctx.route, now, ctx.device)

    async def _admit(
        self,
        scope: Scope,
        peer: Peer,
        target: Target,
        outcome: Outcome,
        *,
        https: bool,
        t1: int,
        websocket: bool = False,
    ) -> tuple[RequestContext, list[tuple[str, str]]]:
        """Route, identify, decide: the request's context and upstream headers, or a refusal."""
        stages = self.stages
        self._check_audit()
        route = self._route(peer, target)
        outcome.route = route.name
        t2 = perf_counter_ns()
        now = outcome.started
        method = scope.get("method", "GET")
        headers = scope["headers"]
        identity = await self._identify(scope, route, peer, https, now)
        t3 = perf_counter_ns()
        check = await self._device(headers, route, peer, target, method, identity, outcome)
        ctx = RequestContext(
            outcome.request_id, method, peer, target, route, identity, check.device, check.channel
        )
        outcome.ctx = ctx
        outcome.notes = check.notes
        if websocket and not route.websockets:
            raise AccessDenied(("websocket-not-allowed",))
        t4 = perf_counter_ns()
        verdict = self.decider.decide(ctx)
        if not verdict.allowed and check.device is not None and self.devices is not None:
            # Deny path only: another replica may have just accepted this device's report.
            fresher = await self.devices.recheck(check, identity=identity, now=now)
            if fresher is not None:
                check = fresher
                ctx = replace(ctx, device=check.device, device_channel=check.channel)
                outcome.ctx, outcome.notes = ctx, check.notes
                verdict = self.decider.decide(ctx)
        t5 = perf_counter_ns()
        stages.add("route", t2 - t1)
        stages.add("identity", t3 - t2)
        stages.add("device", t4 - t3)
        stages.add("decide", t5 - t4)
        outcome.policy_hash, outcome.rule = verdict.policy_hash, verdict.rule
        outcome.country = verdict.country
        if not verdict.allowed:
            if websocket:
                # No redirect for a WebSocket: the page's script must reload to log in again.
                raise AccessDenied(verdict.reasons)
            raise self._login_or_deny(ctx, verdict, check, headers)
        outcome.decision = "allow"
        gateway_headers = await self._assert_identity(ctx, outcome, now)
        upstream_headers = upstream_request_headers(
            headers,
            peer=peer,
            route=route,
            request_id=ctx.request_id,
            gateway_headers=gateway_headers,
            extra_dropped=self._dropped,
        )
        stages.add("headers", perf_counter_ns() - t5)
        return ctx, upstream_headers

    async def _device(  # noqa: PLR0917 — a private step of _admit, called once
        self,
        headers: list[tuple[bytes, bytes]],
        route: Route,
        peer: Peer,
        target: Target,
        method: str,
        identity: Identity | None,
        outcome: Outcome,
    ) -> DeviceCheck:
        """The device stage; a public route, like for identity, never looks at credentials."""
        if self.devices is None or route.public:
            return NO_DEVICE
        try:
            return await self.devices.check(
                headers,
                peer=peer,
                target=target,
                method=method,
                identity=identity,
                now=outcome.started,
            )
        except DeviceRefused as refused:
            # On record with who asked, and the device the refused credential named.
            outcome.ctx = RequestContext(outcome.request_id, method, peer, target, route, identity)
            outcome.device_id = refused.device_id
            raise

    # -- HTTP ------------------------------------------------------------------------------

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request: refuse it with a page, hand it to our own endpoints, or forward it."""
        t0 = perf_counter_ns()
        now = time()
        outcome = Outcome(now, t0, method=scope.get("method", ""))
        headers = scope["headers"]
        https = scope.get("scheme") == "https"
        self.metrics.request_started()
        stages = self.stages
        try:
            client = scope.get("client")
            if client:
                outcome.client_ip = client[0]
            peer = self._peer(scope)
            outcome.peer = peer
            https = peer.scheme == "https"
            outcome.request_id = new_request_id(headers, peer.via_trusted_proxy)
            request_id_var.set(outcome.request_id)  # every log line of this request carries it
            t1 = perf_counter_ns()
            target = outcome.target = self._target(scope, peer)
            if target.path == RESERVED_PREFIX or target.path.startswith(RESERVED_PREFIX + "/"):
                # The gateway's own namespace on every host: served here, never forwarded.
                outcome.route, outcome.decision = "tabiji", "internal"
                await self._internal(scope, receive, send, target, outcome, peer)
                return
            stages.add("peer", t1 - t0)
            ctx, upstream_headers = await self._admit(
                scope, peer, target, outcome, https=https, t1=t1
            )
            # Not timed: across an await a clock measures waiting, not this request's CPU.
            result = await self.forwarder.forward_http(ctx, upstream_headers, receive, send)
            outcome.result = result
            outcome.status = result.status
        except (ResponseAborted, ClientDisconnected) as broken:
            # The response was under way (or nobody is listening): nothing more can be sent;
            # returning without completing it makes the server close the connection.
            outcome.status, outcome.code, outcome.result = broken.status, broken.code, broken.result
            log.warning(
                "exchange broken", extra={"request_id": outcome.request_id, "code": broken.code}
            )
        except GatewayError as error:
            head_only = scope.get("method") == "HEAD"
            await self._refuse(
                send, error, outcome=outcome, headers=headers, https=https, head_only=head_only
            )
        except Exception:
            # Fail closed: an error in any stage is a refusal, never a forward.
            log.exception("request failed", extra={"request_id": outcome.request_id})
            await self._refuse(
                send,
                GatewayError("internal error"),
                outcome=outcome,
                headers=headers,
                https=https,
                head_only=False,
            )
        finally:
            self._finish(scope, outcome)

    async def _internal(  # noqa: PLR0917 — the request's pieces, handed on as they are
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: Target,
        outcome: Outcome,
        peer: Peer,
    ) -> None:
        status_holder: list[int] = []

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder.append(message["status"])
            await send(message)

        # Our own endpoints see the normalised path only, so they can't be reached by tricks either.
        inner = dict(scope)
        inner["path"] = target.path
        inner["raw_path"] = target.path.encode()
        inner["query_string"] = target.query.encode()
        inner["tabiji.request_id"] = outcome.request_id
        # The client as the trusted proxies tell it: the login endpoints choose cookie names and
        # redirect origins by it (a TLS-terminating proxy in front must not turn https into http).
        inner["tabiji.peer"] = peer
        await self.internal_app(inner, receive, send_recording)
        outcome.status = status_holder[0] if status_holder else 0

    async def _refuse(
        self,
        send: Send,
        error: GatewayError,
        *,
        outcome: Outcome,
        headers: list[tuple[bytes, bytes]],
        https: bool,
        head_only: bool,
    ) -> None:
        reasons = _record_refusal(outcome, error)
        if self.audit is not None and self.audit.durable and outcome.ctx is not None:
            # Durable mode: the refusal is on record before the client learns of it.
            try:
                await self.audit.record_durable(outcome)
            except Exception:
                log.exception(
                    "durable audit record failed", extra={"request_id": outcome.request_id}
                )
        try:
            if isinstance(error, LoginRequired):
                await self._send_login(send, error, outcome, headers, https, head_only)
                return
            extra: list[tuple[bytes, bytes]] = []
            if isinstance(error, DeviceCheckRequired):
                # Only ever raised for a top-level navigation (see _login_or_deny).
                extra.append((b"location", error.location.encode()))
            if isinstance(error, IdentityRejected):
                # RFC 6750 §3: the client learns its token was refused, and why, in one code.
                challenge = f'{error.www_authenticate}, error_description="{error.code}"'
                extra.append((b"www-authenticate", challenge.encode()))
            elif isinstance(error, DeviceRefused) and error.www_authenticate is not None:
                extra.append((b"www-authenticate", error.www_authenticate.encode()))
            await self.pages.send_error(
                send,
                status=error.status,
                code=error.code,
                request_id=outcome.request_id,
                request_headers=headers,
                reasons=reasons,
                https=https,
                head_only=head_only,
                extra_headers=extra,
            )
        except RuntimeError:
            # The response had already started (an upstream broke mid-stream): nothing to add.
            log.warning("response already started", extra={"request_id": outcome.request_id})

    async def _send_login(  # noqa: PLR0917 — a private helper of _refuse, called once
        self,
        send: Send,
        error: LoginRequired,
        outcome: Outcome,
        headers: list[tuple[bytes, bytes]],
        https: bool,
        head_only: bool,
    ) -> None:
        """A top-level navigation goes to the login page; anything else (a single-page app's
        fetch, a program) gets 401 with the login URL in JSON, never a cross-origin redirect."""
        if not _is_navigation(headers):
            await self.pages.send_error(
                send,
                status=401,
                code=error.code,
                request_id=outcome.request_id,
                # The client's own Accept (a fetch sends */*) is replaced, not appended to:
                # the page renderer reads the first Accept header.
                request_headers=[
                    *(h for h in headers if h[0] not in (b"accept", b"x-requested-with")),
                    (b"accept", b"application/json"),
                ],
                reasons=error.reasons,
                https=https,
                head_only=head_only,
                login_url=error.login_url,
            )
            return
        outcome.status = 302
        await self.pages.send_error(
            send,
            status=302,
            code=error.code,
            request_id=outcome.request_id,
            request_headers=headers,
            reasons=error.reasons,
            https=https,
            head_only=head_only,
            extra_headers=[(b"location", error.login_url.encode())],
        )

    def _finish(self, scope: Scope, outcome: Outcome) -> None:
        outcome.finished_ns = perf_counter_ns()
        if self.audit is not None and outcome.decision != "internal":
            try:
                self.audit.record(outcome)
            except Exception:
                log.exception("audit record failed", extra={"request_id": outcome.request_id})
        result = outcome.result
        self.metrics.request_finished(
            outcome.route,
            outcome.status,
            outcome.decision,
            result.upstream_seconds if result else None,
        )
        if self.access_log is not None:
            self.access_log.write(
                {
                    "request_id": outcome.request_id,
                    "route": outcome.route,
                    "method": scope.get("method"),
                    "status": outcome.status,
                    "decision": outcome.decision,
                    "code": outcome.code or None,
                    "reasons": list(outcome.reasons) or None,
                    "rule": outcome.rule,
                    "policy_hash": outcome.policy_hash,
                    "bytes_in": result.bytes_in if result else 0,
                    "bytes_out": result.bytes_out if result else 0,
                }
            )

    # -- WebSockets ------------------------------------------------------------------------

    async def handle_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake goes through the same stages; only routes that allow them relay."""
        started_ns = perf_counter_ns()
        now = time()
        outcome = Outcome(now, started_ns, method=scope.get("method", "GET"))
        headers = scope["headers"]
        https = scope.get("scheme") == "wss"
        self.metrics.request_started()
        try:
            client = scope.get("client")
            if client:
                outcome.client_ip = client[0]
            peer = self._peer(scope)
            outcome.peer = peer
            https = peer.scheme in {"https", "wss"}
            outcome.request_id = new_request_id(headers, peer.via_trusted_proxy)
            request_id_var.set(outcome.request_id)  # every log line of this request carries it
            target = outcome.target = self._target(scope, peer)
            if target.path == RESERVED_PREFIX or target.path.startswith(RESERVED_PREFIX + "/"):
                raise UnknownHost("the gateway's own endpoints take no WebSockets")
            ctx, upstream_headers = await self._admit(
                scope, peer, target, outcome, https=https, t1=perf_counter_ns(), websocket=True
            )
            result = await self.forwarder.forward_websocket(ctx, upstream_headers, receive, send)
            outcome.result, outcome.status = result, result.status
        except (ResponseAborted, ClientDisconnected) as broken:
            outcome.status, outcome.code, outcome.result = broken.status, broken.code, broken.result
        except GatewayError as error:
            await self._refuse_websocket(scope, receive, send, error, outcome=outcome, https=https)
        except Exception:
            log.exception("websocket failed", extra={"request_id": outcome.request_id})
            await self._refuse_websocket(
                scope, receive, send, GatewayError("internal error"), outcome=outcome, https=https
            )
        finally:
            self._finish(scope, outcome)

    async def _refuse_websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        error: GatewayError,
        *,
        outcome: Outcome,
        https: bool,
    ) -> None:
        headers = scope["headers"]
        reasons = _record_refusal(outcome, error)
        try:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            if "websocket.http.response" in scope.get("extensions", {}):
                # The ASGI denial-response extension: the client sees a real HTTP status and page.
                response_headers, body = self.pages.render_error(
                    status=error.status,
                    code=error.code,
                    request_id=outcome.request_id,
                    request_headers=headers,
                    reasons=reasons,
                    https=https,
                )
                response_headers.append((b"content-length", str(len(body)).encode()))
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": error.status,
                        "headers": response_headers,
                    }
                )
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": error.code})
        except (RuntimeError, OSError):
            log.warning("websocket refusal not delivered", extra={"request_id": outcome.request_id})
