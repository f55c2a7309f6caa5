"""The report and certificate endpoints over HTTP against real stores: an accepted report is
answered with the device's status, its device-* reasons and their fixes in ja/en; every refusal
has its code, message and status; rate limits; certificate renewal with a single-use DPoP proof."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from http_world import ORIGIN, TRUSTED, Limits, World, world

from device_agent.report import PostureFacts, PostureReport, make_proof, sign_report
from gateway.state.ratelimit import RateLimiter

pytestmark = pytest.mark.anyio
GOOD = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=True)
REPORT = "/.tabiji/devices/report"
CERTIFICATE = "/.tabiji/devices/certificate"


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def report_token(
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    counter: int = 1,
    facts: PostureFacts = GOOD,
    issued_at: float | None = None,
) -> str:
    report = PostureReport(
        device_id=device_id,
        audience=ORIGIN,
        counter=counter,
        issued_at=int(time.time() if issued_at is None else issued_at),
        facts=facts,
        loopback_port=47801,
    )
    return sign_report(report, key)


async def approved_device(w: World) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """An approved laptop (its owner is trusted, so it was approved at confirmation)."""
    key = make_key()
    _, device_id = await w.enrolled(key, TRUSTED)
    return key, device_id


async def test_a_good_report_is_accepted_with_nothing_to_fix(tmp_path: Path) -> None:
    """A genuine report of a compliant device: accepted, approved, no reasons, next in 300 s."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        response = await w.post_jwt(REPORT, report_token(key, device_id))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "accepted": True,
            "device_id": device_id,
            "status": "approved",
            "reasons": [],
            "fixes": [],
            "next_report_in": 300,
        }
        stored = await w.registry.get(device_id)
        assert stored is not None
        assert stored.posture == GOOD
        assert stored.posture_counter == 1


async def test_a_bad_report_comes_back_with_reasons_and_fixes(tmp_path: Path) -> None:
    """An unencrypted disk and a firewall off: both reasons, each with ja/en title and fix."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        facts = PostureFacts(os="linux", disk_encrypted=False, firewall=False)
        response = await w.post_jwt(REPORT, report_token(key, device_id, facts=facts))
        answer = response.json()
        assert answer["accepted"] is True
        assert answer["reasons"] == ["device-disk-unencrypted", "device-firewall-off"]
        fix = answer["fixes"][0]
        assert fix["code"] == "device-disk-unencrypted"
        assert fix["title"]["ja"] == "この端末のディスクが暗号化されていません"
        assert fix["title"]["en"] == "This device's disk is not encrypted"
        assert "FileVault" in fix["fix"]["ja"]
        assert "FileVault" in fix["fix"]["en"]


async def test_a_pending_device_is_told_it_waits_for_approval(tmp_path: Path) -> None:
    """A pending device's report is stored; the answer says pending and device-not-approved."""
    async with world(tmp_path) as w:
        key = make_key()
        _, device_id = await w.enrolled(key)
        answer = (await w.post_jwt(REPORT, report_token(key, device_id))).json()
        assert answer["status"] == "pending"
        assert answer["reasons"] == ["device-not-approved"]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("forged", 403, "report-bad-signature"),
        ("replayed", 409, "report-replayed"),
        ("unknown", 404, "device-unknown"),
        ("skewed", 400, "report-clock-skew"),
        ("garbage", 400, "report-malformed"),
        ("huge", 413, "report-too-large"),
        ("revoked", 403, "device-revoked"),
    ],
)
async def test_refusals_have_their_code_message_and_status(
    tmp_path: Path, case: str, status: int, code: str
) -> None:
    """Each refusal answers {accepted: false, error, message{ja,en}} with its HTTP status."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        assert (await w.post_jwt(REPORT, report_token(key, device_id))).status_code == 200
        tokens = {
            "forged": report_token(make_key(), device_id, counter=2),
            "replayed": report_token(key, device_id, counter=1),
            "unknown": report_token(key, "dev-nobody", counter=2),
            "skewed": report_token(key, device_id, counter=2, issued_at=time.time() + 3600),
            "garbage": "not.a.jws",
            "huge": "a" * 17_000,
            "revoked": report_token(key, device_id, counter=2),
        }
        if case == "revoked":
            await w.registry.revoke(device_id, now=time.time(), actor="it@town.example")
        response = await w.post_jwt(REPORT, tokens[case])
        assert response.status_code == status
        answer = response.json()
        assert answer["accepted"] is False
        assert answer["error"] == code
        assert answer["message"]["ja"]
        assert answer["message"]["en"]
        stored = await w.registry.get(device_id)
        assert stored is not None
        assert stored.posture_counter == 1  # nothing stored by the refused report


async def test_reports_are_rate_limited_per_address(tmp_path: Path) -> None:
    """Past the address's budget a report gets 429 with Retry-After."""
    async with world(tmp_path, limits=Limits(report_address=RateLimiter(1, 1))) as w:
        key, device_id = await approved_device(w)
        assert (await w.post_jwt(REPORT, report_token(key, device_id))).status_code == 200
        limited = await w.post_jwt(REPORT, report_token(key, device_id, counter=2))
        assert limited.status_code == 429
        assert limited.json()["error"] == "device-rate-limited"
        assert limited.headers["retry-after"].isdigit()


async def test_only_verified_reports_spend_a_devices_budget(tmp_path: Path) -> None:
    """Forged reports naming a device cannot starve it; its own reports past the budget can."""
    async with world(tmp_path, limits=Limits(report_owner=RateLimiter(1, 1))) as w:
        key, device_id = await approved_device(w)
        for counter in (5, 6, 7):
            forged = await w.post_jwt(REPORT, report_token(make_key(), device_id, counter))
            assert forged.status_code == 403
        assert (await w.post_jwt(REPORT, report_token(key, device_id))).status_code == 200
        second = await w.post_jwt(REPORT, report_token(key, device_id, counter=2))
        assert second.status_code == 429


async def test_a_store_outage_is_a_503(tmp_path: Path) -> None:
    """With the device store gone, a report is refused 503 (fail closed), never accepted."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        await w.store.close()
        (tmp_path / "devices.db").unlink()
        (tmp_path / "devices.db").mkdir()  # the file is now a directory: nothing can open it
        response = await w.post_jwt(REPORT, report_token(key, device_id))
        assert response.status_code == 503
        assert response.json()["error"] == "device-registry-unavailable"


# -- certificate renewal --------------------------------------------------------------------------


def proof(key: ec.EllipticCurvePrivateKey, device_id: str, **changes: str) -> str:
    return make_proof(
        key,
        device_id=device_id,
        method=changes.get("method", "POST"),
        url=changes.get("url", ORIGIN + CERTIFICATE),
        now=time.time(),
    )


async def test_an_approved_device_renews_its_certificate(tmp_path: Path) -> None:
    """A fresh DPoP proof gets a new certificate for the device, recorded in the registry."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        response = await w.client.post(CERTIFICATE, headers={"DPoP": proof(key, device_id)})
        assert response.status_code == 200, response.text
        answer = response.json()
        verified = w.ca.verify(answer["certificate"], now=time.time())
        assert verified.device_id == device_id
        assert answer["ca"] == w.ca.ca_pem
        stored = await w.registry.get(device_id)
        assert stored is not None
        assert stored.cert_serial == verified.serial
        [record] = [r for r in w.audited("device.certificate") if r["renewal"]]
        assert record["device_id"] == device_id


async def test_a_renewal_proof_works_once(tmp_path: Path) -> None:
    """The same proof twice: the second is refused (its jti is in the shared replay cache)."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        token = proof(key, device_id)
        assert (await w.client.post(CERTIFICATE, headers={"DPoP": token})).status_code == 200
        replay = await w.client.post(CERTIFICATE, headers={"DPoP": token})
        assert replay.status_code == 401
        assert replay.json()["error"] == "proof-replayed"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"url": "https://elsewhere.example/.tabiji/devices/certificate"}, "proof-wrong-url"),
        ({"method": "GET"}, "proof-wrong-method"),
    ],
)
async def test_a_proof_for_another_request_is_refused(
    tmp_path: Path, changes: dict[str, str], code: str
) -> None:
    """A proof made for another URL or method does not renew anything."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        response = await w.client.post(
            CERTIFICATE, headers={"DPoP": proof(key, device_id, **changes)}
        )
        assert response.status_code == 401
        assert response.json()["error"] == code


async def test_renewal_needs_an_approved_device_and_its_key(tmp_path: Path) -> None:
    """No proof, another key's proof, a pending or a withdrawn device: no certificate."""
    async with world(tmp_path) as w:
        key, device_id = await approved_device(w)
        missing = await w.client.post(CERTIFICATE)
        assert (missing.status_code, missing.json()["error"]) == (401, "proof-missing")
        forged = await w.client.post(CERTIFICATE, headers={"DPoP": proof(make_key(), device_id)})
        assert forged.json()["error"] == "report-bad-signature"
        pending_key = make_key()
        _, pending_id = await w.enrolled(pending_key)
        pending = await w.client.post(CERTIFICATE, headers={"DPoP": proof(pending_key, pending_id)})
        assert (pending.status_code, pending.json()["error"]) == (403, "device-not-approved")
        await w.registry.revoke(device_id, now=time.time(), actor="it@town.example")
        revoked = await w.client.post(CERTIFICATE, headers={"DPoP": proof(key, device_id)})
        assert (revoked.status_code, revoked.json()["error"]) == (403, "device-revoked")
