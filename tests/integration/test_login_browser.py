"""A full login in real headless Chromium through the gateway (TLS) and the real test OpenID
Provider: the route host → the provider's login form → back on the route host with the upstream's
page; a Japanese deny page for a password-only login on the MFA route; logout through the
confirmation page. Screenshots go to test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.web.catalogue import load_catalogue

from .conftest import Upstream
from .identity_env import IdentityEnv, identity_env
from .test_pages_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _browser_available

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityEnv]:
    """One provider and one gateway (TLS) for the module."""
    with identity_env(tmp_path_factory.mktemp("idbrowser"), upstream) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, through playwright (never `playwright install`)."""
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


def _context(browser: Any, *, state: Any = None) -> Any:
    """A fresh browser profile in Japanese, CSP enforced. The TLS under test is the gateway's
    cookies (Secure, __Host-), not Chromium's trust store: the test CA is not installed there."""
    return browser.new_context(ignore_https_errors=True, locale="ja-JP", storage_state=state)


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _sign_in(env: IdentityEnv, page: Any, user: str, *, otp: bool, shot: str | None) -> None:
    """On the provider's login form: type the credentials, submit, allow consent if asked."""
    assert env.idp is not None
    person = env.idp.user(user)
    page.wait_for_selector("form#login")
    page.fill("#username", person.username)
    page.fill("#password", person.password)
    if otp and person.otp:
        page.fill("#otp", person.otp)
    if shot:
        _shot(page, shot)
    page.click("#submit")
    page.wait_for_load_state()

    if page.query_selector("form#consent") is not None:
        page.click("#allow")
        page.wait_for_load_state()


def test_full_login_in_chromium_lands_on_the_upstream_page(env: IdentityEnv, browser: Any) -> None:
    """tanaka opens a route host, signs in at the provider (password + OTP), and is back on the
    page he asked for, served by the upstream, with host-only Secure session cookies."""
    context = _context(browser)
    try:
        page = context.new_page()
        page.goto(env.h + "/docs/_up/page")
        assert env.idp is not None
        assert page.url.startswith(env.idp.issuer + "/")
        _sign_in(env, page, "tanaka", otp=True, shot="identity-idp-login.png")
        page.wait_for_url(env.h + "/docs/_up/page", timeout=10_000)
        assert page.title() == "page"
        _shot(page, "identity-upstream-page.png")
        cookies = {(c["name"], c["domain"]): c for c in context.cookies()}
        at_h = cookies[("__Host-tabiji-session", "localhost")]
        at_p = cookies[("__Host-tabiji-session", "127.0.0.1")]
        for cookie in (at_h, at_p):
            assert cookie["secure"] is True
            assert cookie["httpOnly"] is True
            assert cookie["sameSite"] == "Lax"
            assert cookie["path"] == "/"
        assert at_h["value"] != at_p["value"]
    finally:
        context.close()


def test_mfa_route_shows_a_japanese_deny_page_to_a_password_only_login(
    env: IdentityEnv, browser: Any
) -> None:
    """suzuki (password only) reaches the MFA route's deny page: 403, in Japanese, explaining
    mfa-required."""
    catalogue = load_catalogue()
    context = _context(browser)
    try:
        page = context.new_page()
        statuses: list[int] = []
        page.on(
            "response",
            lambda r: statuses.append(r.status) if r.url.startswith(env.h + "/mfa/") else None,
        )
        page.goto(env.h + "/mfa/records")
        _sign_in(env, page, "suzuki", otp=False, shot=None)
        page.wait_for_url(env.h + "/mfa/records")
        _shot(page, "identity-deny-mfa-required.png")
        text = page.inner_text("body")
        assert page.get_attribute("html", "lang") == "ja"
        assert catalogue.get("mfa-required", "ja").title in text
        assert statuses[-1] == 403
    finally:
        context.close()


def test_logout_through_the_confirmation_page_in_chromium(env: IdentityEnv, browser: Any) -> None:
    """A signed-in person confirms the logout on the gateway's page (CSP enforced): the provider
    confirms its own sign-out, the browser ends on P's logged-out page, and the route host sends
    it to the provider again."""
    assert env.idp is not None
    login = _context(browser)
    try:
        page = login.new_page()
        page.goto(env.h + "/logout-test")
        _sign_in(env, page, "suzuki", otp=False, shot=None)
        page.wait_for_url(env.h + "/logout-test")
        state = login.storage_state()
    finally:
        login.close()
    context = _context(browser, state=state)
    try:
        page = context.new_page()
        page.goto(env.h + "/.tabiji/logout")
        _shot(page, "identity-logout-confirm.png")
        page.click("form[action='/.tabiji/logout'] button[type=submit]")
        page.wait_for_url(env.idp.issuer + "/**", timeout=5000)
        if page.query_selector("form#op\\.logoutForm") is not None:
            page.click("button[name=logout][value=yes]")
        page.wait_for_url(env.p + "/.tabiji/logged-out*", timeout=5000)
        _shot(page, "identity-logged-out.png")
        names = {c["name"] for c in context.cookies() if c["domain"] == "localhost"}
        assert "__Host-tabiji-session" not in names
        page.goto(env.h + "/logout-test")
        assert page.url.startswith(env.idp.issuer + "/")
    finally:
        context.close()
