"""The auditors' web view against a real SQLite audit store: access, filters, paging, words, CSV."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from gateway.audit.chain import Chain
from gateway.audit.query import AuditFilter, AuditReader, StoreReader, VerifyReport
from gateway.audit.record import AuditEvent, AuditRecord
from gateway.audit.store import AuditStoreUnavailable
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import PROBLEMS
from gateway.pages import TEMPLATES, Pages
from gateway.web.audit_view import (
    DETAIL_FIELDS,
    Viewer,
    audit_routes,
    csv_cell,
    export_records,
    parse_filter,
    parse_local,
)
from gateway.web.catalogue import load_catalogue
from gateway.web.endpoints import build_internal_app

pytestmark = pytest.mark.anyio

T0 = 1_795_651_200 * 1_000_000  # 2026-11-26T00:00:00Z = 09:00 in Japan
MINUTE = 60 * 1_000_000
POLICY = "sha256:" + "ab" * 32
BULK_CHAIN = "gw-a:101:1"
CHAIN = "gw-b:202:2"
AUDITOR = {"x-test-role": "auditor"}
HOSTILE_PATH = "/<script>alert(1)</script>"
NOW_US = T0 + 130 * MINUTE  # the view's clock
# Without `from`, the view covers the last 7 days: that bound, as typed and as the instant.
DEFAULT_RANGE = {"from": "2026-11-19T11:10:00", "since": "2026-11-19T02:10:00.000000Z"}


@dataclass
class Env:
    """A filled store, the internal app with the audit routes, and what was recorded."""

    client: httpx.AsyncClient
    store: SqliteAuditStore
    db: Path
    records: dict[str, AuditRecord]
    views: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)


def request_event(minutes: int, **values: Any) -> AuditEvent:
    """A request record `minutes` after T0 with sensible defaults."""
    defaults: dict[str, Any] = {
        "kind": "request",
        "time_us": T0 + minutes * MINUTE,
        "request_id": f"req-{minutes}",
        "route": "wiki",
        "method": "GET",
        "host": "wiki.town.example",
        "path": "/wiki/Home",
        "client_ip": "192.0.2.10",
        "user_issuer": "https://idp.town.example",
        "policy_hash": POLICY,
        "decision": "allow",
        "status": 200,
        "latency_ms": 1.5,
    }
    return AuditEvent(**{**defaults, **values})


async def fill(store: SqliteAuditStore) -> dict[str, AuditRecord]:
    """100 allowed requests of carol (one a minute), then one record of each interesting kind."""
    bulk = Chain(BULK_CHAIN)
    await store.append_batch(
        [
            bulk.seal(
                request_event(
                    i,
                    user_email="carol@town.example",
                    user_subject="carol",
                    device_id="dev-c",
                    path=f"/wiki/{i}",
                    rule="staff-read",
                )
            )
            for i in range(100)
        ]
    )
    chain = Chain(CHAIN)
    events = {
        "allow": request_event(
            120, user_email="alice@town.example", user_subject="alice", device_id="dev-a",
            rule="staff-read", groups=("staff",),
        ),
        "deny": request_event(
            121, user_email="bob@town.example", user_subject="bob", device_id="dev-b",
            route="payroll", path="/pay/2026", decision="deny", status=403,
            reasons=("device-posture-stale", "group-missing"),
        ),
        "deny_rule": request_event(
            122, user_email="dave@town.example", device_id="dev-d", route="payroll",
            decision="deny", status=403, rule="block-contractors", reasons=("deny-rule-matched",),
        ),
        "malformed": request_event(
            123, route="", path="/a%2Fb", policy_hash=None, decision="deny", status=400,
            reasons=("target-encoded-slash",),
        ),
        "error": request_event(
            124, user_email="alice@town.example", device_id="dev-a", rule="staff-read",
            decision="error", status=504, reasons=("upstream-timeout",),
        ),
        "admin": AuditEvent(
            kind="admin", time_us=T0 + 125 * MINUTE, action="session.revoke",
            actor="admin@town.example", detail={"target": "bob@town.example"},
        ),
        "hostile": request_event(
            126, user_email='=HYPERLINK("http://evil.example")', device_id="@SUM(1+1)",
            route="+cmd", path=HOSTILE_PATH, decision="deny", status=403,
            reasons=("group-missing",),
        ),
    }  # fmt: skip
    records = {name: chain.seal(event) for name, event in events.items()}
    await store.append_batch(list(records.values()))
    return records


def client_for(
    reader: AuditReader, views: list[tuple[str, str, dict[str, object]]], **options: Any
) -> httpx.AsyncClient:
    """A client of the internal app with the audit routes over `reader`, recording into `views`."""
    pages = Pages(load_catalogue())

    async def access(request: Request) -> Viewer | Response:
        """Auditors (a test header stands in for the lead's policy check) see; others get 403."""
        if request.headers.get("x-test-role") == "auditor":
            return Viewer("https://idp.town.example", "erin", "erin@town.example", "Erin")
        headers, body = pages.render_error(
            status=403,
            code="access-denied",
            request_id="-",
            request_headers=request.scope["headers"],
        )
        response = Response(body, status_code=403)
        for name, value in headers:
            response.headers[name.decode()] = value.decode()
        return response

    def record_view(viewer: Viewer, action: str, detail: Mapping[str, object]) -> None:
        views.append((viewer.subject, action, dict(detail)))

    async def readiness() -> dict[str, Any]:
        return {"ready": True, "checks": {}}

    routes = audit_routes(
        reader=reader,
        pages=pages,
        access=access,
        record_view=record_view,
        clock=lambda: NOW_US / 1e6,
        **options,
    )
    app = build_internal_app(pages=pages, readiness=readiness, extra_routes=routes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db = tmp_path / "audit.db"
    store = SqliteAuditStore(db)
    await store.open()
    records = await fill(store)
    views: list[tuple[str, str, dict[str, object]]] = []
    async with client_for(StoreReader(store, None, verify_ttl=0), views) as client:
        yield Env(client, store, db, records, views)
    await store.close()


def words(page: str) -> str:
    """The page's text as a reader sees it: tags removed, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page)))


def table_paths(page: str) -> list[str]:
    """The request column of the records table, top to bottom."""
    cells = re.findall(r'<td class="path">(.*?)</td>', page, flags=re.S)
    return [words(cell).strip() for cell in cells]


def record_path(record: AuditRecord) -> str:
    return f"/.tabiji/audit/record/{record.chain_id}/{record.seq}"


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize(
    "path",
    ["/.tabiji/audit", f"/.tabiji/audit/record/{CHAIN}/1", "/.tabiji/audit/export.csv"],
)
async def test_non_auditor_gets_the_access_response_and_nothing_is_read(
    env: Env, path: str
) -> None:
    """Whatever `access` answers for a non-auditor (here 403) is sent as-is; no view recorded."""
    response = await env.client.get(path, headers={"x-test-role": "staff"})
    assert response.status_code == 403
    assert "alice@town.example" not in response.text
    assert "text/csv" not in response.headers["content-type"]
    assert env.views == []


async def test_auditor_sees_the_list_and_the_view_is_recorded(env: Env) -> None:
    """An auditor gets the page (CSP, no-store, no script) and the view becomes an audit record."""
    response = await env.client.get("/.tabiji/audit", headers=AUDITOR)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp
    assert "<script" not in response.text.lower()
    assert not re.search(r"\sstyle=", response.text)  # the CSP would block inline styles
    assert "Erin" in response.text
    assert env.views == [("erin", "audit.view", {**DEFAULT_RANGE, "page": 1})]


# --------------------------------------------------------------------------- language


async def test_japanese_by_default_english_by_accept_language_and_switch(env: Env) -> None:
    """Japanese by default; Accept-Language picks English; ?lang= overrides and links switch."""
    ja = await env.client.get("/.tabiji/audit", headers=AUDITOR)
    assert '<html lang="ja">' in ja.text
    assert "監査ログ" in ja.text
    en = await env.client.get("/.tabiji/audit", headers={**AUDITOR, "accept-language": "en-US"})
    assert '<html lang="en">' in en.text
    assert "Audit log" in en.text
    assert en.headers["content-language"] == "en"
    forced = await env.client.get(
        "/.tabiji/audit", params={"lang": "ja", "decision": "deny"},
        headers={**AUDITOR, "accept-language": "en"},
    )  # fmt: skip
    assert '<html lang="ja">' in forced.text
    switch = re.search(r'<a href="([^"]+)"[^>]*class="lang-switch"', forced.text)
    assert switch is not None
    assert "lang=en" in html.unescape(switch.group(1))
    assert "decision=deny" in html.unescape(switch.group(1))  # the filter survives the switch


# --------------------------------------------------------------------------- table and paging


async def test_newest_first_and_paged(env: Env) -> None:
    """Records come newest first, 50 a page, with links to older and newer pages."""
    first = await env.client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
    paths = table_paths(first.text)
    assert len(paths) == 50
    assert paths[0] == f"GET {HOSTILE_PATH}"  # the newest record
    assert paths[1] == "admin session.revoke"
    assert "1 to 50 of 107" in words(first.text)
    assert 'rel="next"' in first.text
    assert 'rel="prev"' not in first.text
    last = await env.client.get(
        "/.tabiji/audit", params={"lang": "en", "page": "3"}, headers=AUDITOR
    )
    paths = table_paths(last.text)
    assert len(paths) == 7
    assert paths[-1] == "GET /wiki/0"  # the oldest
    assert "101 to 107 of 107" in words(last.text)
    assert 'rel="next"' not in last.text
    assert 'rel="prev"' in last.text
    beyond = await env.client.get("/.tabiji/audit", params={"page": "99"}, headers=AUDITOR)
    assert table_paths(beyond.text) == paths  # a page past the end shows the last one


async def test_times_are_shown_in_japan_time_with_utc_in_the_title(env: Env) -> None:
    """The table shows Japan time; the exact UTC instant is in the link's title."""
    response = await env.client.get(
        "/.tabiji/audit", params={"user": "alice@town.example"}, headers=AUDITOR
    )
    assert 'title="2026-11-26T02:00:00.000000Z"' in response.text
    assert "2026-11-26 11:00:00" in response.text


# --------------------------------------------------------------------------- filters


async def test_filter_by_decision(env: Env) -> None:
    """decision=deny lists only refusals."""
    response = await env.client.get("/.tabiji/audit", params={"decision": "deny"}, headers=AUDITOR)
    rows = re.findall(r'<tr data-decision="(\w+)">', response.text)
    assert rows == ["deny"] * 4
    assert env.views[-1][2] == {**DEFAULT_RANGE, "decision": "deny", "page": 1}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("user", "bob@town.example", ["GET /pay/2026"]),
        ("device", "dev-a", ["GET /wiki/Home", "GET /wiki/Home"]),
        ("route", "payroll", ["GET /wiki/Home", "GET /pay/2026"]),
        ("reason", "group-missing", [f"GET {HOSTILE_PATH}", "GET /pay/2026"]),
        (
            "text",
            "/wiki/9",
            [f"GET /wiki/{i}" for i in (99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 9)],
        ),
    ],
)
async def test_each_filter_field_narrows_the_table(
    env: Env, name: str, value: str, expected: list[str]
) -> None:
    """Each filter field (user, device, route, reason, search text) narrows the table."""
    response = await env.client.get("/.tabiji/audit", params={name: value}, headers=AUDITOR)
    assert response.status_code == 200
    assert table_paths(response.text) == expected


async def test_without_from_the_last_seven_days_show(env: Env) -> None:
    """No `from` means the last 7 days (shown in the form); an empty `from` means all time."""
    older = Chain("old:1:1").seal(request_event(-8 * 24 * 60, path="/ancient"))
    await env.store.append_batch([older])
    default = await env.client.get("/.tabiji/audit", params={"page": "3"}, headers=AUDITOR)
    assert "GET /ancient" not in table_paths(default.text)
    assert f'value="{DEFAULT_RANGE["from"]}"' in default.text
    everything = await env.client.get(
        "/.tabiji/audit", params={"from": "", "page": "3"}, headers=AUDITOR
    )
    assert table_paths(everything.text)[-1] == "GET /ancient"
    exported = await env.client.get("/.tabiji/audit/export.csv", headers=AUDITOR)
    assert "/ancient" not in exported.text


async def test_filter_by_time_range_in_japan_time(env: Env) -> None:
    """from/until are read as Japan time: 10:30–10:35 JST is 01:30–01:35 UTC, `until` exclusive."""
    response = await env.client.get(
        "/.tabiji/audit",
        params={"from": "2026-11-26T10:30", "until": "2026-11-26T10:35"},
        headers=AUDITOR,
    )
    assert table_paths(response.text) == [f"GET /wiki/{i}" for i in (94, 93, 92, 91, 90)]
    assert 'value="2026-11-26T10:30"' in response.text  # the form keeps what was typed


async def test_invalid_filter_is_refused_with_the_field_marked(env: Env) -> None:
    """A filter that does not parse shows the form with the field marked and no records (400)."""
    for params, bad in (
        ({"from": "yesterday"}, "from"),
        ({"decision": "maybe"}, "decision"),
        ({"from": "2026-11-27", "until": "2026-11-26"}, "until"),
    ):
        response = await env.client.get("/.tabiji/audit", params=params, headers=AUDITOR)
        assert response.status_code == 400
        assert table_paths(response.text) == []
        assert 'data-code="audit.filter.invalid"' in response.text
        assert re.search(
            rf'<label class="invalid">[^<]*\s*<(input|select)[^>]*name="{bad}"', response.text
        )


def test_parse_filter_reads_japan_time_and_whole_days() -> None:
    """A bare date as `until` includes that whole day; times are Japan time converted to UTC."""
    assert parse_local("2026-11-26T09:00", end_of_day=False) == T0
    assert parse_local("2026-11-26 09:00:30", end_of_day=False) == T0 + 30_000_000
    assert parse_local("2026-11-26", end_of_day=False) == T0 - 9 * 60 * MINUTE
    assert parse_local("2026-11-26", end_of_day=True) == T0 + 15 * 60 * MINUTE
    parsed = parse_filter({"from": "2026-11-26", "until": "2026-11-26", "user": " a@b "})
    assert parsed.invalid == frozenset()
    assert parsed.audit_filter == AuditFilter(
        since_us=T0 - 9 * 60 * MINUTE, until_us=T0 + 15 * 60 * MINUTE, user="a@b"
    )
    assert parse_filter({"user": "x" * 400}).invalid == {"user"}
    assert parse_filter({"route": "a\x1bb"}).invalid == {"route"}


# --------------------------------------------------------------------------- charts and chain


async def test_charts_are_inline_svg_with_counts(env: Env) -> None:
    """Four inline SVG charts: the time series holds every request; top reasons in words."""
    response = await env.client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
    assert response.text.count('<svg xmlns="http://www.w3.org/2000/svg"') == 4
    counts = [
        int(n)
        for n in re.findall(r'class="bar-(?:allow|deny)"[^>]*data-count="(\d+)"', response.text)
    ]
    time_chart = response.text.split('class="chart chart-time"', 1)[1].split("</svg>", 1)[0]
    drawn = sum(int(n) for n in re.findall(r'data-count="(\d+)"', time_chart))
    assert drawn == 106  # every request record; the admin action is not a request
    assert counts
    reasons = response.text.split('aria-labelledby="chart-reason-title"', 1)[1].split("</svg>")[0]
    assert "group-missing" in reasons  # the code in the tooltip …
    assert (
        html.escape(load_catalogue().get("group-missing", "en").title[:20], quote=True) in reasons
    )
    users = response.text.split('aria-labelledby="chart-user-title"', 1)[1].split("</svg>")[0]
    assert "bob@town.example" in users
    assert "carol@town.example" not in users  # never refused


async def test_chain_status_ok_then_the_first_bad_record(env: Env) -> None:
    """A clean store reads as verified; after a row is edited behind the store's back, the page
    names the first bad record and links to it."""
    clean = await env.client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
    assert 'data-chain="ok"' in clean.text
    assert "The chain is verified" in clean.text
    target = env.records["deny"]
    with sqlite3.connect(env.db) as tamper:  # root on the host, editing the file directly
        tamper.execute("DROP TRIGGER audit_records_no_update")
        tamper.execute(
            "UPDATE audit_records SET status = 200, decision = 'allow'"
            " WHERE chain_id = ? AND seq = ?",
            (target.chain_id, target.seq),
        )
    tampered = await env.client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
    assert 'data-chain="bad"' in tampered.text
    text = words(tampered.text)
    assert f"First bad record: {target.chain_id} / {target.seq}" in text
    assert "[edited]" in text
    assert f'href="{record_path(target)}?lang=en"' in tampered.text


async def test_a_slow_verification_does_not_hold_the_page(env: Env) -> None:
    """While a long verification runs the page says "being verified"; a later view shows it."""
    gate = asyncio.Event()
    real = StoreReader(env.store, None, verify_ttl=0)
    started: list[int] = []
    finished = asyncio.Event()

    class SlowVerify(StoreReader):
        async def verify_status(self) -> VerifyReport:
            started.append(1)
            await gate.wait()
            report = await real.verify_status()
            finished.set()
            return report

    views: list[tuple[str, str, dict[str, object]]] = []
    reader = SlowVerify(env.store, None)
    async with client_for(reader, views, verify_wait=0.05) as client:
        for _ in range(2):
            waiting = await client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
            assert waiting.status_code == 200
            assert "The chain is being verified" in waiting.text
            assert 'data-chain="ok"' not in waiting.text
        assert len(started) == 1  # one verification at a time, not one per page view
        gate.set()
        await asyncio.wait_for(finished.wait(), 30)
        await asyncio.sleep(0)  # let the background task complete
        done = await client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
        assert 'data-chain="ok"' in done.text


async def test_an_unreadable_store_never_reads_as_verified(env: Env) -> None:
    """If verification fails (store unreadable), the status says so instead of "verified"."""

    class Broken(StoreReader):
        async def verify_status(self) -> VerifyReport:
            raise AuditStoreUnavailable("disk gone")

    views: list[tuple[str, str, dict[str, object]]] = []
    async with client_for(Broken(env.store, None), views) as client:
        response = await client.get("/.tabiji/audit", params={"lang": "en"}, headers=AUDITOR)
    assert 'data-chain="unknown"' in response.text
    assert "has not been verified" in response.text


# --------------------------------------------------------------------------- the detail page


async def test_allowed_record_says_which_rule_of_which_policy(env: Env) -> None:
    """The detail page of an allowed request names the rule and the policy set in words."""
    record = env.records["allow"]
    response = await env.client.get(record_path(record), params={"lang": "en"}, headers=AUDITOR)
    assert response.status_code == 200
    text = words(response.text)
    assert "Allowed by rule staff-read of policy set sha256:abababababababab" in text
    assert "alice@town.example requested GET wiki.town.example/wiki/Home from device dev-a" in text
    assert env.views == [("erin", "audit.record", {"chain_id": CHAIN, "seq": record.seq})]


async def test_refused_record_explains_every_reason_from_the_catalogue(env: Env) -> None:
    """A refusal lists each reason code with its catalogue title and explanation, in Japanese."""
    record = env.records["deny"]
    response = await env.client.get(record_path(record), headers=AUDITOR)
    catalogue = load_catalogue()
    text = words(response.text)
    assert "拒否されました" in text
    for code in ("device-posture-stale", "group-missing"):
        assert f'data-code="{code}"' in response.text
        assert catalogue.get(code, "ja").title in text
        assert catalogue.get(code, "ja").explain in text


@pytest.mark.parametrize(
    ("name", "sentence"),
    [
        ("deny_rule", "Refused by the deny rule block-contractors of policy set sha256:"),
        ("malformed", "refused for safety before any policy ran"),
        ("error", "could not complete the request (status 504)"),
        ("admin", "admin@town.example performed the action session.revoke"),
    ],
)
async def test_each_kind_of_record_is_explained(env: Env, name: str, sentence: str) -> None:
    """Deny rules, refusals before any policy, errors and admin actions each read in words."""
    response = await env.client.get(
        record_path(env.records[name]), params={"lang": "en"}, headers=AUDITOR
    )
    assert sentence in words(response.text)


async def test_detail_page_shows_every_field_and_both_hashes(env: Env) -> None:
    """Every field of the record is listed with a label, and the hash and previous hash."""
    record = env.records["admin"]
    response = await env.client.get(record_path(record), headers=AUDITOR)
    for name in DETAIL_FIELDS:
        assert f'<dt data-field="{name}">' in response.text, name
    assert record.hash in response.text
    assert record.prev_hash in response.text
    assert '{"target": "bob@town.example"}' in words(response.text)
    assert f'href="/.tabiji/audit/record/{CHAIN}/{record.seq - 1}?lang=ja"' in response.text
    assert f'/record/{CHAIN}/{record.seq + 1}?lang=ja"' in response.text


async def test_last_record_has_no_next_link(env: Env) -> None:
    """The newest record of a chain links back but not forward."""
    record = env.records["hostile"]
    response = await env.client.get(record_path(record), headers=AUDITOR)
    assert f"/record/{CHAIN}/{record.seq + 1}" not in response.text
    assert 'rel="prev"' in response.text


async def test_hostile_values_are_escaped(env: Env) -> None:
    """Markup in a recorded path or e-mail is shown as text on the list and the detail page."""
    for path in ("/.tabiji/audit", record_path(env.records["hostile"])):
        response = await env.client.get(path, headers=AUDITOR)
        assert "<script>" not in response.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text


async def test_unknown_record_is_a_404_page_and_still_recorded(env: Env) -> None:
    """A record that does not exist answers 404 in words; looking for it is still recorded."""
    response = await env.client.get(f"/.tabiji/audit/record/{CHAIN}/999", headers=AUDITOR)
    assert response.status_code == 404
    assert load_catalogue().get("audit-record-not-found", "ja").title in response.text
    assert env.views == [("erin", "audit.record", {"chain_id": CHAIN, "seq": 999})]


# --------------------------------------------------------------------------- CSV export


def read_csv(body: bytes) -> list[dict[str, str]]:
    text = body.decode("utf-8")
    assert text.startswith("\ufeff")  # Excel in Japan needs the BOM to read UTF-8
    return list(csv.DictReader(io.StringIO(text[1:])))


async def test_csv_export_of_the_filter_is_an_attachment_and_recorded(env: Env) -> None:
    """The export holds exactly the filtered records, newest first, and is itself recorded."""
    response = await env.client.get(
        "/.tabiji/audit/export.csv", params={"route": "payroll"}, headers=AUDITOR
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="tabiji-audit-')
    assert response.headers["cache-control"] == "no-store"
    rows = read_csv(response.content)
    assert [(r["user_email"], r["decision"]) for r in rows] == [
        ("dave@town.example", "deny"),
        ("bob@town.example", "deny"),
    ]
    assert rows[1]["reasons"] == "device-posture-stale; group-missing"
    assert rows[1]["hash"] == env.records["deny"].hash
    assert rows[1]["time_utc"] == "2026-11-26T02:01:00.000000Z"
    assert env.views == [("erin", "audit.export", {**DEFAULT_RANGE, "route": "payroll"})]


async def test_list_page_links_to_the_export_of_its_filter(env: Env) -> None:
    """The list's "CSV export of this filter" link carries the same filter."""
    response = await env.client.get(
        "/.tabiji/audit", params={"decision": "deny", "user": "bob@town.example"}, headers=AUDITOR
    )
    link = re.search(r'<a href="(/\.tabiji/audit/export\.csv[^"]*)"', response.text)
    assert link is not None
    exported = await env.client.get(html.unescape(link.group(1)), headers=AUDITOR)
    assert [r["user_email"] for r in read_csv(exported.content)] == ["bob@town.example"]


async def test_csv_cells_cannot_start_a_formula(env: Env) -> None:
    """Cells starting with = + - @ (a spreadsheet formula) are prefixed with an apostrophe."""
    response = await env.client.get(
        "/.tabiji/audit/export.csv", params={"reason": "group-missing"}, headers=AUDITOR
    )
    hostile = read_csv(response.content)[0]
    assert hostile["user_email"] == '\'=HYPERLINK("http://evil.example")'
    assert hostile["device_id"] == "'@SUM(1+1)"
    assert hostile["route"] == "'+cmd"
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_cell(start + "1") == "'" + start + "1"
    assert csv_cell("a=1") == "a=1"
    assert csv_cell(None) == ""
    assert csv_cell(("a", "b")) == "a; b"


async def test_whole_export_is_complete_in_order(env: Env) -> None:
    """An unfiltered export contains every record once, newest first."""
    response = await env.client.get("/.tabiji/audit/export.csv", headers=AUDITOR)
    rows = read_csv(response.content)
    assert len(rows) == 107
    times = [int(r["time_us"]) for r in rows]
    assert times == sorted(times, reverse=True)


async def test_export_pages_correctly_across_records_with_the_same_time(tmp_path: Path) -> None:
    """Keyset paging yields every record exactly once even when many share one microsecond."""
    store = SqliteAuditStore(tmp_path / "ties.db")
    await store.open()
    try:
        chains = [Chain(f"tie:{n}:0") for n in range(3)]
        records = [
            chains[i % 3].seal(request_event(0 if i < 23 else 1 + i // 5, path=f"/{i}"))
            for i in range(40)
        ]
        await store.append_batch(records)
        reader = StoreReader(store, None)
        for chunk in (1, 4, 7, 50):
            got = [r async for r in export_records(reader, AuditFilter(), chunk)]
            keys = [(r.chain_id, r.seq) for r in got]
            assert len(keys) == 40, chunk
            assert set(keys) == {(r.chain_id, r.seq) for r in records}
            assert [r.time_us for r in got] == sorted((r.time_us for r in got), reverse=True)
    finally:
        await store.close()


async def test_export_is_not_shifted_by_records_written_meanwhile(tmp_path: Path) -> None:
    """Records committed while an export runs neither repeat nor hide the ones being exported
    (plain offset paging would repeat the rows pushed across each page boundary)."""
    store = SqliteAuditStore(tmp_path / "live.db")
    await store.open()
    try:
        chain = Chain("live:1:0")
        old = [chain.seal(request_event(i, path=f"/old/{i}")) for i in range(30)]
        await store.append_batch(old)
        reader = StoreReader(store, None)

        class Busy:
            """The real reader, with a burst of newer records written before each page."""

            async def query(self, f: AuditFilter, limit: int, offset: int = 0) -> list[AuditRecord]:
                burst = [chain.seal(request_event(500 + chain.seq)) for _ in range(3)]
                await store.append_batch(burst)
                return await reader.query(f, limit, offset)

        got = [r async for r in export_records(Busy(), AuditFilter(), 4)]  # type: ignore[arg-type]
        old_keys = {(r.chain_id, r.seq) for r in old}
        exported = [(r.chain_id, r.seq) for r in got]
        assert len(exported) == len(set(exported))  # nothing twice
        assert old_keys <= set(exported)  # nothing that existed at the start is missed
    finally:
        await store.close()


async def test_invalid_export_filter_gives_the_form_not_a_file(env: Env) -> None:
    """An export with a filter that does not parse answers the marked form (400), not a CSV."""
    response = await env.client.get(
        "/.tabiji/audit/export.csv", params={"until": "soon"}, headers=AUDITOR
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert env.views[-1][1] == "audit.view"


# --------------------------------------------------------------------------- the catalogue


def test_every_label_and_problem_has_catalogue_text() -> None:
    """Each `audit.` id the view and its templates use has ja/en text, and every one is used."""
    catalogue = load_catalogue()
    used = {f"audit.field.{name}" for name in DETAIL_FIELDS}
    used |= {f"audit.problem.{code}" for code in PROBLEMS}
    for template in TEMPLATES.glob("audit_*.html"):
        used |= set(re.findall(r"t\('(audit\.[a-z0-9_.-]+)'\)", template.read_text()))
    source = (Path(__file__).parents[2] / "gateway" / "web" / "audit_view.py").read_text()
    used |= set(re.findall(r'_text\(\s*"(audit\.[a-z0-9_.-]+)"', source))
    used |= set(re.findall(r'"(audit\.[a-z-]+\.[a-z0-9_.-]+)"', source))
    used |= {f"audit.decision.{d}" for d in ("allow", "deny", "error", "info")}
    used |= {f"audit.chart.{unit}{s}" for unit in ("minute", "hour", "day") for s in ("", "s")}
    missing = sorted(i for i in used if i not in catalogue)
    assert not missing, f"add to gateway/web/messages.yaml: {missing}"
    assert len(used) > 60
    # … and the other way round: no `audit.` entry that nothing uses (misspelt or stale).
    stray = sorted(i for i in catalogue.ids() if i.startswith("audit.") and i not in used)
    assert not stray, f"no code or template uses: {stray}"
