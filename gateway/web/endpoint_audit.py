"""The audit record of an action at one of the gateway's own endpoints (a login, a logout, a
device bound to a session): who asked from where and in which request, then the action's own
fields — written through a hook whose failure is logged and never breaks the endpoint.

Must not import gateway.settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from starlette.requests import Request

from gateway.web.where import Where

log = logging.getLogger("tabiji.audit")

# (action, record): e.g. gateway.audit.trail.AuditTrail's hook for the gateway's own endpoints.
Audit = Callable[[str, Mapping[str, object]], None]


def audit_action(
    hook: Audit | None, action: str, request: Request, where: Where, **fields: object
) -> None:
    """Write one record (nothing when no hook is configured)."""
    if hook is None:
        return
    record: dict[str, object] = {
        "client_ip": where.client_ip,
        "host": where.authority,
        "request_id": request.scope.get("tabiji.request_id", "-"),
    }
    record.update(fields)
    try:
        hook(action, record)
    except Exception:
        log.exception("the audit hook failed for %s", action)
