"""The pipeline's audit trail: turns a finished request's outcome into an AuditEvent for the writer.

Duck-typed on the pipeline's Outcome (this package must not import gateway.pipeline), so the
pipeline hands over what it already has and pays only for one event per request.
Must not import gateway.settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.audit.record import AuditEvent, Decision, Kind
from gateway.audit.request_facts import request_detail
from gateway.audit.writer import AuditWriter

log = logging.getLogger("tabiji.audit")
_DECISIONS: dict[str, Decision] = {"allow": "allow", "deny": "deny"}


class _OutcomeLike(Protocol):
    started: float
    started_ns: int
    finished_ns: int
    request_id: str
    route: str
    status: int
    decision: str
    code: str
    policy_hash: str
    rule: str | None
    reasons: tuple[str, ...]
    result: Any
    ctx: Any
    peer: Any
    country: str | None
    method: str
    target: Any
    client_ip: str
    device_id: str | None  # a device named by a refused credential (no ctx.device then)


def request_event(outcome: _OutcomeLike) -> AuditEvent:
    """The audit event of one request: who, from where, what, the decision and its reasons."""
    ctx = outcome.ctx
    peer = ctx.peer if ctx is not None else outcome.peer
    identity = ctx.identity if ctx is not None else None
    result = outcome.result
    reasons = outcome.reasons
    if outcome.code and outcome.decision != "deny" and outcome.code not in reasons:
        reasons = (*reasons, outcome.code)  # an error's code is its reason (target-invalid, …)
    finished = outcome.finished_ns or outcome.started_ns
    # The device the request was proved to come from (gateway.devices.stage), else the one a
    # refused proof or certificate named; never a session binding nobody verified.
    device = ctx.device if ctx is not None else None
    posture_at = device.posture_at if device is not None else None
    return AuditEvent(
        kind="request",
        time_us=int(outcome.started * 1_000_000),
        request_id=outcome.request_id,
        route=outcome.route,
        # Refused before routing (a malformed target, an unknown host): what was asked is still
        # on record, from the request line and the socket.
        method=ctx.method if ctx is not None else outcome.method,
        host=peer.authority if peer is not None else "",
        path=ctx.target.path
        if ctx is not None
        else (outcome.target.path if outcome.target is not None else ""),
        query=(ctx.target.query or None) if ctx is not None and ctx.route.audit_query else None,
        client_ip=peer.client_ip if peer is not None else outcome.client_ip,
        country=outcome.country,
        user_issuer=identity.issuer if identity is not None else None,
        user_subject=identity.subject if identity is not None else None,
        user_email=identity.email if identity is not None else None,
        groups=tuple(sorted(identity.groups)) if identity is not None else (),
        session_hash=identity.session_hash if identity is not None else None,
        device_id=device.id if device is not None else outcome.device_id,
        posture=device.posture_summary if device is not None else None,
        posture_age_s=max(0, int(outcome.started - posture_at)) if posture_at is not None else None,
        policy_hash=outcome.policy_hash if outcome.policy_hash != "-" else None,
        rule=outcome.rule,
        decision=_DECISIONS.get(outcome.decision, "error"),
        reasons=reasons,
        status=outcome.status,
        latency_ms=(finished - outcome.started_ns) / 1_000_000,
        bytes_in=result.bytes_in if result is not None else 0,
        bytes_out=result.bytes_out if result is not None else 0,
        detail=request_detail(identity, device, ctx),
    )


class AuditTrail:
    """What the pipeline calls: `record` after every request, `record_durable` before release."""

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self.durable = writer.mode == "durable"
        self._durable_ids: set[str] = set()

    def healthy(self) -> bool:
        """False only with `fail_closed` while nothing can be written durably."""
        return self.writer.healthy or not self.writer.fail_closed

    def record(self, outcome: _OutcomeLike) -> None:
        if self.durable and outcome.request_id in self._durable_ids:
            self._durable_ids.discard(outcome.request_id)
            if outcome.decision != "allow":
                return  # the refusal's record, committed before it was sent, says it all
            # The decision is on record already; the exchange's result (status, bytes) follows.
            self.writer.submit(_as_result(request_event(outcome)))
            return
        # The finished outcome itself: the flush encodes it straight to canonical bytes
        # (gateway.audit.request_facts), so nothing is built per request here.
        self.writer.submit_outcome(outcome)

    async def record_durable(self, outcome: _OutcomeLike) -> None:
        """Commit the decision before anything is forwarded or refused (durable mode)."""
        self._durable_ids.add(outcome.request_id)
        # The event is built now, before awaiting: the outcome keeps changing while this waits.
        ok = await self.writer.submit_durable(request_event(outcome))
        if not ok and self.writer.fail_closed:
            from gateway.errors import AuditUnavailable

            # The id stays: the writer keeps this event, so the refusal is not recorded twice.
            raise AuditUnavailable("the decision could not be recorded durably")

    def admin(self, action: str, detail: Mapping[str, object], *, actor: str | None = None) -> None:
        """An administrative or identity event (login, logout, session revoke, reload…)."""
        self._submit("admin", action, detail, actor)

    def view(self, viewer: object, action: str, detail: Mapping[str, object]) -> None:
        """An auditor's own look at the trail (a page, a record, an export) is a record too."""
        actor = getattr(viewer, "email", None) or getattr(viewer, "subject", None)
        self._submit("view", action, detail, actor)

    def _submit(
        self, kind: Kind, action: str, detail: Mapping[str, object], actor: str | None
    ) -> None:
        from gateway.audit.writer import now_us

        clean: dict[str, str | int | float | bool | None] = {}
        for key, value in detail.items():
            plain = isinstance(value, str | int | float | bool) or value is None
            clean[key] = value if plain else str(value)  # type: ignore[assignment]  # plain: narrowed
        self.writer.submit(
            AuditEvent(
                kind=kind,
                time_us=now_us(),
                action=action,
                actor=actor or _actor(detail),
                decision="info",
                detail=clean,
            )
        )


def _as_result(event: AuditEvent) -> AuditEvent:
    from dataclasses import replace

    return replace(event, decision="info", action="request.result")


def _actor(detail: Mapping[str, object]) -> str | None:
    for key in ("email", "subject", "user"):
        value = detail.get(key)
        if isinstance(value, str) and value:
            return value
    return None
