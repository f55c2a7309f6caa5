"""The auditors' web view under /.tabiji/audit: filtered, paged records, charts, one record in
words, CSV export, the chain's verification status — no script, ja/en. No gateway.settings.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final
from urllib.parse import quote, urlencode

from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.audit.query import AuditFilter, AuditReader, AuditStats, VerifyReport
from gateway.audit.record import EVENT_FIELDS, AuditRecord
from gateway.pages import Pages
from gateway.web.catalogue import LANGUAGES, Message
from gateway.web.charts import Bar, TimeLabels, TimePoint, bar_chart, time_chart

BASE: Final = "/.tabiji/audit"
RECORD_BASE: Final = BASE + "/record"
EXPORT_PATH: Final = BASE + "/export.csv"
# Times are stored in UTC; the town reads them in Japan Standard Time (no daylight saving).
JST: Final = timezone(timedelta(hours=9), "JST")
DECISIONS: Final = ("allow", "deny", "error", "info")
FILTER_FIELDS: Final = ("from", "until", "user", "device", "route", "decision", "reason", "text")
MAX_FILTER_TEXT: Final = 320  # an e-mail address is at most 254; nothing longer is a real filter
EXPORT_CHUNK: Final = 1000
CHART_BUCKETS: Final = 48  # at most this many bars over the chosen time range
TOP_N: Final = 8
# Bucket sizes the time chart may use, smallest first (seconds).
BUCKET_LADDER: Final = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
# A formula-injection guard for spreadsheets (OWASP "CSV Injection"): cells starting with these
# are prefixed with an apostrophe so Excel / LibreOffice read them as text, never as a formula.
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
# The fields of a record, in the order the detail page lists them (EVENT_FIELDS with the latency
# in milliseconds, as people read it); chain_id and seq lead, the hashes have their own section.
DETAIL_FIELDS: Final = (
    "chain_id",
    "seq",
    *(("latency_ms" if name == "latency_us" else name) for name in EVENT_FIELDS),
)
_MONO_FIELDS: Final = frozenset(
    {"chain_id", "request_id", "session_hash", "policy_hash", "device_id", "client_ip"}
)
_PLACEHOLDER: Final = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking at the audit trail (resolved and authorised by the `access` callable)."""

    issuer: str
    subject: str
    email: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        """How the page names the viewer: name, else e-mail, else subject."""
        return self.name or self.email or self.subject


Access = Callable[[Request], Awaitable[Viewer | Response]]
RecordView = Callable[[Viewer, str, Mapping[str, object]], None]


# --------------------------------------------------------------------------- small helpers


def fill(text: str, **values: object) -> Markup:
    """A catalogue sentence with `{name}` placeholders filled: the text escaped, each value
    escaped and set in <code>, so a user-controlled value can never become markup."""
    parts: list[str] = []
    last = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(str(escape(text[last : match.start()])))
        name = match.group(1)
        if name in values:
            parts.append(f"<code>{escape(str(values[name]))}</code>")
        else:
            parts.append(str(escape(match.group(0))))
        last = match.end()
    parts.append(str(escape(text[last:])))
    return Markup("".join(parts))  # noqa: S704 - every piece above was escaped


def plain(text: str, **values: object) -> str:
    """A catalogue sentence with `{name}` placeholders filled as plain text (autoescaped later)."""
    return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), text)


def local_time(time_us: int) -> str:
    """UTC µs as Japan time for people: 2026-11-26 19:04:05."""
    return datetime.fromtimestamp(time_us / 1e6, JST).strftime("%Y-%m-%d %H:%M:%S")


def utc_time(time_us: int) -> str:
    """UTC µs as ISO 8601 with microseconds and Z: the exact stored instant."""
    moment = datetime.fromtimestamp(time_us // 1_000_000, UTC).replace(
        microsecond=time_us % 1_000_000
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _to_us(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_local(value: str, *, end_of_day: bool) -> int:
    """A date-time typed in Japan time (datetime-local: 2026-11-26T09:00[:00], or a date) → UTC µs.

    A bare date as the end of a range means the whole day (up to the next midnight, exclusive).
    Raises ValueError for anything else.
    """
    text = value.strip().replace(" ", "T")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=JST)
        return _to_us(day + timedelta(days=1) if end_of_day else day)
    for pattern in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return _to_us(datetime.strptime(text, pattern).replace(tzinfo=JST))
        except ValueError:
            continue
    raise ValueError(value)


def _input_value(time_us: int) -> str:
    """UTC µs as the value of a datetime-local input in Japan time."""
    return datetime.fromtimestamp(time_us / 1e6, JST).strftime("%Y-%m-%dT%H:%M:%S")


def csv_cell(value: object) -> str:
    """One CSV cell: None empty, lists joined by '; ', mappings as JSON; formula-guarded."""
    if value is None:
        text = ""
    elif isinstance(value, list | tuple):
        text = "; ".join(str(item) for item in value)
    elif isinstance(value, Mapping):
        text = json.dumps(dict(value), ensure_ascii=False, sort_keys=True) if value else ""
    else:
        text = str(value)
    if text.startswith(FORMULA_START):
        return "'" + text
    return text


def _field_value(record: AuditRecord, name: str) -> str:
    """A record field as the detail page shows it ("" for an empty one)."""
    if name in ("chain_id", "seq"):
        return str(getattr(record, name))
    value: Any = getattr(record.event, name)
    if name == "time_us":
        shown = f"{utc_time(value)} ({local_time(value)} JST)"
    elif isinstance(value, tuple | list):
        shown = ", ".join(str(item) for item in value)
    elif isinstance(value, Mapping):
        shown = json.dumps(dict(value), ensure_ascii=False, sort_keys=True) if value else ""
    elif value is None or (name == "status" and value == 0):
        shown = ""
    else:
        shown = str(value)
    return shown


def href(path: str, params: Mapping[str, str | int]) -> str:
    """`path` with the non-empty `params` as its query string."""
    kept = {key: value for key, value in params.items() if value not in ("", None)}
    return path + ("?" + urlencode(kept) if kept else "")


def record_href(record_chain: str, seq: int, language: str) -> str:
    """The address of one record's detail page."""
    # ':' is a plain path character (RFC 3986 §3.3) and chain ids are host:pid:start.
    return href(f"{RECORD_BASE}/{quote(record_chain, safe=':')}/{seq}", {"lang": language})


# --------------------------------------------------------------------------- the filter


@dataclass(frozen=True, slots=True)
class ParsedFilter:
    """The filter as typed (for the form and links) and as the reader takes it."""

    form: Mapping[str, str]  # every FILTER_FIELDS key, "" when unset
    audit_filter: AuditFilter
    invalid: frozenset[str]

    def detail(self) -> dict[str, object]:
        """The filter for the viewer's own audit record: only what was set."""
        out: dict[str, object] = {key: value for key, value in self.form.items() if value}
        if self.audit_filter.since_us is not None:
            out["since"] = utc_time(self.audit_filter.since_us)
        if self.audit_filter.until_us is not None:
            out["until_excl"] = utc_time(self.audit_filter.until_us)
        return out


def parse_filter(params: Mapping[str, str], default_since_us: int | None = None) -> ParsedFilter:
    """Read the filter from query parameters; fields that do not parse are named in `invalid`
    (the reader then gets no records rather than a wider filter than the auditor asked for).

    Without a `from` parameter at all the range starts at `default_since_us` (shown in the form,
    so the auditor sees it); `from=` present but empty means no lower bound.
    """
    form = {key: params.get(key, "").strip() for key in FILTER_FIELDS}
    if "from" not in params and default_since_us is not None:
        form["from"] = _input_value(default_since_us)
    invalid: set[str] = set()
    for key, value in form.items():
        if len(value) > MAX_FILTER_TEXT or not value.isprintable():
            invalid.add(key)
    since = until = None
    if form["from"] and "from" not in invalid:
        try:
            since = parse_local(form["from"], end_of_day=False)
        except ValueError:
            invalid.add("from")
    if form["until"] and "until" not in invalid:
        try:
            until = parse_local(form["until"], end_of_day=True)
        except ValueError:
            invalid.add("until")
    if since is not None and until is not None and since >= until:
        invalid.update(("from", "until"))
    if form["decision"] and form["decision"] not in DECISIONS:
        invalid.add("decision")
    audit_filter = AuditFilter(
        since_us=since,
        until_us=until,
        user=form["user"] or None,
        device=form["device"] or None,
        route=form["route"] or None,
        decision=form["decision"] or None,
        reason=form["reason"] or None,
        text=form["text"] or None,
    )
    return ParsedFilter(form=form, audit_filter=audit_filter, invalid=frozenset(invalid))


# --------------------------------------------------------------------------- view models


@dataclass(frozen=True, slots=True)
class _Row:
    href: str
    time_local: str
    time_utc: str
    time_iso: str
    user: str
    device: str
    route: str
    method: str
    path: str
    decision: str
    decision_label: str
    reasons: tuple[str, ...]
    status: str


@dataclass(frozen=True, slots=True)
class _Chain:
    state: str  # "ok" | "bad" | "unknown"
    title: str
    detail: str
    fix: str
    first_bad_href: str | None
    first_bad_label: str


@dataclass(frozen=True, slots=True)
class _Charts:
    time: Markup
    users: Markup
    devices: Markup
    reasons: Markup


@dataclass(frozen=True, slots=True)
class _Verdict:
    state: str
    title: str
    sentences: tuple[Markup, ...]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    label: str
    value: str
    mono: bool


@dataclass(frozen=True, slots=True)
class _Reason:
    code: str
    message: Message


def choose_bucket(span_us: int) -> int:
    """The smallest ladder bucket (seconds) that covers `span_us` in at most CHART_BUCKETS bars."""
    for seconds in BUCKET_LADDER:
        if span_us <= seconds * 1_000_000 * CHART_BUCKETS:
            return seconds
    return BUCKET_LADDER[-1]


def time_points(stats: AuditStats, start_us: int, end_us: int, title_day: bool) -> list[TimePoint]:
    """Every bucket from `start_us` to `end_us` (empty ones as zero), labelled in Japan time."""
    bucket_us = stats.bucket_seconds * 1_000_000
    counts = {start // bucket_us: (total, denied) for start, total, denied in stats.series}
    first = start_us // bucket_us
    last = max(end_us - 1, start_us) // bucket_us
    if counts:  # records outside the expected range (clock skew): widen rather than hide them
        first, last = min(first, *counts), max(last, *counts)
    if last - first >= CHART_BUCKETS * 4:  # a guard against a degenerate range
        first = last - CHART_BUCKETS * 4 + 1
    points = []
    for index in range(first, last + 1):
        total, denied = counts.get(index, (0, 0))
        begin = datetime.fromtimestamp(index * bucket_us / 1e6, JST)
        end = datetime.fromtimestamp((index + 1) * bucket_us / 1e6, JST)
        label = begin.strftime("%m/%d" if title_day else "%m/%d %H:%M")
        title = f"{begin:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} JST"
        points.append(TimePoint(label=label, title=title, total=total, refused=denied))
    return points


# --------------------------------------------------------------------------- the routes


class AuditView:
    """The auditors' pages over one AuditReader; see `audit_routes`."""

    def __init__(
        self,
        *,
        reader: AuditReader,
        pages: Pages,
        access: Access,
        record_view: RecordView,
        page_size: int,
        clock: Callable[[], float],
        default_days: int | None,
        verify_wait: float,
    ) -> None:
        self.reader = reader
        self.pages = pages
        self.access = access
        self.record_view = record_view
        self.page_size = page_size
        self.clock = clock
        self.default_days = default_days
        self.verify_wait = verify_wait
        self._verify_task: asyncio.Future[VerifyReport] | None = None
        # Codes a record may carry (policy reasons and the gateway's own), offered in the filter.
        self.reason_codes = sorted(
            code
            for code in self.pages.catalogue.ids()
            if "." not in code and not code.startswith("audit-")
        )

    def _language_of(self, request: Request) -> str:
        chosen = request.query_params.get("lang", "")
        return chosen if chosen in LANGUAGES else self.pages.language(request.scope["headers"])

    def _text(self, message_id: str, language: str) -> Message:
        return self.pages.text(message_id, language)

    def _respond(
        self, request: Request, template: str, language: str, status: int = 200, **context: Any
    ) -> Response:
        other = "en" if language == "ja" else "ja"
        switch = dict(request.query_params)
        switch["lang"] = other
        headers, body = self.pages.render_page(
            template,
            language=language,
            https=request.url.scheme == "https",
            extra_css="audit.css",
            lang_switch_href=href(request.url.path, switch),
            **context,
        )
        response = Response(body, status_code=status)
        for name, value in headers:
            response.headers[name.decode()] = value.decode()
        request_id = request.scope.get("tabiji.request_id")
        if request_id:
            response.headers["x-request-id"] = request_id
        return response

    def _default_since(self) -> int | None:
        if self.default_days is None:
            return None
        # Whole seconds: the form shows seconds, so the links repeat exactly this bound.
        return (int(self.clock()) - self.default_days * 86400) * 1_000_000

    async def _verify(self) -> VerifyReport | None:
        """The chain's verification, waiting at most `verify_wait` s: a full verify walks every
        record, so a slow one goes on in the background (one at a time) and a later page shows
        it. None while it runs; an exception (store unreadable) is raised to the caller."""
        task = self._verify_task
        if task is None or task.done():
            task = asyncio.ensure_future(self.reader.verify_status())
            # Retrieve a late failure so it is never reported as "never retrieved".
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._verify_task = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.verify_wait)
        except TimeoutError:
            return None

    async def _chain_status(self, language: str) -> _Chain:
        try:
            report = await self._verify()
        except Exception:  # a store that cannot be read: say so, never show "verified"
            message = self._text("audit.chain.unknown", language)
            return _Chain("unknown", message.title, message.explain, "", None, "")
        if report is None:
            message = self._text("audit.chain.checking", language)
            return _Chain("unknown", message.title, message.explain, "", None, "")
        checkpoint = (
            plain(
                self._text("audit.chain.checkpoint", language).title,
                time=local_time(report.last_checkpoint_us) + " JST",
            )
            if report.last_checkpoint_us is not None
            else self._text("audit.chain.no-checkpoint", language).title
        )
        if report.ok:
            message = self._text("audit.chain.ok", language)
            detail = plain(message.explain, count=f"{report.records_checked:,}")
            return _Chain("ok", message.title, f"{detail} {checkpoint}", "", None, "")
        message = self._text("audit.chain.bad", language)
        bad = report.first_bad
        where = f"{bad.chain_id} / {bad.seq}" if bad is not None and bad.chain_id else "—"
        problem = (
            f"{self._text(f'audit.problem.{bad.what}', language).title} [{bad.what}]"
            if bad is not None
            else "—"
        )
        detail = plain(message.explain, record=where, problem=problem)
        return _Chain(
            "bad",
            message.title,
            f"{detail} {checkpoint}",
            message.fix,
            record_href(bad.chain_id, bad.seq, language)
            if bad is not None and bad.chain_id and bad.seq > 0
            else None,
            self._text("audit.chain.first-bad", language).title,
        )

    def _bucket_words(self, seconds: int, language: str) -> str:
        for unit, name in ((86400, "day"), (3600, "hour"), (60, "minute")):
            if seconds % unit == 0:
                count = seconds // unit
                if count == 1:
                    return self._text(f"audit.chart.{name}", language).title
                return plain(self._text(f"audit.chart.{name}s", language).title, n=count)
        return f"{seconds} s"  # pragma: no cover - every ladder step is whole minutes

    async def _charts(self, parsed: ParsedFilter, total: int, language: str) -> _Charts:
        audit_filter = parsed.audit_filter
        end_us = audit_filter.until_us or int(self.clock() * 1_000_000) + 1
        start_us = audit_filter.since_us
        if start_us is None:
            oldest = await self.reader.query(audit_filter, 1, max(total - 1, 0)) if total else []
            start_us = oldest[0].time_us if oldest else end_us - 86_400_000_000
        bucket = choose_bucket(max(end_us - start_us, 1))
        # Requests only: the auditors' own views and admin actions are not traffic.
        chart_filter = audit_filter if audit_filter.kind else replace(audit_filter, kind="request")
        stats = await self.reader.stats(chart_filter, bucket)
        labels = TimeLabels(
            title=self._text("audit.chart.time", language).title,
            allowed=self._text("audit.chart.allowed", language).title,
            refused=self._text("audit.chart.refused", language).title,
            y_axis=self._text("audit.chart.requests", language).title,
            x_axis=plain(
                self._text("audit.chart.time-axis", language).title,
                bucket=self._bucket_words(bucket, language),
            ),
            empty=self._text("audit.chart.empty", language).title,
        )
        points = time_points(stats, start_us, end_us, title_day=bucket >= 86400)
        base = {**parsed.form, "lang": language}

        def bars(items: Sequence[tuple[str, int]], key: str, words: bool) -> list[Bar]:
            out = []
            for value, count in items[:TOP_N]:
                label = self._text(value, language).title if words else value
                out.append(
                    Bar(
                        label=label,
                        value=count,
                        title=f"{label} ({value})" if words else value,
                        href=href(BASE, {**base, key: value}),
                    )
                )
            return out

        empty = self._text("audit.chart.empty", language).title

        def top(items: Sequence[tuple[str, int]], key: str, title_id: str, words: bool) -> Markup:
            return Markup(  # noqa: S704 - charts.py escapes every text it writes into the SVG
                bar_chart(
                    bars(items, key, words),
                    title=self._text(title_id, language).title,
                    empty=empty,
                    chart_id=f"chart-{key}",
                )
            )

        return _Charts(
            time=Markup(time_chart(points, labels)),  # noqa: S704 - escaped by charts.py
            users=top(stats.top_users, "user", "audit.chart.top-users", words=False),
            devices=top(stats.top_devices, "device", "audit.chart.top-devices", words=False),
            reasons=top(stats.top_reasons, "reason", "audit.chart.top-reasons", words=True),
        )

    def _row(self, record: AuditRecord, language: str) -> _Row:
        event = record.event
        request_line = event.path if event.kind == "request" else (event.action or "")
        return _Row(
            href=record_href(record.chain_id, record.seq, language),
            time_local=local_time(event.time_us),
            time_utc=utc_time(event.time_us),
            time_iso=utc_time(event.time_us),
            user=event.user or event.actor or "—",
            device=event.device_id or "—",
            route=event.route or "—",
            method=event.method if event.kind == "request" else event.kind,
            path=request_line,
            decision=event.decision,
            decision_label=self._text(f"audit.decision.{event.decision}", language).title,
            reasons=event.reasons,
            status=str(event.status) if event.status else "—",
        )

    async def _list_response(
        self, request: Request, viewer: Viewer, parsed: ParsedFilter, page: int, language: str
    ) -> Response:
        base = {**parsed.form, "lang": language}
        records: list[AuditRecord] = []
        total = 0
        if parsed.invalid:
            # Nothing rather than a wider filter than the auditor asked for.
            chart_set = _Charts(*(Markup("") for _ in range(4)))
        else:
            total = await self.reader.count(parsed.audit_filter)
            page = min(page, max((total + self.page_size - 1) // self.page_size, 1))
            records = await self.reader.query(
                parsed.audit_filter, self.page_size, (page - 1) * self.page_size
            )
            chart_set = await self._charts(parsed, total, language)
        pages_total = max((total + self.page_size - 1) // self.page_size, 1)
        first = (page - 1) * self.page_size + 1 if records else 0
        last = (page - 1) * self.page_size + len(records)
        return self._respond(
            request,
            "audit_list.html",
            language,
            status=400 if parsed.invalid else 200,
            viewer_label=viewer.label,
            list_path=BASE,
            form=parsed.form,
            invalid=parsed.invalid,
            decisions=DECISIONS,
            reason_codes=self.reason_codes,
            clear_href=href(BASE, {"lang": language}),
            chain=await self._chain_status(language),
            export_href=href(EXPORT_PATH, parsed.form),
            charts=chart_set,
            rows=[self._row(record, language) for record in records],
            summary=plain(
                self._text("audit.summary", language).title,
                total=f"{total:,}",
                first=f"{first:,}",
                last=f"{last:,}",
            ),
            page_of=plain(
                self._text("audit.pager.page", language).title, page=page, pages=pages_total
            ),
            prev_href=href(BASE, {**base, "page": page - 1}) if page > 1 else None,
            next_href=href(BASE, {**base, "page": page + 1}) if page < pages_total else None,
        )

    async def list_page(self, request: Request) -> Response:
        """GET /.tabiji/audit: the filter form, chain status, charts and one page of records."""
        viewer = await self.access(request)
        if isinstance(viewer, Response):
            return viewer
        parsed = parse_filter(request.query_params, self._default_since())
        try:
            page = max(int(request.query_params.get("page", "1")), 1)
        except ValueError:
            page = 1
        self.record_view(viewer, "audit.view", {**parsed.detail(), "page": page})
        return await self._list_response(request, viewer, parsed, page, self._language_of(request))

    def _verdict(self, record: AuditRecord, language: str) -> _Verdict:
        event = record.event
        policy = (event.policy_hash or "—")[:23]
        unknown = self._text("audit.unknown", language).title
        who = fill(
            self._text("audit.record.who", language).explain,
            user=event.user or self._text("audit.anonymous", language).title,
            device=event.device_id or unknown,
            method=event.method or "—",
            target=(event.host + event.path) or "—",
        )
        if event.kind != "request":
            message = self._text("audit.record.action", language)
            sentence = fill(
                message.explain, actor=event.actor or event.user or unknown, action=event.action
            )
            return _Verdict("action", message.title, (sentence,))
        if event.decision == "allow":
            key = "audit.record.allowed" if event.rule else "audit.record.allowed-public"
            message = self._text(key, language)
            sentence = fill(message.explain, rule=event.rule or "—", policy=policy)
            return _Verdict("allow", message.title, (who, sentence))
        if event.decision == "error":
            message = self._text("audit.record.error", language)
            return _Verdict(
                "error", message.title, (who, fill(message.explain, status=event.status))
            )
        if event.rule:
            key = "audit.record.refused-by-rule"
        elif event.policy_hash:
            key = "audit.record.refused"
        else:
            key = "audit.record.refused-before-policy"
        message = self._text(key, language)
        sentence = fill(message.explain, rule=event.rule or "—", policy=policy)
        return _Verdict("deny", message.title, (who, sentence))

    async def record_page(self, request: Request) -> Response:
        """GET /.tabiji/audit/record/{chain_id}/{seq}: one record, and why, in words."""
        viewer = await self.access(request)
        if isinstance(viewer, Response):
            return viewer
        language = self._language_of(request)
        chain_id = request.path_params["chain_id"]
        seq = int(request.path_params["seq"])
        self.record_view(viewer, "audit.record", {"chain_id": chain_id, "seq": seq})
        record = await self.reader.get(chain_id, seq)
        if record is None:
            headers, body = self.pages.render_error(
                status=404,
                code="audit-record-not-found",
                request_id=request.scope.get("tabiji.request_id", "-"),
                request_headers=request.scope["headers"],
                https=request.url.scheme == "https",
            )
            response = Response(body, status_code=404)
            for name, value in headers:
                response.headers[name.decode()] = value.decode()
            return response
        fields = [
            _Field(
                name=name,
                label=self._text(f"audit.field.{name}", language).title,
                value=_field_value(record, name),
                mono=name in _MONO_FIELDS,
            )
            for name in DETAIL_FIELDS
        ]
        return self._respond(
            request,
            "audit_record.html",
            language,
            viewer_label=viewer.label,
            chain_id=record.chain_id,
            seq=record.seq,
            time_local=local_time(record.time_us) + " JST",
            time_utc=utc_time(record.time_us),
            time_iso=utc_time(record.time_us),
            verdict=self._verdict(record, language),
            reasons=[_Reason(code, self._text(code, language)) for code in record.reasons],
            fields=fields,
            prev_hash=record.prev_hash,
            hash=record.hash,
            back_href=href(BASE, {"lang": language}),
            prev_href=record_href(chain_id, seq - 1, language) if seq > 1 else None,
            next_href=(
                record_href(chain_id, seq + 1, language)
                if await self.reader.get(chain_id, seq + 1) is not None
                else None
            ),
        )

    async def export_csv(self, request: Request) -> Response:
        """GET /.tabiji/audit/export.csv?<filter>: every matching record, streamed, newest first."""
        viewer = await self.access(request)
        if isinstance(viewer, Response):
            return viewer
        parsed = parse_filter(request.query_params, self._default_since())
        if parsed.invalid:  # no file for a filter that does not parse: the form, marked
            self.record_view(viewer, "audit.view", {**parsed.detail(), "export": True})
            return await self._list_response(request, viewer, parsed, 1, self._language_of(request))
        self.record_view(viewer, "audit.export", parsed.detail())
        stamp = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = {
            name.decode(): value.decode()
            for name, value in self.pages.security_headers(request.url.scheme == "https")
        }
        headers["content-disposition"] = f'attachment; filename="tabiji-audit-{stamp}.csv"'
        request_id = request.scope.get("tabiji.request_id")
        if request_id:
            headers["x-request-id"] = request_id
        return StreamingResponse(
            csv_rows(self.reader, parsed.audit_filter),
            media_type="text/csv; charset=utf-8",
            headers=headers,
        )


def audit_routes(
    *,
    reader: AuditReader,
    pages: Pages,
    access: Access,
    record_view: RecordView,
    page_size: int = 50,
    clock: Callable[[], float] = time.time,
    default_days: int | None = 7,
    verify_wait: float = 2.0,
) -> list[Route]:
    """The auditors' pages: GET /.tabiji/audit, …/record/{chain_id}/{seq}, …/export.csv.

    `access` resolves and authorises the requester (a Viewer) or answers for us (a login
    redirect, a 403 page); every page view and export is reported through `record_view`
    ("audit.view", "audit.record", "audit.export") before anything is shown. Without a `from`
    the list and export cover the last `default_days` (None: everything); the chain status waits
    at most `verify_wait` seconds for the reader's verification, then says it is still checking.
    """

    view = AuditView(
        reader=reader,
        pages=pages,
        access=access,
        record_view=record_view,
        page_size=page_size,
        clock=clock,
        default_days=default_days,
        verify_wait=verify_wait,
    )
    return [
        Route(BASE, view.list_page, methods=["GET"]),
        Route(RECORD_BASE + "/{chain_id}/{seq:int}", view.record_page, methods=["GET"]),
        Route(EXPORT_PATH, view.export_csv, methods=["GET"]),
    ]


CSV_COLUMNS: Final = ("time_utc", "chain_id", "seq", *EVENT_FIELDS, "prev_hash", "hash")


async def export_records(
    reader: AuditReader, audit_filter: AuditFilter, chunk: int = EXPORT_CHUNK
) -> AsyncIterator[AuditRecord]:
    """Every record matching the filter, newest first, in pages that stay correct while records
    are appended: each page ends before the previous page's oldest time (keyset paging), with an
    offset only over the records already sent that share that exact microsecond."""
    until, skip = audit_filter.until_us, 0
    while True:
        page = await reader.query(replace(audit_filter, until_us=until), chunk, skip)
        for record in page:
            yield record
        if len(page) < chunk:
            return
        boundary = page[-1].time_us
        at_boundary = sum(1 for record in page if record.time_us == boundary)
        skip = skip + at_boundary if until == boundary + 1 else at_boundary
        until = boundary + 1


async def csv_rows(reader: AuditReader, audit_filter: AuditFilter) -> AsyncIterator[bytes]:
    """The CSV file in pieces: a UTF-8 BOM (so Excel in Japan reads it as UTF-8), a header, rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180 §2: CRLF line breaks
    writer.writerow(CSV_COLUMNS)
    yield ("\ufeff" + buffer.getvalue()).encode()
    batch = 0
    buffer.seek(0)
    buffer.truncate()
    async for record in export_records(reader, audit_filter):
        values = record.to_dict()
        writer.writerow(
            [csv_cell(utc_time(record.time_us))]
            + [csv_cell(values[name]) for name in CSV_COLUMNS[1:]]
        )
        batch += 1
        if batch >= 200:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
            batch = 0
    if batch:
        yield buffer.getvalue().encode()
