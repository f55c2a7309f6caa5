"""Attacks on the device endpoints from a page of a protected application.

The gateway answers /.tabiji/* on every host, so a script on a route host (an XSS in one of the
town's applications, or a hostile upstream) is same-origin with those paths and rides the
person's host session there. The enrolment confirmation and the IT admin page must therefore
answer on the public URL only: elsewhere their CSRF defence (Origin + session token) is void.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from http_world import ADMIN, SATO, World, hidden_fields, world

from gateway.identity.sessions import session_hash
from tests.gateway.devices.registry_helpers import Login

pytestmark = pytest.mark.anyio

APP = "wiki.town.example"
APP_ORIGIN = f"https://{APP}"


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def host_browser(w: World, login: Login) -> tuple[dict[str, str], str]:
    """The person's browser on the application's host (the host session the gateway set there),
    and the hash of its main session (what CSRF tokens are bound to)."""
    main_hash = session_hash(await w.session(login))
    host_cookie = await w.sessions.create_host(main_hash, APP, time.time())
    assert host_cookie is not None
    return {"cookie": f"{w.session_cookie}={host_cookie}"}, main_hash


def on_app(w: World) -> httpx.AsyncClient:
    """Requests as a script on the application's origin makes them (same-origin, credentialed)."""
    return httpx.AsyncClient(transport=w.client._transport, base_url=APP_ORIGIN)


async def test_a_page_of_an_application_cannot_confirm_an_attackers_enrolment(
    tmp_path: Path,
) -> None:
    """A script on a route host can neither read the confirm page's token nor post it: the
    attacker's key never becomes a device of the person browsing the application."""
    async with world(tmp_path) as w:
        attacker_key = make_key()
        ticket = (await w.enrol(attacker_key, hostname="sato-laptop")).json()
        browser, main_hash = await host_browser(w, SATO)
        async with on_app(w) as app:
            page = await app.get(
                "/.tabiji/devices/confirm", params={"code": ticket["user_code"]}, headers=browser
            )
            assert page.status_code == 404
            assert "csrf" not in hidden_fields(page.text)
            # Even with a token of the session (obtained elsewhere), a post there is refused.
            token = w.csrf.token(main_hash, "device-confirm")
            form = {"code": ticket["user_code"], "csrf": token, "lang": "ja"}
            done = await app.post(
                "/.tabiji/devices/confirm", data=form, headers={**browser, "origin": APP_ORIGIN}
            )
            assert done.status_code == 404
        assert await w.registry.list() == []
        poll = await w.poll(attacker_key, ticket["enrolment_id"])
        assert poll.json() == {"status": "waiting-for-user"}


async def test_the_public_url_still_confirms(tmp_path: Path) -> None:
    """The same person on the gateway's public URL confirms as before (the fix is host-scoped)."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.owner_subject == SATO.subject


async def test_a_page_of_an_application_cannot_use_the_admin_page(tmp_path: Path) -> None:
    """An IT admin browsing an application: a script there can neither list the devices nor
    approve the attacker's pending one, even with the admin session's CSRF token."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        browser, main_hash = await host_browser(w, ADMIN)
        form = {"csrf": w.csrf.token(main_hash, "device-admin"), "lang": "ja"}
        async with on_app(w) as app:
            listing = await app.get("/.tabiji/devices", headers=browser)
            assert listing.status_code == 404
            assert device_id not in listing.text
            detail = await app.get(f"/.tabiji/devices/device/{device_id}", headers=browser)
            assert detail.status_code == 404
            approve = await app.post(
                f"/.tabiji/devices/device/{device_id}/approve",
                data=form,
                headers={**browser, "origin": APP_ORIGIN},
            )
            assert approve.status_code == 404
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "pending"
        assert w.audited("device.approve") == []
