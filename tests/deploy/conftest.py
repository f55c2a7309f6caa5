"""Fixtures and helpers shared by the deployment tests: podman with a private containers.conf
(podman_env), the gateway image built once per run, and a demo user's sign-in as a browser does it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from html.parser import HTMLParser

import httpx
import pytest

from .podman_env import REPO, Podman, build_image, podman, podman_session  # noqa: F401

GATEWAY_IMAGE = "localhost/tabiji-test-gateway"
# The local debootstrap base (podman_env.ensure_base_image): no registry is reachable here.
TEST_BASE = os.environ.get("TABIJI_TEST_BASE_IMAGE", "localhost/bookworm-min")
BUILD_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def gateway_image(podman_session: Podman) -> str:  # noqa: F811 — the fixture imported above
    """deploy/Containerfile built once per test session on the local base.

    Kept afterwards under its fixed name as this machine's build cache (like the base image):
    the next session rebuilds only the layers whose inputs changed.
    """
    BUILD_SECONDS[GATEWAY_IMAGE] = build_image(
        podman_session,
        GATEWAY_IMAGE,
        REPO / "deploy" / "Containerfile",
        REPO,
        build_args={"BASE": TEST_BASE},
        keep=True,
    )
    return GATEWAY_IMAGE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, diagnose: Callable[[], str] = str
) -> float:
    """Poll `check` until true; returns the seconds it took, fails with `diagnose()` otherwise."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(f"{what} not within {timeout:.0f}s\n{diagnose()}")


class _Forms(HTMLParser):
    """Every form's named inputs and buttons, as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        fields = dict(attrs)
        if tag == "form":
            self.forms.append((fields.get("action") or "", {}))
        elif tag in ("input", "button") and self.forms and fields.get("name"):
            self.forms[-1][1][str(fields["name"])] = fields.get("value") or ""


def sign_in(
    browser: httpx.Client,
    start: str,
    username: str,
    password: str,
    otp: str = "",
    *,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """Open `start` through the gateway, get sent to the demo provider, submit its login form,
    and follow the redirects back (the client must follow redirects)."""
    page = browser.get(start, headers={"accept": "text/html", **(headers or {})})
    assert page.url.path == "/authorize", f"{page.status_code} {page.url}\n{page.text[:2000]}"
    parser = _Forms()
    parser.feed(page.text)
    assert parser.forms, page.text[:2000]
    action, form = parser.forms[-1]
    form.update(username=username, password=password, otp=otp)
    return browser.post(page.url.join(action or page.url.path), data=form)
