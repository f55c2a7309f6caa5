"""Enrolment over HTTP against real stores: the agent's signed request, the person's confirmation
in the browser (session, CSRF, single-use code), auto-approval by policy, the agent's poll for
its certificate, rate limits and expiry, each step an audit record."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from http_world import ADMIN, ORIGIN, SATO, TRUSTED, Limits, hidden_fields, world

from device_agent.keys import open_key_store
from device_agent.report import (
    ENROL_TYPE,
    canonical_json,
    key_thumbprint,
    public_jwk,
    sign_enrolment,
)
from gateway.devices.attestation import AttestationVerifier, attestation_nonce
from gateway.devices.enrollment import (
    CODE_ALPHABET,
    code_key,
    expire_pending,
    new_user_code,
    normalise_code,
)
from gateway.state.ratelimit import RateLimiter
from tests import swtpm_fixture
from tests.swtpm_fixture import Swtpm

pytestmark = pytest.mark.anyio
CODE = re.compile(rf"[{CODE_ALPHABET}]{{4}}-[{CODE_ALPHABET}]{{4}}")


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_user_codes_use_the_unambiguous_alphabet() -> None:
    """Codes are 8 consonants shown XXXX-XXXX; typed in any case or spacing they normalise."""
    code = new_user_code()
    assert CODE.fullmatch(code)
    assert normalise_code(code.lower().replace("-", " ")) == code.replace("-", "")
    assert normalise_code("AAAA-AAAA") is None  # vowels are not in the alphabet
    assert normalise_code("BCDF-GHJ") is None
    assert code_key("BCDFGHJK") != "BCDFGHJK"  # the store sees a hash, never the code


async def test_enrol_answers_a_code_and_records_it(tmp_path: Path) -> None:
    """A signed request gets 201 with a user code, the confirm URL and the poll timing."""
    async with world(tmp_path) as w:
        key = make_key()
        response = await w.enrol(key)
        assert response.status_code == 201, response.text
        answer = response.json()
        assert CODE.fullmatch(answer["user_code"])
        assert answer["confirm_url"] == (
            f"{ORIGIN}/.tabiji/devices/confirm?code={answer['user_code']}"
        )
        assert answer["poll_interval"] == 2
        assert answer["expires_in"] == 900
        assert "credential" not in answer
        assert response.headers["cache-control"] == "no-store"
        [record] = w.audited("device.enrol")
        assert record["thumbprint"] == key_thumbprint(key.public_key())
        assert record["hostname"] == "sato-laptop"


async def test_enrol_signed_by_another_key_than_its_jwk_is_refused(tmp_path: Path) -> None:
    """A forged proof of possession (jwk of one key, signature of another) is refused."""
    async with world(tmp_path) as w:
        claimed, signer = make_key(), make_key()
        public = claimed.public_key()
        claims = {
            "hostname": "x",
            "serial": "",
            "os": "linux",
            "key_storage": "software",
            "aud": ORIGIN,
            "iat": int(time.time()),
        }
        headers = {"typ": ENROL_TYPE, "kid": key_thumbprint(public), "jwk": public_jwk(public)}
        forged = jwt.api_jws.encode(canonical_json(claims), signer, "ES256", headers=headers)
        response = await w.post_jwt("/.tabiji/devices/enroll", forged)
        assert response.status_code == 400
        assert response.json()["error"] == "report-bad-signature"
        assert set(response.json()["message"]) == {"ja", "en"}
        assert w.audited("device.enrol") == []


@pytest.mark.parametrize(
    ("request_fields", "code"),
    [
        ({"hostname": "h" * 101}, "enrol-malformed"),
        ({"hostname": "bad\nname"}, "enrol-malformed"),
        ({"hostname": ""}, "enrol-malformed"),
        ({"serial": "s" * 101}, "enrol-malformed"),
        ({"os": "beos"}, "enrol-malformed"),
        ({"key_storage": "hsm"}, "enrol-malformed"),
        ({"attestation": "not-an-object"}, "enrol-malformed"),
        ({"extra": "member"}, "enrol-malformed"),
    ],
)
async def test_enrol_facts_are_checked(
    tmp_path: Path, request_fields: dict[str, object], code: str
) -> None:
    """Hostname and serial are printable and at most 100 characters; unknown members refused."""
    async with world(tmp_path) as w:
        response = await w.enrol(make_key(), **request_fields)
        assert response.status_code == 400
        assert response.json()["error"] == code


async def test_enrol_for_another_gateway_or_stale_is_refused(tmp_path: Path) -> None:
    """A request for another audience, or signed long ago, is refused with its code."""
    async with world(tmp_path) as w:
        key = make_key()
        other = sign_enrolment(
            key,
            request={"hostname": "h", "os": "linux", "key_storage": "software"},
            audience="https://elsewhere.example",
            now=time.time(),
        )
        response = await w.post_jwt("/.tabiji/devices/enroll", other)
        assert response.json()["error"] == "report-wrong-audience"
        old = await w.enrol(key, now=time.time() - 3600)
        assert old.status_code == 400
        assert old.json()["error"] == "report-expired"


async def test_enrol_body_rules(tmp_path: Path) -> None:
    """The body must be application/jwt and small: otherwise 415 / 413."""
    async with world(tmp_path) as w:
        wrong = await w.client.post(
            "/.tabiji/devices/enroll", content="x", headers={"content-type": "text/plain"}
        )
        assert wrong.status_code == 415
        assert wrong.json()["error"] == "report-malformed"
        huge = await w.post_jwt("/.tabiji/devices/enroll", "a" * 20_000)
        assert huge.status_code == 413
        assert huge.json()["error"] == "report-too-large"


async def test_a_key_already_enrolled_is_refused(tmp_path: Path) -> None:
    """Enrolling a key the registry already holds answers 409."""
    async with world(tmp_path) as w:
        key = make_key()
        await w.enrolled(key)
        again = await w.enrol(key)
        assert again.status_code == 409
        assert again.json()["error"] == "device-key-already-enrolled"


async def test_poll_before_confirmation_waits(tmp_path: Path) -> None:
    """Until the person confirms, the poll answers 202 waiting-for-user."""
    async with world(tmp_path) as w:
        key = make_key()
        answer = (await w.enrol(key)).json()
        poll = await w.poll(key, answer["enrolment_id"])
        assert poll.status_code == 202
        assert poll.json() == {"status": "waiting-for-user"}


async def test_poll_by_another_key_or_for_nothing_is_refused(tmp_path: Path) -> None:
    """Only the enrolling key may poll its enrolment; an unknown enrolment has expired."""
    async with world(tmp_path) as w:
        key = make_key()
        answer = (await w.enrol(key)).json()
        stranger = await w.poll(make_key(), answer["enrolment_id"])
        assert stranger.status_code == 403
        assert stranger.json()["error"] == "enrolment-refused"
        unknown = await w.poll(key, "no-such-enrolment")
        assert unknown.status_code == 410
        assert unknown.json()["error"] == "enrolment-expired"


async def test_confirm_without_a_session_redirects_to_login(tmp_path: Path) -> None:
    """Not signed in: GET and POST go to the login, which comes back to the confirm page."""
    async with world(tmp_path) as w:
        answer = (await w.enrol(make_key())).json()
        page = await w.client.get("/.tabiji/devices/confirm", params={"code": answer["user_code"]})
        assert page.status_code == 302
        location = urlsplit(page.headers["location"])
        assert location.path == "/.tabiji/login"
        back = parse_qs(location.query)["rd"][0]
        assert back == f"/.tabiji/devices/confirm?code={answer['user_code']}"
        posted = await w.client.post(
            "/.tabiji/devices/confirm", data={"code": answer["user_code"], "csrf": "x"}
        )
        assert posted.status_code == 302
        assert posted.headers["location"].startswith("/.tabiji/login?rd=")


async def test_confirm_page_shows_the_device_in_words(tmp_path: Path) -> None:
    """The page names the computer, its serial, OS and key storage, in Japanese by default and
    in English on request, with the "this is my computer" button."""
    async with world(tmp_path) as w:
        answer = (await w.enrol(make_key(), hostname="satō-pc", key_storage="tpm")).json()
        browser = await w.login()
        page = await w.client.get(
            "/.tabiji/devices/confirm", params={"code": answer["user_code"]}, headers=browser
        )
        assert page.status_code == 200
        assert "これは私のパソコンです" in page.text
        assert "satō-pc" in page.text
        assert "PF3ABC12" in page.text
        assert "セキュリティチップ（TPM、未確認）" in page.text  # claimed, not attested
        assert "Linux" in page.text
        english = await w.client.get(
            "/.tabiji/devices/confirm",
            params={"code": answer["user_code"].lower(), "lang": "en"},
            headers=browser,
        )
        assert "This is my computer" in english.text
        assert "Security chip (TPM, not verified)" in english.text
        assert "sato@town.example" in english.text
        assert "content-security-policy" in english.headers


async def test_confirm_page_shows_the_code_the_agent_shows(tmp_path: Path) -> None:
    """The page shows the code as the agent prints it (XXXX-XXXX, labelled as the agent labels
    it), however the code was typed into the address, so the person can compare the two."""
    async with world(tmp_path) as w:
        shown = (await w.enrol(make_key())).json()["user_code"]
        browser = await w.login()
        typed = shown.lower().replace("-", " ")
        page = await w.client.get(
            "/.tabiji/devices/confirm", params={"code": typed}, headers=browser
        )
        assert page.status_code == 200
        assert f'<dt>確認コード</dt><dd class="mono">{shown}</dd>' in page.text
        english = await w.client.get(
            "/.tabiji/devices/confirm", params={"code": shown, "lang": "en"}, headers=browser
        )
        assert f'<dt>Confirmation code</dt><dd class="mono">{shown}</dd>' in english.text


async def test_confirm_without_a_code_asks_for_one(tmp_path: Path) -> None:
    """Opened without a code, the page asks the person to type the one the agent shows."""
    async with world(tmp_path) as w:
        page = await w.client.get("/.tabiji/devices/confirm", headers=await w.login())
        assert page.status_code == 200
        assert "登録コードを入力してください" in page.text
        assert 'name="code"' in page.text


async def test_confirm_without_csrf_or_from_elsewhere_is_refused(tmp_path: Path) -> None:
    """A POST without the session's token, or from another origin, is 403 and binds nothing."""
    async with world(tmp_path) as w:
        key = make_key()
        answer = (await w.enrol(key)).json()
        browser = await w.login()
        form = await w.confirm_form(browser, answer["user_code"])
        missing = await w.confirm(browser, {"code": form["code"]})
        assert missing.status_code == 403
        cross = await w.confirm(browser, form, origin="https://evil.example")
        assert cross.status_code == 403
        other_session = await w.login(TRUSTED)
        stolen = await w.confirm(other_session, form)  # a token from another session
        assert stolen.status_code == 403
        assert await w.store.by_thumbprint(key_thumbprint(key.public_key())) is None
        # The code was not spent by the refused attempts: the real confirmation still works.
        assert (await w.confirm(browser, form)).status_code == 303


async def test_confirm_creates_a_pending_device_for_the_person(tmp_path: Path) -> None:
    """Confirmed by a user the auto-approve policy does not cover: pending, owned by them."""
    async with world(tmp_path) as w:
        key = make_key()
        enrolment_id, device_id = await w.enrolled(key)
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "pending"
        assert device.owner == (SATO.issuer, SATO.subject)
        assert device.owner_email == SATO.email
        assert device.key_storage == "software"
        assert device.key_thumbprint == key_thumbprint(key.public_key())
        assert device.hostname == "sato-laptop"
        poll = await w.poll(key, enrolment_id)
        assert poll.status_code == 200
        assert poll.json() == {"status": "pending", "device_id": device_id}
        [confirmed] = w.audited("device.confirm")
        assert confirmed["device_id"] == device_id
        assert confirmed["status"] == "pending"
        assert w.audited("device.approve") == []


async def test_auto_approved_device_gets_its_certificate(tmp_path: Path) -> None:
    """A user the policy trusts is approved at once; the poll hands out a CA-signed certificate,
    the same one on a repeated poll, recorded in the registry."""
    async with world(tmp_path) as w:
        key = make_key()
        enrolment_id, device_id = await w.enrolled(key, TRUSTED)
        first = await w.poll(key, enrolment_id)
        assert first.status_code == 200
        answer = first.json()
        assert answer["status"] == "approved"
        assert answer["device_id"] == device_id
        assert answer["ca"] == w.ca.ca_pem
        verified = w.ca.verify(answer["certificate"], now=time.time())
        assert verified.device_id == device_id
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "approved"
        assert device.cert_serial == verified.serial
        again = await w.poll(key, enrolment_id)
        assert again.json()["certificate"] == answer["certificate"]
        [approved] = w.audited("device.approve")
        assert approved["device_id"] == device_id
        assert approved["auto"] is True
        assert len(w.audited("device.certificate")) == 1


async def test_enrolled_page_is_for_the_owner_only(tmp_path: Path) -> None:
    """After confirming, the owner sees the device waiting for IT; anyone else sees nothing."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        owner = await w.client.get(
            "/.tabiji/devices/enrolled", params={"device": device_id}, headers=await w.login()
        )
        assert owner.status_code == 200
        assert 'data-status="pending"' in owner.text
        assert "承認待ち" in owner.text
        other = await w.client.get(
            "/.tabiji/devices/enrolled", params={"device": device_id}, headers=await w.login(ADMIN)
        )
        assert other.status_code == 404


async def test_a_code_works_once(tmp_path: Path) -> None:
    """A replayed confirmation (the same code again) is refused: 410."""
    async with world(tmp_path) as w:
        answer = (await w.enrol(make_key())).json()
        browser = await w.login()
        form = await w.confirm_form(browser, answer["user_code"])
        assert (await w.confirm(browser, form)).status_code == 303
        replay = await w.confirm(browser, form)
        assert replay.status_code == 410
        page = await w.client.get(
            "/.tabiji/devices/confirm",
            params={"code": answer["user_code"]},
            headers={**browser, "accept": "application/json"},
        )
        assert page.status_code == 410
        assert page.json()["error"] == "enrolment-code-invalid"


async def test_an_unconfirmed_code_expires(tmp_path: Path) -> None:
    """After its lifetime the code is gone: the page answers 410, the poll 410."""
    async with world(tmp_path, code_ttl=0.3) as w:
        key = make_key()
        answer = (await w.enrol(key)).json()
        await asyncio.sleep(0.5)
        page = await w.client.get(
            "/.tabiji/devices/confirm",
            params={"code": answer["user_code"]},
            headers=await w.login(),
        )
        assert page.status_code == 410
        poll = await w.poll(key, answer["enrolment_id"])
        assert poll.status_code == 410
        assert poll.json()["error"] == "enrolment-expired"


async def test_a_withdrawn_device_is_refused_at_poll(tmp_path: Path) -> None:
    """When IT withdraws the device before the agent collects it, the poll answers 403."""
    async with world(tmp_path) as w:
        key = make_key()
        enrolment_id, device_id = await w.enrolled(key)
        await w.registry.revoke(device_id, now=time.time(), actor="it@town.example")
        poll = await w.poll(key, enrolment_id)
        assert poll.status_code == 403
        assert poll.json()["error"] == "enrolment-refused"


async def test_a_tpm_claim_without_attestation_stays_claimed(tmp_path: Path) -> None:
    """A TPM key the gateway could not verify is recorded "tpm-claimed", never "tpm"."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key(), key_storage="tpm")
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.key_storage == "tpm-claimed"
        assert w.audited("device.enrol")[0]["attestation"] == "attestation-absent"


async def test_enrolment_is_rate_limited_per_address(tmp_path: Path) -> None:
    """Past the address's budget the enrol endpoint answers 429 with Retry-After."""
    async with world(tmp_path, limits=Limits(enrol=RateLimiter(1, 1))) as w:
        assert (await w.enrol(make_key())).status_code == 201
        limited = await w.enrol(make_key())
        assert limited.status_code == 429
        assert limited.json()["error"] == "device-rate-limited"
        assert int(limited.headers["retry-after"]) >= 1


async def test_confirmation_is_rate_limited_per_user(tmp_path: Path) -> None:
    """Code look-ups and confirmations count per user: guessing codes is soon refused."""
    async with world(tmp_path, limits=Limits(confirm=RateLimiter(1, 2))) as w:
        browser = await w.login()
        for expected in (410, 410, 429):
            page = await w.client.get(
                "/.tabiji/devices/confirm", params={"code": "BCDF-GHJK"}, headers=browser
            )
            assert page.status_code == expected
        # Another person is not affected by sato's guesses.
        other = await w.client.get(
            "/.tabiji/devices/confirm", params={"code": "BCDF-GHJK"}, headers=await w.login(ADMIN)
        )
        assert other.status_code == 410


async def test_pending_devices_expire(tmp_path: Path) -> None:
    """A device IT left pending past pending_ttl is withdrawn by the periodic task."""
    async with world(tmp_path) as w:
        _, device_id = await w.enrolled(make_key())
        assert await expire_pending(w.registry, time.time(), pending_ttl=3600) == 0
        expired = await expire_pending(w.registry, time.time() + 7200, pending_ttl=3600, audit=None)
        assert expired == 1
        device = await w.registry.get(device_id)
        assert device is not None
        assert device.status == "revoked"


def test_hidden_fields_reads_our_forms() -> None:
    """The test helper reads the hidden inputs of our templates (name and escaped value)."""
    html = (
        '<input type="hidden" name="csrf" value="a&amp;b"><input type="hidden" name="c" value="">'
    )
    assert hidden_fields(html) == {"csrf": "a&b", "c": ""}


# -- a real TPM (swtpm): the key counts as "tpm" only once attestation is verified -------------

swtpm_template = swtpm_fixture.swtpm_template
swtpm = swtpm_fixture.swtpm


async def _tpm_enrolment(
    tmp_path: Path, tpm: Swtpm, *, answer_right: bool, answer_after_confirm: bool = False
) -> str:
    """Enrol a key kept in swtpm with its attestation; the agent answers the credential (rightly
    or not, before or after the person confirms). Returns the key storage the registry holds."""
    device_key = open_key_store(tmp_path / "agent", tcti=tpm.tcti).create()
    assert device_key.storage == "tpm"
    verifier = AttestationVerifier.from_pem_files(list(tpm.ca_cert_pem_paths))
    async with world(tmp_path / "gateway", attestation=verifier) as w:
        public = device_key.public_key()
        evidence = device_key.attestation_evidence(attestation_nonce(ORIGIN, public))
        with device_key.signing_key() as key:
            response = await w.enrol(key, key_storage="tpm", attestation=evidence)
            assert response.status_code == 201, response.text
            enrolment = response.json()
            assert w.audited("device.enrol")[0]["attestation"] == "challenged"
            secret = device_key.activate_credential(enrolment["credential"])
            assert secret is not None
            answer = secret if answer_right else secret[::-1]
            if not answer_after_confirm:
                poll = await w.poll(key, enrolment["enrolment_id"], credential_answer=answer)
                assert poll.status_code == 202
            browser = await w.login()
            form = await w.confirm_form(browser, enrolment["user_code"])
            done = await w.confirm(browser, form)
            assert done.status_code == 303
            device_id = parse_qs(urlsplit(done.headers["location"]).query)["device"][0]
            if answer_after_confirm:
                poll = await w.poll(key, enrolment["enrolment_id"], credential_answer=answer)
                assert poll.json()["status"] == "pending"
        device = await w.registry.get(device_id)
        assert device is not None
        return device.key_storage


async def test_an_attested_tpm_key_is_believed(tmp_path: Path, swtpm: Swtpm) -> None:
    """A TPM key whose attestation verifies and whose credential answer is right is "tpm"."""
    assert await _tpm_enrolment(tmp_path, swtpm, answer_right=True) == "tpm"


async def test_a_wrong_credential_answer_leaves_the_claim(tmp_path: Path, swtpm: Swtpm) -> None:
    """A wrong credential answer does not refuse the device: it stays "tpm-claimed"."""
    assert await _tpm_enrolment(tmp_path, swtpm, answer_right=False) == "tpm-claimed"


async def test_an_answer_after_confirmation_upgrades_the_device(
    tmp_path: Path, swtpm: Swtpm
) -> None:
    """The agent's right answer arriving after the person confirmed upgrades the device to "tpm"."""
    storage = await _tpm_enrolment(tmp_path, swtpm, answer_right=True, answer_after_confirm=True)
    assert storage == "tpm"
