"""The IT admin page over HTTP against real stores: guarded by its policy, the list (pending
first, filters), one device in words, and approve / revoke / tag by POST with CSRF and Origin
checks, each action an audit record."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from http_world import ADMIN, ORIGIN, SATO, TRUSTED, World, hidden_fields, world

from device_agent.report import PostureFacts, PostureReport, sign_report
from gateway.identity.sessions import session_hash

pytestmark = pytest.mark.anyio
BASE = "/.tabiji/devices"


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def admin_page(w: World, path: str, **params: str) -> tuple[dict[str, str], str]:
    """An admin's browser and the page at `path` (200 expected)."""
    browser = await w.login(ADMIN)
    page = await w.client.get(path, params=params, headers=browser)
    assert page.status_code == 200, page.text
    return browser, page.text


async def post(
    w: World, path: str, browser: dict[str, str], form: dict[str, str], origin: str = ORIGIN
) -> int:
    response = await w.client.post(path, data=form, headers={**browser, "origin": origin})
    return response.status_code


async def test_the_page_needs_the_admin_policy(tmp_path: Path) -> None:
    """Not signed in → the login; signed in without the policy's group → 403 with the reason."""
    async with world(tmp_path) as w:
        anonymous = await w.client.get(BASE)
        assert anonymous.status_code == 302
        assert anonymous.headers["location"].startswith("/.tabiji/login?rd=")
        staff = await w.client.get(BASE, headers=await w.login(SATO))
        assert staff.status_code == 403
        assert "group-missing" in staff.text
        _, text = await admin_page(w, BASE)
        assert "端末の管理" in text


async def test_the_list_puts_pending_devices_first_and_filters(tmp_path: Path) -> None:
    """Pending devices lead the list; status and owner filters narrow it; a bad filter is 400."""
    async with world(tmp_path) as w:
        _, approved_id = await w.enrolled(make_key(), TRUSTED)
        _, pending_id = await w.enrolled(make_key(), SATO, hostname="sato-pc")
        browser, text = await admin_page(w, BASE)
        assert text.index(pending_id) < text.index(approved_id)
        assert "承認待ち" in text
        _, only_pending = await admin_page(w, BASE, status="pending")
        assert pending_id in only_pending
        assert approved_id not in only_pending
        _, by_owner = await admin_page(w, BASE, owner="KATO@")
        assert approved_id in by_owner
        assert pending_id not in by_owner
        bad = await w.client.get(BASE, params={"status": "lost"}, headers=browser)
        assert bad.status_code == 400
        _, english = await admin_page(w, BASE, lang="en")
        assert "<h1>Devices</h1>" in english
        assert "Waiting for approval" in english


async def test_the_detail_page_tells_the_device_in_words(tmp_path: Path) -> None:
    """Owner, hostname, serial, key storage, certificate expiry, posture age and what fails."""
    async with world(tmp_path) as w:
        key = make_key()
        enrolment_id, device_id = await w.enrolled(key, TRUSTED, serial="SN-42")
        await w.poll(key, enrolment_id)  # the agent collects its certificate
        facts = PostureFacts(os="linux", os_name="Debian GNU/Linux 12", disk_encrypted=False)
        report = PostureReport(device_id, ORIGIN, 1, int(time.time()), facts)
        accepted = await w.post_jwt("/.tabiji/devices/report", sign_report(report, key))
        assert accepted.status_code == 200
        _, text = await admin_page(w, f"{BASE}/device/{device_id}")
        assert "kato@town.example" in text
        assert "SN-42" in text
        assert "ディスク上のファイル（ソフトウェア）" in text
        assert "Debian GNU/Linux 12" in text
        assert "たった今" in text
        assert 'data-code="device-disk-unencrypted"' in text
        assert 'data-code="device-posture-unknown"' in text  # the firewall was not reported
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.cert_not_after is not None
        assert time.strftime("%Y-", time.gmtime(device.cert_not_after)) in text
        _, english = await admin_page(w, f"{BASE}/device/{device_id}", lang="en")
        assert "A file on the disk (software)" in english
        assert "disk is not encrypted" in english
        missing = await w.client.get(f"{BASE}/device/dev-nothing", headers=await w.login(ADMIN))
        assert missing.status_code == 404


async def test_approve_needs_csrf_and_same_origin(tmp_path: Path) -> None:
    """Without the token or from another origin nothing changes; with both the device is
    approved and the action recorded with the admin as actor."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        browser, text = await admin_page(w, f"{BASE}/device/{device_id}")
        form = hidden_fields(text)
        action = f"{BASE}/device/{device_id}/approve"
        assert await post(w, action, browser, {"lang": "ja"}) == 403
        assert await post(w, action, browser, form, origin="https://evil.example") == 403
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "pending"
        assert w.audited("device.approve") == []
        assert await post(w, action, browser, form) == 303
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "approved"
        assert device.actor == "it@town.example"
        [record] = w.audited("device.approve")
        assert record["device_id"] == device_id
        assert [who for done, _, who in w.audit if done == "device.approve"] == ["it@town.example"]
        _, after = await admin_page(w, f"{BASE}/device/{device_id}", done="approved")
        assert "端末を承認しました。" in after


async def test_a_non_admin_cannot_post_actions(tmp_path: Path) -> None:
    """The guard refuses a staff member's POST, even with a valid token of their own session."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        browser = await w.login(SATO)
        session = browser["cookie"].split("=", 1)[1]
        token = w.csrf.token(session_hash(session), "device-admin")
        status = await post(w, f"{BASE}/device/{device_id}/approve", browser, {"csrf": token})
        assert status == 403
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "pending"


async def test_revoke_asks_first(tmp_path: Path) -> None:
    """The revoke link opens a confirmation; only its form (confirm=yes, with the CSRF token)
    withdraws the device."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key(), TRUSTED)
        browser, text = await admin_page(w, f"{BASE}/device/{device_id}/revoke")
        assert "この端末の登録を取り消しますか？" in text
        form = hidden_fields(text)
        assert form["confirm"] == "yes"
        action = f"{BASE}/device/{device_id}/revoke"
        unconfirmed = {key: value for key, value in form.items() if key != "confirm"}
        assert await post(w, action, browser, unconfirmed) == 400
        no_token = {key: value for key, value in form.items() if key != "csrf"}
        assert await post(w, action, browser, no_token) == 403
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "approved"
        assert await post(w, action, browser, form) == 303
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "revoked"
        [record] = w.audited("device.revoke")
        assert record["device_id"] == device_id
        assert record["status"] == "revoked"


async def test_tags_are_replaced_and_checked(tmp_path: Path) -> None:
    """Tags typed with spaces or commas replace the device's; an invalid tag is refused."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key(), TRUSTED)
        browser, text = await admin_page(w, f"{BASE}/device/{device_id}")
        form = hidden_fields(text)
        action = f"{BASE}/device/{device_id}/tags"
        assert await post(w, action, browser, {**form, "tags": "lgwan, Finance"}) == 303
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.tags == frozenset({"lgwan", "finance"})
        assert w.audited("device.tag")[0]["tags"] == "finance lgwan"
        assert await post(w, action, browser, {**form, "tags": "bad/tag"}) == 400
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.tags == frozenset({"lgwan", "finance"})
