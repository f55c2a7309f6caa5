"""The device pages in real headless Chromium: a person confirms "this is my computer" (ja and en)
and IT approves the pending device by clicking on the admin page (ja and en), with no CSP error.

The device endpoints run under uvicorn on 127.0.0.1 in a thread, over real stores (SQLite device
store behind the registry, SQLite state store, the device CA); the agent's side is plain HTTP.
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import sign_enrolment
from gateway.devices.model import DeviceRecord
from tests.gateway.devices.http_world import ADMIN, SATO, Login, World, world

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
T = TypeVar("T")


def _browser_available() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = "Debian chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class DeviceServer:
    """The device endpoints served by uvicorn in a thread (their own event loop)."""

    port: int
    loop: asyncio.AbstractEventLoop | None = None
    world: World | None = None
    failure: list[BaseException] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (its stores belong there) and wait for it."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def session(self, login: Login) -> str:
        assert self.world is not None
        return self.run(self.world.session(login))

    def device(self, device_id: str) -> DeviceRecord | None:
        assert self.world is not None
        return self.run(self.world.registry.get(device_id))

    def enrol(self, hostname: str) -> dict[str, Any]:
        """What the agent does: a signed enrolment request; the answer (user code, …)."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = {"hostname": hostname, "serial": "PF3ABC12", "os": "linux", "key_storage": "tpm"}
        token = sign_enrolment(key, request=request, audience=self.origin, now=time.time())
        response = httpx.post(
            f"{self.origin}/.tabiji/devices/enroll",
            content=token,
            headers={"content-type": "application/jwt"},
        )
        assert response.status_code == 201, response.text
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceServer]:
    running = DeviceServer(free_port())
    directory = tmp_path_factory.mktemp("devices")
    holder: dict[str, uvicorn.Server] = {}

    async def serve() -> None:
        async with world(directory, origin=running.origin) as w:
            running.world = w
            running.loop = asyncio.get_running_loop()
            config = uvicorn.Config(
                w.app, host="127.0.0.1", port=running.port, log_level="warning", lifespan="off"
            )
            holder["server"] = uvicorn.Server(config)
            await holder["server"].serve()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            running.failure.append(exc)

    thread = threading.Thread(target=run, name="devices-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (holder.get("server") and holder["server"].started):
        if running.failure or time.monotonic() > deadline:
            pytest.fail(f"the device endpoints did not start: {running.failure}")
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


def signed_in_page(
    browser: Any, server: DeviceServer, login: Login, locale: str
) -> tuple[Any, list[str]]:
    """A fresh browser signed in as `login` (its session cookie set), collecting console errors."""
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    assert server.world is not None
    context.add_cookies(
        [
            {
                "name": server.world.session_cookie,
                "value": server.session(login),
                "url": server.origin,
            }
        ]
    )
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


def test_confirm_in_japanese(browser: Any, server: DeviceServer) -> None:
    """A Japanese browser sees the computer in words and confirms it: pending for IT."""
    answer = server.enrol("yamada-pc")
    page, page_errors = signed_in_page(browser, server, SATO, "ja-JP")
    response = page.goto(answer["confirm_url"])
    assert response.status == 200
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("h1").inner_text() == "この端末を登録しますか？"
    facts = page.locator("dl.device").inner_text()
    assert "yamada-pc" in facts
    assert "PF3ABC12" in facts
    assert "セキュリティチップ（TPM、未確認）" in facts
    assert "sato@town.example" in facts
    # The stylesheet is admitted by its CSP hash: the button is styled.
    colour = page.locator("button.button").evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour == "rgb(47, 93, 80)"
    shot(page, "device-confirm-ja")
    page.locator("button.button").click()
    page.wait_for_load_state()
    assert "/.tabiji/devices/enrolled?device=" in page.url
    heading = page.locator("h1")
    assert heading.get_attribute("data-status") == "pending"
    assert "承認待ち" in heading.inner_text()
    shot(page, "device-enrolled-pending-ja")
    assert page_errors == []
    page.context.close()


def test_confirm_in_english(browser: Any, server: DeviceServer) -> None:
    """An English browser sees English; typing the code by hand works too."""
    answer = server.enrol("sato-laptop")
    page, page_errors = signed_in_page(browser, server, SATO, "en-US")
    page.goto(f"{server.origin}/.tabiji/devices/confirm")
    assert page.locator("h1").inner_text() == "Enter the enrolment code"
    page.fill("input[name=code]", answer["user_code"].lower())
    page.locator("button.button").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Register this computer?"
    assert "Security chip (TPM, not verified)" in page.locator("dl.device").inner_text()
    shot(page, "device-confirm-en")
    page.locator("button.button").click()
    page.wait_for_load_state()
    assert "Registration received" in page.locator("h1").inner_text()
    assert page_errors == []
    page.context.close()


def test_it_approves_a_pending_device_by_clicking(browser: Any, server: DeviceServer) -> None:
    """On the admin page (ja) the pending device leads the list; IT opens it and approves it."""
    answer = server.enrol("suzuki-pc")
    staff, _ = signed_in_page(browser, server, SATO, "ja-JP")
    staff.goto(answer["confirm_url"])
    staff.locator("button.button").click()
    staff.wait_for_load_state()
    device_id = staff.url.split("device=", 1)[1].split("&", 1)[0]
    staff.context.close()

    page, page_errors = signed_in_page(browser, server, ADMIN, "ja-JP")
    response = page.goto(f"{server.origin}/.tabiji/devices")
    assert response.status == 200
    assert page.locator("h1").inner_text() == "端末の管理"
    first = page.locator("table.devices tbody tr").first
    assert first.get_attribute("data-status") == "pending"
    shot(page, "devices-admin-list-ja")
    page.locator(f'tr[data-device="{device_id}"] td.hostname a').click()
    page.wait_for_load_state()
    assert "suzuki-pc" in page.locator("h1").inner_text()
    assert page.locator("h1 .badge").get_attribute("data-status") == "pending"
    assert page.locator('[data-code="device-not-approved"]').count() == 1
    shot(page, "devices-admin-detail-pending-ja")
    page.locator("form.approve button").click()
    page.wait_for_load_state()
    assert page.locator("h1 .badge").get_attribute("data-status") == "approved"
    assert page.locator(".notice").inner_text() == "端末を承認しました。"
    shot(page, "devices-admin-detail-approved-ja")
    device = server.device(device_id)
    assert device is not None
    assert device.status == "approved"
    assert page_errors == []
    page.context.close()


def test_admin_page_in_english_and_revoke(browser: Any, server: DeviceServer) -> None:
    """In English the admin page reads in English; revoking asks first, then withdraws."""
    answer = server.enrol("tanaka-pc")
    staff, _ = signed_in_page(browser, server, SATO, "en-US")
    staff.goto(answer["confirm_url"])
    staff.locator("button.button").click()
    staff.wait_for_load_state()
    device_id = staff.url.split("device=", 1)[1].split("&", 1)[0]
    staff.context.close()

    page, page_errors = signed_in_page(browser, server, ADMIN, "en-US")
    page.goto(f"{server.origin}/.tabiji/devices?status=pending")
    assert page.locator("h1").inner_text() == "Devices"
    assert "Waiting for approval" in page.locator("table.devices").inner_text()
    shot(page, "devices-admin-list-en")
    page.locator(f'tr[data-device="{device_id}"] td.hostname a').click()
    page.wait_for_load_state()
    page.locator("a.revoke").click()
    page.wait_for_load_state()
    assert "Withdraw this device's registration?" in page.locator(".revoke-confirm").inner_text()
    shot(page, "devices-admin-revoke-confirm-en")
    page.locator(".revoke-confirm button").click()
    page.wait_for_load_state()
    assert page.locator("h1 .badge").get_attribute("data-status") == "revoked"
    device = server.device(device_id)
    assert device is not None
    assert device.status == "revoked"
    shot(page, "devices-admin-detail-revoked-en")
    assert page_errors == []
    page.context.close()
