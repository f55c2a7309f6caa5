"""The gateway's own pages, error pages and redirects as Starlette responses, each with the
security headers gateway.pages makes; and which language such a page is shown in.

Must not import gateway.settings.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from gateway.pages import Pages
from gateway.web.catalogue import LANGUAGES

Headers = Sequence[tuple[bytes, bytes]]


def respond(status: int, body: bytes, headers: Headers) -> Response:
    """A response with exactly these headers (Starlette adds Content-Length)."""
    response = Response(body, status_code=status)
    response.raw_headers.extend(headers)
    return response


def error_page(
    pages: Pages, request: Request, *, https: bool, status: int, code: str, extra: Headers = ()
) -> Response:
    """The refusal page for `code` in the reader's language (JSON for programs)."""
    headers, body = pages.render_error(
        status=status,
        code=code,
        request_id=request.scope.get("tabiji.request_id", "-"),
        request_headers=request.scope["headers"],
        https=https,
    )
    return respond(status, body, [*headers, *extra])


def redirect(
    pages: Pages, location: str, *, https: bool, status: int = 302, extra: Headers = ()
) -> Response:
    """An empty redirect with the gateway's security headers."""
    headers = pages.security_headers(https)
    headers.append((b"location", location.encode()))
    return respond(status, b"", [*headers, *extra])


def for_forms(headers: Headers) -> list[tuple[bytes, bytes]]:
    """The headers of a page whose form posts back: Referrer-Policy same-origin instead of
    no-referrer, since under `no-referrer` browsers send `Origin: null` (Fetch §3.1 "serializing
    a request origin"), which the CSRF check refuses."""
    return [(k, b"same-origin" if k == b"referrer-policy" else v) for k, v in headers]


def chosen_language(pages: Pages, request: Request, form: Mapping[str, str] | None = None) -> str:
    """The form's or the query's `lang` when it names a language, else Accept-Language's."""
    chosen = (form or {}).get("lang") or request.query_params.get("lang", "")
    return chosen if chosen in LANGUAGES else pages.language(request.scope["headers"])


def switch_language_href(request: Request, language: str, drop: Collection[str] = ()) -> str:
    """This page (path and query, less the `drop` parameters) in the language other than
    `language`."""
    other = "en" if language == "ja" else "ja"
    query = {k: v for k, v in request.query_params.items() if k != "lang" and k not in drop}
    return f"{request.url.path}?{urlencode({**query, 'lang': other})}"
