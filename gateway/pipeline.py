"""The request pipeline, in order, in one place: peer → target → route → decide → forward.

Stages gather facts; only the decision allows; only this module turns a decision or an error into a
response, and any unexpected error means refusal (fail closed). Must not import gateway.settings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Protocol

from gateway.context import Peer, RequestContext
from gateway.decide import Verdict
from gateway.errors import (
    AccessDenied,
    BadRequestTarget,
    GatewayError,
    UnknownHost,
)
from gateway.forward import ClientDisconnected, Forwarder, ForwardResult, ResponseAborted
from gateway.headers import new_request_id, upstream_request_headers
from gateway.observability import AccessLog, request_id_var
from gateway.pages import Pages
from gateway.peer import TrustedProxies, resolve_peer
from gateway.routing import RouteTable, canonical_authority
from gateway.target import Target, normalise_target

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RESERVED_PREFIX = "/.tabiji"
log = logging.getLogger("tabiji.pipeline")


class Decider(Protocol):
    """Turns the gathered facts into a verdict (gateway.decide: the policy engine)."""

    def decide(self, ctx: RequestContext) -> Verdict: ...


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
class _Outcome:
    """What the access log and metrics need once a request is over (mutable while it runs)."""

    request_id: str = "-"
    route: str = "-"
    status: int = 0
    decision: str = "error"
    code: str = ""
    policy_hash: str = "-"
    rule: str | None = None
    reasons: tuple[str, ...] = ()
    result: ForwardResult | None = None


def _record_refusal(outcome: _Outcome, error: GatewayError) -> tuple[str, ...]:
    """Note a refusal in the outcome; returns its reason codes (policy reasons for a deny)."""
    reasons = error.reasons if isinstance(error, AccessDenied) else ()
    outcome.reasons = reasons
    outcome.status, outcome.code = error.status, error.code
    outcome.decision = "deny" if isinstance(error, AccessDenied) else "error"
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
    ) -> None:
        self.routes = routes
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

    def _context(self, scope: Scope, request_id: str, peer: Peer, target: Target) -> RequestContext:
        route = self.routes.match(peer.authority, target.path)
        if route is None:
            raise UnknownHost(f"no route for {peer.authority}{target.path}")
        return RequestContext(request_id, scope.get("method", "GET"), peer, target, route)

    # -- HTTP ------------------------------------------------------------------------------

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request: refuse it with a page, hand it to our own endpoints, or forward it."""
        outcome = _Outcome()
        headers = scope["headers"]
        https = scope.get("scheme") == "https"
        self.metrics.request_started()
        stages = self.stages
        try:
            t0 = perf_counter_ns()
            peer = self._peer(scope)
            https = peer.scheme == "https"
            outcome.request_id = new_request_id(headers, peer.via_trusted_proxy)
            request_id_var.set(outcome.request_id)  # every log line of this request carries it
            t1 = perf_counter_ns()
            target = self._target(scope, peer)
            if target.path == RESERVED_PREFIX or target.path.startswith(RESERVED_PREFIX + "/"):
                # The gateway's own namespace on every host: served here, never forwarded.
                outcome.route, outcome.decision = "tabiji", "internal"
                await self._internal(scope, receive, send, target, outcome)
                return
            ctx = self._context(scope, outcome.request_id, peer, target)
            outcome.route = ctx.route.name
            t2 = perf_counter_ns()
            verdict = self.decider.decide(ctx)
            t3 = perf_counter_ns()
            stages.add("peer", t1 - t0)
            stages.add("route", t2 - t1)
            stages.add("decide", t3 - t2)
            outcome.policy_hash, outcome.rule = verdict.policy_hash, verdict.rule
            if not verdict.allowed:
                raise AccessDenied(verdict.reasons)
            outcome.decision = "allow"
            upstream_headers = upstream_request_headers(
                headers, peer=peer, route=ctx.route, request_id=ctx.request_id
            )
            stages.add("headers", perf_counter_ns() - t3)
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

    async def _internal(
        self, scope: Scope, receive: Receive, send: Send, target: Target, outcome: _Outcome
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
        await self.internal_app(inner, receive, send_recording)
        outcome.status = status_holder[0] if status_holder else 0

    async def _refuse(
        self,
        send: Send,
        error: GatewayError,
        *,
        outcome: _Outcome,
        headers: list[tuple[bytes, bytes]],
        https: bool,
        head_only: bool,
    ) -> None:
        reasons = _record_refusal(outcome, error)
        try:
            await self.pages.send_error(
                send,
                status=error.status,
                code=error.code,
                request_id=outcome.request_id,
                request_headers=headers,
                reasons=reasons,
                https=https,
                head_only=head_only,
            )
        except RuntimeError:
            # The response had already started (an upstream broke mid-stream): nothing to add.
            log.warning("response already started", extra={"request_id": outcome.request_id})

    def _finish(self, scope: Scope, outcome: _Outcome) -> None:
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
        outcome = _Outcome()
        headers = scope["headers"]
        https = scope.get("scheme") == "wss"
        self.metrics.request_started()
        try:
            peer = self._peer(scope)
            https = peer.scheme in {"https", "wss"}
            outcome.request_id = new_request_id(headers, peer.via_trusted_proxy)
            request_id_var.set(outcome.request_id)  # every log line of this request carries it
            target = self._target(scope, peer)
            if target.path == RESERVED_PREFIX or target.path.startswith(RESERVED_PREFIX + "/"):
                raise UnknownHost("the gateway's own endpoints take no WebSockets")
            ctx = self._context(scope, outcome.request_id, peer, target)
            outcome.route = ctx.route.name
            if not ctx.route.websockets:
                raise AccessDenied(("websocket-not-allowed",))
            verdict = self.decider.decide(ctx)
            outcome.policy_hash, outcome.rule = verdict.policy_hash, verdict.rule
            if not verdict.allowed:
                raise AccessDenied(verdict.reasons)
            outcome.decision = "allow"
            upstream_headers = upstream_request_headers(
                headers, peer=peer, route=ctx.route, request_id=ctx.request_id
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
        outcome: _Outcome,
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
