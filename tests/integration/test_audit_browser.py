"""The auditors' view in real headless Chromium: ja/en, the filter form, a record, no CSP errors.

The internal Starlette app with the audit routes runs under uvicorn on 127.0.0.1 in a thread,
against a real SQLite audit store; screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.requests import Request

from gateway.audit.chain import Chain
from gateway.audit.query import StoreReader
from gateway.audit.record import AuditEvent
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.pages import Pages
from gateway.web.audit_view import Viewer, audit_routes
from gateway.web.catalogue import load_catalogue
from gateway.web.endpoints import build_internal_app

from .conftest import REPO, free_port

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MINUTE = 60 * 1_000_000
POLICY = "sha256:" + "5e" * 32


def _browser_available() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = "Debian chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)  # CI installs it: missing there is a broken setup, not a skip
    pytest.skip(reason)


def _events(start_us: int) -> list[AuditEvent]:
    """Three hours of traffic: staff reading the wiki, refusals for bob and a stale laptop."""
    events = []
    for minute in range(0, 180, 3):
        refused = minute % 15 == 0
        events.append(
            AuditEvent(
                kind="request",
                time_us=start_us + minute * MINUTE,
                request_id=f"r{minute}",
                route="payroll" if refused else "wiki",
                method="GET",
                host="wiki.town.example",
                path=f"/page/{minute}",
                client_ip="192.0.2.7",
                user_email="bob@town.example" if refused else "alice@town.example",
                device_id="dev-old" if refused else "dev-alice",
                policy_hash=POLICY,
                rule=None if refused else "staff-read",
                decision="deny" if refused else "allow",
                reasons=("device-posture-stale", "group-missing") if refused else (),
                status=403 if refused else 200,
                latency_ms=2.25,
            )
        )
    return events


@dataclass
class AuditServer:
    """The audit routes served by uvicorn in a thread, and the views they recorded."""

    port: int
    views: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    failure: list[BaseException] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def recorded(self, action: str, **expected: object) -> bool:
        """Whether a view `action` was recorded whose detail holds `expected`."""
        return any(
            done == action and all(detail.get(k) == v for k, v in expected.items())
            for done, detail in self.views
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditServer]:
    running = AuditServer(free_port())
    db = tmp_path_factory.mktemp("audit") / "audit.db"
    pages = Pages(load_catalogue())
    now_us = time.time_ns() // 1000
    holder: dict[str, uvicorn.Server] = {}
    ready = threading.Event()

    async def access(request: Request) -> Viewer:
        return Viewer("https://idp.town.example", "erin", "erin@town.example", "監査 恵理")

    def record_view(viewer: Viewer, action: str, detail: Mapping[str, object]) -> None:
        running.views.append((action, dict(detail)))

    async def readiness() -> dict[str, Any]:
        return {"ready": True, "checks": {}}

    async def serve() -> None:
        store = SqliteAuditStore(db)
        await store.open()
        try:
            chain = Chain("gw-1:4242:1")
            await store.append_batch([chain.seal(e) for e in _events(now_us - 180 * MINUTE)])
            routes = audit_routes(
                reader=StoreReader(store, None),
                pages=pages,
                access=access,
                record_view=record_view,
            )
            app = build_internal_app(pages=pages, readiness=readiness, extra_routes=routes)
            config = uvicorn.Config(
                app, host="127.0.0.1", port=running.port, log_level="warning", lifespan="off"
            )
            holder["server"] = uvicorn.Server(config)
            ready.set()
            await holder["server"].serve()
        finally:
            ready.set()
            await store.close()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            running.failure.append(exc)

    thread = threading.Thread(target=run, name="audit-uvicorn", daemon=True)
    thread.start()
    ready.wait(30)
    deadline = time.monotonic() + 30
    while not (holder.get("server") and holder["server"].started):
        if running.failure or time.monotonic() > deadline:
            pytest.fail(f"the audit view did not start: {running.failure}")
        time.sleep(0.02)
    try:
        yield running
    finally:
        holder["server"].should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _browser_available()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, locale: str) -> tuple[Any, list[str]]:
    """A fresh page that collects console errors (a CSP violation is one)."""
    context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: Any) -> None:
        # A page answered with 4xx is reported as "Failed to load resource": not a CSP problem.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", on_console)
    return page, errors


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_list_in_japanese_with_charts_and_style(browser: Any, server: AuditServer) -> None:
    """A Japanese browser sees the list in Japanese, styled, with four charts and the chain OK."""
    page, errors = open_page(browser, "ja-JP")
    response = page.goto(server.url("/.tabiji/audit"))
    assert response.status == 200
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("h1").inner_text() == "監査ログ"
    assert page.locator("svg.chart").count() == 4
    assert page.locator("svg.chart-time rect.bar-deny").count() > 0
    assert page.locator('[data-chain="ok"]').count() == 1
    assert page.locator("table.records tbody tr").count() == 50
    # The stylesheet is admitted by its CSP hash: the audit layout and chart colours apply.
    width = page.locator("main").evaluate("e => getComputedStyle(e).maxWidth")
    assert width != "none"
    fill = page.locator("svg.chart-time rect.bar-deny").first.evaluate(
        "e => getComputedStyle(e).fill"
    )
    assert fill == "rgb(181, 82, 59)"
    shot(page, "audit-list-ja")
    assert errors == []
    page.context.close()


def test_list_in_english_and_language_switch(browser: Any, server: AuditServer) -> None:
    """An English browser sees English; the switch link turns the page Japanese."""
    page, errors = open_page(browser, "en-US")
    page.goto(server.url("/.tabiji/audit"))
    assert page.locator("h1").inner_text() == "Audit log"
    assert "Most refused users" in page.locator("section.charts").inner_text()
    shot(page, "audit-list-en")
    page.locator("a.lang-switch").click()
    page.wait_for_load_state()
    assert page.locator("html").get_attribute("lang") == "ja"
    assert "lang=ja" in page.url
    assert errors == []
    page.context.close()


def test_filter_form_then_record_detail(browser: Any, server: AuditServer) -> None:
    """The GET form filters to refusals; a row opens the record that says why, in words."""
    page, errors = open_page(browser, "en-US")
    page.goto(server.url("/.tabiji/audit"))
    page.select_option("select[name=decision]", "deny")
    page.fill("input[name=user]", "bob@town.example")
    page.locator("form.filters button[type=submit]").click()
    page.wait_for_load_state()
    assert "decision=deny" in page.url
    rows = page.locator("table.records tbody tr")
    assert rows.count() == 12
    decisions = {rows.nth(i).get_attribute("data-decision") for i in range(rows.count())}
    assert decisions == {"deny"}
    assert page.locator("select[name=decision]").input_value() == "deny"
    assert server.recorded("audit.view", decision="deny", user="bob@town.example", page=1)
    shot(page, "audit-list-filtered-en")

    rows.first.locator("td.time a").click()
    page.wait_for_load_state()
    assert "/.tabiji/audit/record/gw-1:4242:" in page.url
    verdict = page.locator("section.verdict").inner_text()
    assert "Refused" in verdict
    assert "bob@town.example requested GET" in verdict
    reason = page.locator('[data-code="device-posture-stale"]')
    assert reason.count() == 1
    assert load_catalogue().get("device-posture-stale", "en").title in reason.inner_text()
    assert page.locator('dd[data-field="hash"]').inner_text().strip()
    shot(page, "audit-record-en")
    assert errors == []
    page.context.close()


def test_csv_export_link_downloads_the_filter(browser: Any, server: AuditServer) -> None:
    """The export link downloads a CSV of the current filter, and the export is recorded."""
    page, errors = open_page(browser, "ja-JP")
    page.goto(server.url("/.tabiji/audit?decision=deny"))
    with page.expect_download() as download_info:
        page.locator("p.export a").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".csv")
    content = Path(download.path()).read_text("utf-8-sig").splitlines()
    assert content[0].startswith("time_utc,chain_id,seq,")
    assert len(content) == 1 + 12
    assert server.recorded("audit.export", decision="deny")
    assert errors == []
    page.context.close()


def test_record_detail_in_japanese(browser: Any, server: AuditServer) -> None:
    """An allowed record reads in Japanese: which rule of which policy set allowed it."""
    page, errors = open_page(browser, "ja-JP")
    response = page.goto(server.url("/.tabiji/audit/record/gw-1:4242:1/2"))
    assert response.status == 200
    verdict = page.locator("section.verdict").inner_text()
    assert "許可されました" in verdict
    assert "staff-read" in verdict
    assert POLICY[:16] in verdict
    shot(page, "audit-record-ja")
    assert errors == []
    page.context.close()
