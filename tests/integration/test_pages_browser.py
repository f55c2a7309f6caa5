"""Refusal pages in real headless Chromium: language, reasons, a CSP admitting only our style."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, Gateway, Upstream, free_port, gateway_config, route, run_gateway

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
# Flags for a closed network (no background calls home); as root no sandbox is available.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _browser_available() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = "Debian chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)  # CI installs it: missing there is a broken setup, not a skip
    pytest.skip(reason)


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A route without a policy (403) and a route to a dead upstream (502)."""

    def build(port: int) -> dict[str, Any]:
        frm = f"http://127.0.0.1:{port}"
        return gateway_config(
            port,
            [
                route("closed", frm + "/closed", f"http://127.0.0.1:{upstream.port}"),
                route("dead", frm + "/dead", f"http://127.0.0.1:{free_port()}", public=True),
            ],
        )

    with run_gateway(tmp_path_factory.mktemp("gw"), build) as running:
        yield running


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


def visit(browser: Any, url: str, locale: str, shot: str) -> tuple[Any, Any, list[str]]:
    """Open `url` in a fresh context; return the page, the response and console errors."""
    context = browser.new_context(locale=locale)
    page = context.new_page()
    errors: list[str] = []  # the context is closed with the browser at the module's end

    def on_console(message: Any) -> None:
        # Chromium reports the page's own 403/502 status as "Failed to load resource": expected.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", on_console)
    response = page.goto(url)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
    return page, response, errors


def test_refusal_page_in_japanese_with_reason_and_fix(browser: Any, gateway: Gateway) -> None:
    """A Japanese browser sees the refusal in Japanese first, with reason, fix and English."""
    page, response, errors = visit(browser, gateway.url("/closed/x"), "ja-JP", "refusal-ja")
    assert response.status == 403
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("h1").inner_text() == "アクセスが許可されていません"
    reason = page.locator('[data-code="route-not-public"]').first
    assert "アクセス方針の設定をご依頼ください" in reason.inner_text()
    assert "This system has no access policy yet" in page.locator("section.other").inner_text()
    assert page.locator(".ref code").first.inner_text() == response.headers["x-request-id"]
    # The inline stylesheet is allowed by its CSP hash: a mismatch would leave it unstyled.
    border = page.locator("main").evaluate("e => getComputedStyle(e).borderTopColor")
    assert border == "rgb(47, 93, 80)"
    assert errors == []  # no CSP violation, no script error


def test_error_page_in_english(browser: Any, gateway: Gateway) -> None:
    """An English browser sees the 502 page in English first, Japanese below."""
    page, response, errors = visit(browser, gateway.url("/dead/"), "en-US", "upstream-down-en")
    assert response.status == 502
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").inner_text() == "The system cannot be reached"
    assert "システムに接続できません" in page.locator("section.other").inner_text()
    assert errors == []


def test_page_cannot_be_framed(browser: Any, gateway: Gateway) -> None:
    """frame-ancestors 'none': another origin cannot show the gateway's page in a frame."""
    context = browser.new_context()
    page = context.new_page()
    page.set_content(f'<iframe src="{gateway.url("/closed/x")}"></iframe>')
    page.wait_for_timeout(500)
    frame = page.frames[-1]
    # Chromium replaces a refused frame with its own error document.
    assert frame.url.startswith("chrome-error://")
    assert "アクセスが許可されていません" not in frame.content()
    context.close()
