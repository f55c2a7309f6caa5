"""The small urlencoded forms the gateway's own pages post: reading one, and checking that it
came from the gateway's own page in this session (CSRF).

Must not import gateway.settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

from starlette.requests import Request

from gateway.identity.csrf import Csrf
from gateway.web.where import Where

FORM_TYPE: Final = "application/x-www-form-urlencoded"


async def read_form(request: Request, max_bytes: int) -> dict[str, str] | None:
    """The form's fields; None when the body is something else, larger than `max_bytes` (read no
    further than that) or names a field twice (which of two values would count is ambiguous)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            return None
        form[key] = value
    return form


def posted_by_own_page(
    csrf: Csrf,
    form: Mapping[str, str] | None,
    request: Request,
    where: Where,
    *,
    session_hash: str | None,
    purpose: str,
) -> bool:
    """The form was posted from the gateway's own page: the request's Origin (or Referer) is the
    one it reached, and the form carries this session's token for `purpose`."""
    if form is None or session_hash is None:
        return False
    return csrf.check(
        token=form.get("csrf"),
        session_hash=session_hash,
        purpose=purpose,
        headers=request.scope["headers"],
        request_origin=where.origin,
    )
