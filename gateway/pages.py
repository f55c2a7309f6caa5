"""The gateway's own responses: refusal and error pages (HTML in ja/en, or JSON), security headers.

Must not import gateway.settings; texts come only from the message catalogue.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jinja2

from gateway.web.catalogue import LANGUAGES, Catalogue, Message, preferred_language

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
TEMPLATES = Path(__file__).parent / "web" / "templates"


@dataclass(frozen=True, slots=True)
class _ReasonText:
    code: str
    message: Message


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header name, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def wants_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Programs and single-page apps get JSON; top-level browser navigations get HTML."""
    accept = (header_value(headers, b"accept") or b"").lower()
    if b"text/html" in accept:
        return False
    return b"application/json" in accept or header_value(headers, b"x-requested-with") is not None


class Pages:
    """Renders every page the gateway itself answers with; built once at start-up."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._environment = environment
        self._error = environment.get_template("error.html")
        self._css = (TEMPLATES / "page.css").read_text(encoding="utf-8")
        self._page_css: dict[str, tuple[str, Headers]] = {}
        self._base_headers = self._headers_for_css(self._css)

    @staticmethod
    def _headers_for_css(css: str) -> Headers:
        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        # A strict CSP: nothing but our one inline stylesheet, pinned by its hash; no scripts;
        # never framed; forms post only back to the gateway.
        csp = (
            "default-src 'none'; "
            f"style-src 'sha256-{digest}'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
        return [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-store"),
        ]

    def language(self, request_headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The reader's language from Accept-Language (Japanese by default)."""
        return preferred_language(header_value(request_headers, b"accept-language"))

    def text(self, message_id: str, language: str) -> Message:
        """One catalogue entry in one language."""
        return self.catalogue.get(message_id, language)

    def render_page(
        self,
        template: str,
        *,
        language: str,
        https: bool,
        extra_css: str | None = None,
        **context: Any,
    ) -> tuple[Headers, bytes]:
        """Headers and body of one of the gateway's own HTML pages (login chooser, audit view…).

        The template gets `lang`, `other_lang`, `css` (page.css plus `extra_css`, a file in
        templates/), `t(id)` → Message in the reader's language and `t_other(id)`, plus `context`.
        The CSP pins exactly that stylesheet by its hash; no script runs on the gateway's pages.
        """
        css, base = self._css, self._base_headers
        if extra_css is not None:
            cached = self._page_css.get(extra_css)
            if cached is None:
                combined = self._css + (TEMPLATES / extra_css).read_text(encoding="utf-8")
                cached = (combined, self._headers_for_css(combined))
                self._page_css[extra_css] = cached
            css, base = cached
        other = "en" if language == "ja" else "ja"
        body = (
            self._environment.get_template(template)
            .render(
                lang=language,
                other_lang=other,
                css=css,
                brand=self.catalogue.get("ui.brand", language).title,
                t=lambda message_id: self.catalogue.get(message_id, language),
                t_other=lambda message_id: self.catalogue.get(message_id, other),
                **context,
            )
            .encode()
        )
        headers = [*base, (b"date", formatdate(usegmt=True).encode())]
        if https:
            headers.append((b"strict-transport-security", b"max-age=31536000"))
        headers.append((b"content-type", b"text/html; charset=utf-8"))
        headers.append((b"content-language", language.encode()))
        return headers, body

    def security_headers(self, https: bool) -> Headers:
        """Headers for the gateway's own pages; HSTS only over HTTPS (RFC 6797 §7.2).

        Also Date (RFC 9110 §6.6.1): uvicorn's is off, so forwarded responses keep the upstream's.
        """
        headers = [*self._base_headers, (b"date", formatdate(usegmt=True).encode())]
        if https:
            headers.append((b"strict-transport-security", b"max-age=31536000"))
        return headers

    def render_error(
        self,
        *,
        status: int,
        code: str,
        request_id: str,
        request_headers: Iterable[tuple[bytes, bytes]],
        reasons: tuple[str, ...] = (),
        https: bool = False,
        login_url: str | None = None,
    ) -> tuple[Headers, bytes]:
        """Headers and body of a refusal/error page, in the reader's language or as JSON."""
        request_headers = list(request_headers)
        language = preferred_language(header_value(request_headers, b"accept-language"))
        headers = self.security_headers(https)
        headers.append((b"x-request-id", request_id.encode()))
        if wants_json(request_headers):
            document: dict[str, Any] = {
                "error": code,
                "status": status,
                "reasons": list(reasons),
                "request_id": request_id,
                "message": {lang: self.catalogue.get(code, lang).title for lang in LANGUAGES},
                "reason_messages": {
                    reason: {
                        lang: {
                            "title": self.catalogue.get(reason, lang).title,
                            "fix": self.catalogue.get(reason, lang).fix,
                        }
                        for lang in LANGUAGES
                    }
                    for reason in reasons
                },
            }
            if login_url is not None:
                document["login_url"] = login_url
            body = json.dumps(document, ensure_ascii=False).encode()
            headers.append((b"content-type", b"application/json; charset=utf-8"))
            return headers, body
        other = "en" if language == "ja" else "ja"
        body = self._error.render(
            lang=language,
            other_lang=other,
            css=self._css,
            brand=self.catalogue.get("ui.brand", language).title,
            primary=self.catalogue.get(code, language),
            secondary=self.catalogue.get(code, other),
            reasons=[_ReasonText(r, self.catalogue.get(r, language)) for r in reasons],
            other_reasons=[_ReasonText(r, self.catalogue.get(r, other)) for r in reasons],
            reference_label=self.catalogue.get("ui.request-id", language).title,
            request_id=request_id,
            status=status,
            code=code,
        ).encode()
        headers.append((b"content-type", b"text/html; charset=utf-8"))
        headers.append((b"content-language", language.encode()))
        return headers, body

    async def send_error(
        self,
        send: Send,
        *,
        status: int,
        code: str,
        request_id: str,
        request_headers: Iterable[tuple[bytes, bytes]],
        reasons: tuple[str, ...] = (),
        https: bool = False,
        extra_headers: Headers | None = None,
        head_only: bool = False,
        login_url: str | None = None,
    ) -> int:
        """Send a whole error response over ASGI; returns the number of body bytes sent."""
        headers, body = self.render_error(
            status=status,
            code=code,
            request_id=request_id,
            request_headers=request_headers,
            reasons=reasons,
            https=https,
            login_url=login_url,
        )
        if extra_headers:
            headers.extend(extra_headers)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head_only else body})
        return 0 if head_only else len(body)
