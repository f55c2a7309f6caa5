"""The IT admin page under /.tabiji/devices: the device list (pending first), one device in words
(owner, key storage, certificate, latest posture and its age, what it fails), and the approve,
revoke and tag forms (POST + CSRF + same-origin; revoking asks first). ja/en, no script.

Who may use it is a policy (a PolicyGuard, e.g. group it-admins); every action is an audit admin
record. Must not import gateway.settings.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, Protocol
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.devices.fixes import DeviceAdvisor
from gateway.devices.intake_http import AdminAudit, record_admin
from gateway.devices.model import STATUSES, DeviceError, DeviceRecord, DeviceStatus
from gateway.errors import GatewayError
from gateway.identity.csrf import Csrf
from gateway.pages import Pages
from gateway.routing import canonical_authority
from gateway.web.audit_view import Viewer, plain
from gateway.web.forms import posted_by_own_page, read_form
from gateway.web.guard import Resolver
from gateway.web.responses import (
    chosen_language,
    error_page,
    for_forms,
    redirect,
    respond,
    switch_language_href,
)
from gateway.web.where import Where, where_of

log = logging.getLogger("tabiji.devices")

BASE: Final = "/.tabiji/devices"
DEVICE_BASE: Final = BASE + "/device"
CSRF_PURPOSE: Final = "device-admin"
JST: Final = timezone(timedelta(hours=9), "JST")
MAX_FORM_BYTES: Final = 4096
MAX_FILTER_TEXT: Final = 320
LIST_LIMIT: Final = 500
_DEVICE_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_TAG_SPLIT: Final = re.compile(r"[\s,、]+")
# Posture facts in the order the detail page lists them.
POSTURE_FIELDS: Final = (
    "os_name",
    "os_version",
    "kernel",
    "disk_encrypted",
    "firewall",
    "screen_lock",
    "screen_lock_timeout",
    "auto_update",
    "patch_age_days",
    "antivirus",
    "system_integrity",
    "agent_version",
)

Access = Callable[[Request], Awaitable[Viewer | Response]]


class AdminRegistry(Protocol):
    """gateway.devices.registry.DeviceRegistry (the parts the admin page uses)."""

    async def get(self, device_id: str) -> DeviceRecord | None: ...

    async def list(
        self,
        *,
        status: DeviceStatus | None = None,
        owner: tuple[str, str] | None = None,
        limit: int = 500,
    ) -> Sequence[DeviceRecord]: ...

    async def approve(self, device_id: str, *, now: float, actor: str) -> DeviceRecord: ...

    async def revoke(self, device_id: str, *, now: float, actor: str) -> DeviceRecord: ...

    async def set_tags(
        self, device_id: str, tags: frozenset[str], *, now: float, actor: str
    ) -> DeviceRecord: ...


def when(at: float | None) -> str:
    """Unix seconds as Japan time for people (the town reads JST): 2026-11-26 19:04."""
    if at is None:
        return "—"
    return datetime.fromtimestamp(at, UTC).astimezone(JST).strftime("%Y-%m-%d %H:%M")


def device_href(device_id: str, language: str, suffix: str = "", **extra: str) -> str:
    return f"{DEVICE_BASE}/{device_id}{suffix}?{urlencode({'lang': language, **extra})}"


@dataclass(frozen=True, slots=True)
class _Row:
    id: str
    href: str
    hostname: str
    owner: str
    status: str
    status_label: str
    key_storage: str
    posture: str
    posture_stale: bool
    last_seen: str


@dataclass(frozen=True, slots=True)
class _Option:
    value: str
    label: str
    selected: bool


@dataclass(frozen=True, slots=True)
class _Fix:
    code: str
    title: str
    explain: str
    fix: str


class DevicesAdmin:
    """The admin pages' shared state; `routes()` lists them."""

    def __init__(
        self,
        *,
        guard: Access,
        resolver: Resolver,
        registry: AdminRegistry,
        advisor: DeviceAdvisor,
        pages: Pages,
        csrf: Csrf,
        audit: AdminAudit,
        public_origin: str,
        posture_max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        scheme, _, authority = public_origin.rstrip("/").partition("://")
        self.public_origin = f"{scheme}://{canonical_authority(authority, scheme)}"
        self.guard = guard
        self.resolver = resolver
        self.registry = registry
        self.advisor = advisor
        self.pages = pages
        self.csrf = csrf
        self.audit = audit
        self.posture_max_age = posture_max_age
        self.clock = clock

    def routes(self) -> list[BaseRoute]:
        return [
            Route(BASE, self.list_page, methods=["GET"]),
            Route(DEVICE_BASE + "/{device_id}", self.detail_page, methods=["GET"]),
            Route(DEVICE_BASE + "/{device_id}/revoke", self.revoke_page, methods=["GET"]),
            Route(DEVICE_BASE + "/{device_id}/approve", self.approve, methods=["POST"]),
            Route(DEVICE_BASE + "/{device_id}/revoke", self.revoke, methods=["POST"]),
            Route(DEVICE_BASE + "/{device_id}/tags", self.tags, methods=["POST"]),
        ]

    # -- plumbing -------------------------------------------------------------------------------

    def _language(self, request: Request, form: Mapping[str, str] | None = None) -> str:
        return chosen_language(self.pages, request, form)

    def _text(self, message_id: str, language: str) -> str:
        return self.pages.text(message_id, language).title

    def _page(
        self,
        request: Request,
        where: Where,
        template: str,
        language: str,
        *,
        status: int = 200,
        **context: Any,
    ) -> Response:
        headers, body = self.pages.render_page(
            template,
            language=language,
            https=where.https,
            extra_css="devices.css",
            # The notice of a done action is not shown again in the other language.
            lang_switch_href=switch_language_href(request, language, drop=("done",)),
            list_href=f"{BASE}?{urlencode({'lang': language})}",
            **context,
        )
        return respond(status, body, for_forms(headers))

    def _error(self, request: Request, where: Where, status: int, code: str) -> Response:
        return error_page(self.pages, request, https=where.https, status=status, code=code)

    async def _admin(self, request: Request) -> Viewer | Response:
        """The guard, on the public URL only. /.tabiji/* answers on every route host too, where a
        page of the application is same-origin with it: its script, riding an admin's host
        session, could read the list and the CSRF token and approve an attacker's device."""
        where = where_of(request)
        if where.origin != self.public_origin:
            return self._error(request, where, 404, "route-not-found")
        return await self.guard(request)

    async def _session_hash(self, request: Request, where: Where) -> str | None:
        """The browser session the CSRF token is bound to (the guard already let the user in)."""
        try:
            identity = await self.resolver.resolve(
                list(request.scope["headers"]), where.authority, where.https, self.clock()
            )
        except GatewayError:
            return None
        return identity.session_hash if identity is not None else None

    def _age(self, seconds: float, language: str) -> str:
        """How long ago, in the reader's words: just now, N minutes, hours or days."""
        seconds = max(0.0, seconds)
        if seconds < 60:
            return self._text("ui.devices.age-now", language)
        if seconds < 3600:
            unit, count = "minutes", seconds // 60
        elif seconds < 86400:
            unit, count = "hours", seconds // 3600
        else:
            unit, count = "days", seconds // 86400
        return plain(self._text(f"ui.devices.age-{unit}", language), n=int(count))

    def _posture_words(self, record: DeviceRecord, now: float, language: str) -> tuple[str, bool]:
        if record.posture_at is None:
            return self._text("ui.devices.posture-none", language), False
        age = now - record.posture_at
        return self._age(age, language), age > self.posture_max_age

    def _storage_words(self, record: DeviceRecord, language: str) -> str:
        return self._text(f"ui.key-storage.{record.key_storage}", language)

    def _owner(self, record: DeviceRecord) -> str:
        return record.owner_email or record.owner_subject

    # -- pages ----------------------------------------------------------------------------------

    async def list_page(self, request: Request) -> Response:
        """GET /.tabiji/devices: every device (pending first), filtered by status and owner."""
        viewer = await self._admin(request)
        if isinstance(viewer, Response):
            return viewer
        where = where_of(request)
        language = self._language(request)
        status = request.query_params.get("status", "")
        owner = request.query_params.get("owner", "").strip()
        invalid = status not in ("", *STATUSES) or len(owner) > MAX_FILTER_TEXT
        records: Sequence[DeviceRecord] = ()
        if not invalid:
            try:
                records = await self.registry.list(
                    status=status or None,  # type: ignore[arg-type]  # checked in STATUSES
                    limit=LIST_LIMIT,
                )
            except DeviceError as error:
                return self._error(request, where, error.status, error.code)
        needle = owner.casefold()
        if needle:
            records = [
                r
                for r in records
                if needle in (r.owner_email or "").casefold()
                or needle in r.owner_subject.casefold()
            ]
        order = {"pending": 0, "approved": 1, "revoked": 2}
        ordered = sorted(records, key=lambda r: (order[r.status], -r.created_at))
        now = self.clock()
        rows = []
        for record in ordered:
            posture, stale = self._posture_words(record, now, language)
            rows.append(
                _Row(
                    id=record.id,
                    href=device_href(record.id, language),
                    hostname=record.hostname or record.id,
                    owner=self._owner(record),
                    status=record.status,
                    status_label=self._text(f"ui.device-status.{record.status}", language),
                    key_storage=self._storage_words(record, language),
                    posture=posture,
                    posture_stale=stale,
                    last_seen=when(record.last_seen),
                )
            )
        options = [
            _Option(value, self._text(f"ui.device-status.{value}", language), value == status)
            for value in STATUSES
        ]
        return self._page(
            request,
            where,
            "devices_admin_list.html",
            language,
            status=400 if invalid else 200,
            viewer_label=viewer.label,
            base=BASE,
            statuses=options,
            owner=owner,
            invalid=invalid,
            rows=rows,
            summary=plain(self._text("ui.devices.count", language), count=len(rows)),
            pending=sum(1 for r in rows if r.status == "pending"),
        )

    async def _device(
        self, request: Request, where: Where
    ) -> tuple[Viewer, DeviceRecord] | Response:
        viewer = await self._admin(request)
        if isinstance(viewer, Response):
            return viewer
        device_id = request.path_params["device_id"]
        record = None
        if _DEVICE_ID.match(device_id):
            try:
                record = await self.registry.get(device_id)
            except DeviceError as error:
                return self._error(request, where, error.status, error.code)
        if record is None:
            return self._error(request, where, 404, "device-unknown")
        return viewer, record

    async def detail_page(self, request: Request) -> Response:
        """GET /.tabiji/devices/device/{id}: one device in words, with its forms."""
        where = where_of(request)
        found = await self._device(request, where)
        if isinstance(found, Response):
            return found
        viewer, record = found
        return await self._detail(request, where, viewer, record, confirm_revoke=False)

    async def revoke_page(self, request: Request) -> Response:
        """GET …/revoke: the detail page asking "withdraw this device?" before the POST."""
        where = where_of(request)
        found = await self._device(request, where)
        if isinstance(found, Response):
            return found
        viewer, record = found
        return await self._detail(request, where, viewer, record, confirm_revoke=True)

    async def _detail(
        self,
        request: Request,
        where: Where,
        viewer: Viewer,
        record: DeviceRecord,
        *,
        confirm_revoke: bool,
    ) -> Response:
        language = self._language(request)
        now = self.clock()
        session_hash = await self._session_hash(request, where)
        t = self._text
        posture_age, stale = self._posture_words(record, now, language)
        facts = [
            (t("ui.label-device-id", language), record.id, "mono"),
            (t("ui.label-hostname", language), record.hostname or "—", ""),
            (t("ui.label-serial", language), record.serial or "—", ""),
            (t("ui.label-owner", language), self._owner(record), ""),
            (
                t("ui.label-owner-id", language),
                f"{record.owner_subject} ({record.owner_issuer})",
                "",
            ),
            (t("ui.label-key-storage", language), self._storage_words(record, language), ""),
            (t("ui.label-enrolled-at", language), when(record.created_at), ""),
            (t("ui.label-approved-at", language), when(record.approved_at), ""),
            (t("ui.label-last-seen", language), when(record.last_seen), ""),
            (t("ui.label-cert-expiry", language), when(record.cert_not_after), ""),
            (t("ui.label-cert-serial", language), record.cert_serial or "—", "mono"),
        ]
        if record.revoked_at is not None:
            facts.append((t("ui.label-revoked-at", language), when(record.revoked_at), ""))
        posture_rows = []
        if record.posture is not None:
            values = record.posture.to_json()
            for name in POSTURE_FIELDS:
                if name in values:
                    shown = values[name]
                    if isinstance(shown, bool):
                        shown = t("ui.yes" if shown else "ui.no", language)
                    posture_rows.append((t(f"ui.posture.{name}", language), str(shown)))
                else:
                    posture_rows.append(
                        (t(f"ui.posture.{name}", language), t("ui.unknown", language))
                    )
        reasons = self.advisor.reasons(record, now=now) if record.status != "revoked" else ()
        fixes = []
        for code in reasons:
            message = self.pages.text(code, language)
            fixes.append(_Fix(code, message.title, message.explain, message.fix))
        done = request.query_params.get("done", "")
        notice = f"ui.devices.done-{done}" if done in ("approved", "revoked", "tagged") else None
        return self._page(
            request,
            where,
            "devices_admin_detail.html",
            language,
            viewer_label=viewer.label,
            device=record,
            status_label=t(f"ui.device-status.{record.status}", language),
            facts=facts,
            posture_at=when(record.posture_at),
            posture_age=posture_age,
            posture_stale=stale,
            posture_rows=posture_rows,
            fixes=fixes,
            tags=sorted(record.tags),
            tags_text=" ".join(sorted(record.tags)),
            notice=notice,
            confirm_revoke=confirm_revoke,
            csrf=self.csrf.token(session_hash, CSRF_PURPOSE) if session_hash else "",
            approve_action=f"{DEVICE_BASE}/{record.id}/approve",
            revoke_action=f"{DEVICE_BASE}/{record.id}/revoke",
            tags_action=f"{DEVICE_BASE}/{record.id}/tags",
            revoke_href=device_href(record.id, language, "/revoke"),
            detail_href=device_href(record.id, language),
        )

    # -- actions --------------------------------------------------------------------------------

    async def _checked(
        self, request: Request, where: Where
    ) -> tuple[Viewer, str, dict[str, str]] | Response:
        """The admin, the device id and the form of an action that passed guard and CSRF."""
        viewer = await self._admin(request)
        if isinstance(viewer, Response):
            return viewer
        form = await read_form(request, MAX_FORM_BYTES)
        session_hash = await self._session_hash(request, where)
        if form is None or not posted_by_own_page(
            self.csrf, form, request, where, session_hash=session_hash, purpose=CSRF_PURPOSE
        ):
            record_admin(
                self.audit,
                "device.admin-refused",
                {"reason": "csrf-invalid", "path": request.url.path, "client_ip": where.client_ip},
                actor=viewer.email or viewer.subject,
            )
            return self._error(request, where, 403, "csrf-invalid")
        device_id = request.path_params["device_id"]
        if not _DEVICE_ID.match(device_id):
            return self._error(request, where, 404, "device-unknown")
        return viewer, device_id, form

    async def _act(
        self,
        request: Request,
        action: str,
        change: Callable[[str, float, str, dict[str, str]], Awaitable[DeviceRecord]],
        detail: Callable[[dict[str, str]], dict[str, object]] | None = None,
    ) -> Response:
        where = where_of(request)
        checked = await self._checked(request, where)
        if isinstance(checked, Response):
            return checked
        viewer, device_id, form = checked
        language = self._language(request, form)
        actor = viewer.email or viewer.subject
        try:
            record = await change(device_id, self.clock(), actor, form)
        except DeviceError as error:
            return self._error(request, where, error.status, error.code)
        record_admin(
            self.audit,
            f"device.{action}",
            {
                "device_id": record.id,
                "owner_issuer": record.owner_issuer,
                "owner_subject": record.owner_subject,
                "owner_email": record.owner_email,
                "hostname": record.hostname,
                "status": record.status,
                "client_ip": where.client_ip,
                **(detail(form) if detail is not None else {}),
            },
            actor=actor,
        )
        done = {"approve": "approved", "revoke": "revoked", "tag": "tagged"}[action]
        location = device_href(record.id, language, done=done)
        return redirect(self.pages, location, https=where.https, status=303)

    async def approve(self, request: Request) -> Response:
        """POST …/approve: the device may be used from now on."""

        async def change(device_id: str, now: float, actor: str, _: dict[str, str]) -> DeviceRecord:
            return await self.registry.approve(device_id, now=now, actor=actor)

        return await self._act(request, "approve", change)

    async def revoke(self, request: Request) -> Response:
        """POST …/revoke (from the confirmation page, `confirm=yes`): withdrawn for good."""

        async def change(
            device_id: str, now: float, actor: str, form: dict[str, str]
        ) -> DeviceRecord:
            if form.get("confirm") != "yes":  # only the confirmation page's form says yes
                raise DeviceError(code="device-revoke-unconfirmed", status=400)
            return await self.registry.revoke(device_id, now=now, actor=actor)

        return await self._act(request, "revoke", change)

    async def tags(self, request: Request) -> Response:
        """POST …/tags: replace the device's tags (space- or comma-separated)."""

        async def change(
            device_id: str, now: float, actor: str, form: dict[str, str]
        ) -> DeviceRecord:
            return await self.registry.set_tags(
                device_id, parse_tags(form.get("tags", "")), now=now, actor=actor
            )

        def detail(form: dict[str, str]) -> dict[str, object]:
            return {"tags": " ".join(sorted(parse_tags(form.get("tags", ""))))}

        return await self._act(request, "tag", change, detail)


def parse_tags(text: str) -> frozenset[str]:
    """Tags as typed: separated by spaces or commas, lower-cased (the registry checks the rest)."""
    return frozenset(tag.lower() for tag in _TAG_SPLIT.split(text.strip()) if tag)
