"""Device trust end to end, with nothing mocked but the posture facts (TABIJI_AGENT_FACTS_FILE,
the agent's documented test seam): a real `tabiji-agent` whose key lives in swtpm enrols with a
real gateway (TLS) while a person confirms in headless Chromium (Japanese) after signing in at the
real test OpenID Provider; a real `tabiji-agent run` then reports posture and answers the browser's
silent device check; the disk turns unencrypted and the next page is the Japanese deny page with
its fix (and `tabiji-agent status` says the same); fixed, the page opens again; the audit trail
holds every decision with the device and its posture, and verifies.

Plus what needs the real agent on the negative side: a DPoP proof from `tabiji-agent proof` works
once and its replay is refused; the agent's own device certificate in the ingress header, sent by
an untrusted client, is ignored. Screenshots go to test-artifacts/. Skips without swtpm, node,
Chromium or playwright — and fails instead when CI=true.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from device_agent.messages import say
from gateway.web.catalogue import load_catalogue
from tests import swtpm_fixture
from tests.swtpm_fixture import ProvisionedTpm

from .audit_env import query, verify
from .conftest import Upstream
from .device_env import CERT_HEADER, STAFF, DeviceEnv, device_env, require_device_components
from .identity_env import echo_of, header_of
from .test_pages_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.integration

swtpm_template = swtpm_fixture.swtpm_template  # the session fixture, bound here for pytest

ENROL_TIMEOUT = 60.0
POSTURE_TIMEOUT = 30.0
PAGE_TIMEOUT_MS = 20_000
DISK = "device-disk-unencrypted"
CATALOGUE = load_catalogue()
T = TypeVar("T")


@dataclass
class Enrolled:
    """The laptop after steps 1–2: its device id, the signed-in browser, what was measured."""

    device_id: str
    context: Any  # the Chromium context signed in as STAFF (a playwright BrowserContext)
    page: Any
    enrol_seconds: float


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"device-journey-{name}.png"), full_page=True)


def _until(what: str, check: Callable[[], T | None], timeout: float, pause: float = 0.1) -> T:
    """Poll `check()` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(pause)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journey(
    upstream: Upstream,
    swtpm_template: ProvisionedTpm,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DeviceEnv]:
    """swtpm + the provider + the gateway (TLS, devices on, audit on) + the laptop's agent home."""
    with device_env(tmp_path_factory.mktemp("device-journey"), upstream, swtpm_template) as env:
        yield env


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, through playwright (never `playwright install`)."""
    require_device_components()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


def _sign_in(journey: DeviceEnv, page: Any, user: str) -> None:
    """On the provider's login form: type the credentials, submit, allow consent if asked."""
    idp = journey.identity.idp
    assert idp is not None
    person = idp.user(user)
    page.wait_for_selector("form#login")
    page.fill("#username", person.username)
    page.fill("#password", person.password)
    _shot(page, "2-provider-login")
    page.click("#submit")
    page.wait_for_load_state()
    if page.query_selector("form#consent") is not None:
        page.click("#allow")
        page.wait_for_load_state()


@pytest.fixture(scope="module")
def enrolled(journey: DeviceEnv, browser: Any) -> Iterator[Enrolled]:
    """Steps 1–2: `tabiji-agent enroll` (real process, key in swtpm) prints a link and a code; the
    person signs in, opens the link in Chromium (ja) and confirms "this is my computer"; the
    staff policy approves it at once and the agent finishes enrolled."""
    agent = journey.agent
    started = time.monotonic()
    enrol = agent.start("enroll", journey.p, "--ca-file", str(agent.ca_file), "--no-browser")
    link = enrol.wait_for_line(
        lambda line: line.strip().startswith(journey.p + "/.tabiji/devices/confirm?code="),
        ENROL_TIMEOUT,
    ).strip()
    code = parse_qs(urlsplit(link).query)["code"][0]
    enrol.wait_for_line(lambda line: line == say("enrol-user-code", "ja", code=code), 5)
    assert say("enrol-key-tpm", "ja") in enrol.lines  # the key was made inside the TPM

    context = browser.new_context(
        ignore_https_errors=True, locale="ja-JP", viewport={"width": 1280, "height": 900}
    )
    try:
        page = context.new_page()
        page.goto(link)
        idp = journey.identity.idp
        assert idp is not None
        assert page.url.startswith(idp.issuer + "/"), "the confirm page asks for a sign-in first"
        _sign_in(journey, page, STAFF)
        page.wait_for_url(
            re.compile(r".*/\.tabiji/devices/confirm\?code=.*"), timeout=PAGE_TIMEOUT_MS
        )
        assert page.get_attribute("html", "lang") == "ja"
        assert page.locator("h1").inner_text() == CATALOGUE.get("ui.device-confirm", "ja").title
        # The page is about the enrolment the agent printed (the code, normalised, in the form).
        assert page.locator("input[name=code]").get_attribute("value") == code.replace("-", "")
        assert socket.gethostname().strip()[:100] in page.locator("dl.device").inner_text()
        _shot(page, "2-confirm-ja")
        button = page.locator("button[name=confirm]")
        assert button.inner_text() == CATALOGUE.get("ui.device-confirm-button", "ja").title
        button.click()
        page.wait_for_url(re.compile(r".*/\.tabiji/devices/enrolled\?device=.*"))
        assert page.locator("h1").get_attribute("data-status") == "approved"
        _shot(page, "2-enrolled-approved-ja")
        assert enrol.wait(ENROL_TIMEOUT) == 0, enrol.output()
        enrol_seconds = time.monotonic() - started
        status = agent.status()
        device_id = str(status["device_id"])
        assert say("enrol-approved", "ja", device_id=device_id) in enrol.lines
        yield Enrolled(device_id, context, page, enrol_seconds)
    finally:
        context.close()


@pytest.fixture(scope="module")
def program(journey: DeviceEnv, enrolled: Enrolled) -> Iterator[httpx.Client]:
    """A program of the same person: its own session (signed in with httpx), never bound to a
    device by a browser check — it proves its device per request."""
    env = journey.identity
    with env.client() as client:
        landed = env.login(client, journey.p + "/plain/_up/echo", STAFF)
        assert landed.status_code == 200
        yield client


# -- the journey -----------------------------------------------------------------------------------


def _main_frame_navigations(page: Any) -> list[str]:
    urls: list[str] = []

    def on_request(request: Any) -> None:
        if request.is_navigation_request() and request.frame == page.main_frame:
            urls.append(request.url)

    page.on("request", on_request)
    return urls


def _reasons_reported(journey: DeviceEnv, expected: tuple[str, ...]) -> bool:
    last = journey.agent.status().get("last_report") or {}
    return bool(last.get("accepted")) and tuple(last.get("reasons", ())) == expected


def test_enrol_attest_silently_deny_on_bad_posture_and_allow_again(
    journey: DeviceEnv, enrolled: Enrolled
) -> None:
    """Enrolled with a verified TPM key, the running agent attests the browser silently and the
    device route opens; an unencrypted disk denies the next page in Japanese with its fix (the
    agent's status says the same); fixed, it opens again; the audit trail records all of it."""
    agent = journey.agent
    page = enrolled.page
    device_id = enrolled.device_id

    # Step 2's outcome: the agent and the gateway agree the key is in a TPM — for the gateway
    # "tpm" (attestation verified against swtpm's local CA), not merely "tpm-claimed".
    status = agent.status()
    assert (status["enrolled"], status["status"], status["key_storage"]) == (
        True,
        "approved",
        "tpm",
    )
    assert status["certificate_not_after"] is not None
    shown = journey.devices_show(device_id)
    assert (shown["status"], shown["key_storage"]) == ("approved", "tpm")

    # Step 3: the agent runs, its facts from the override file, looked at every second.
    run = agent.start("run", "--ports", f"{agent.ports[0]}-{agent.ports[-1]}", "--check-every", "1")
    run.wait_for_line(lambda line: str(agent.ports[0]) in line, 30)  # run-started, its port
    _until("the first report accepted, nothing to fix", lambda: _reasons_reported(journey, ()), 30)

    # Step 4: the device route; the browser goes through the device check and the agent on
    # loopback and lands on the upstream's page without anyone touching it.
    target = journey.p + "/records/_up/page"
    navigations = _main_frame_navigations(page)
    started = time.monotonic()
    page.goto(target)
    page.wait_for_url(target, timeout=PAGE_TIMEOUT_MS)
    page.wait_for_load_state()
    first_attestation = time.monotonic() - started
    assert page.title() == "page"
    _shot(page, "4-silently-attested-upstream-page")
    loopback = f"http://127.0.0.1:{agent.ports[0]}/tabiji/attest?"
    path_of = [
        (urlsplit(url).scheme, urlsplit(url).netloc, urlsplit(url).path) for url in navigations
    ]
    gateway_netloc = urlsplit(journey.p).netloc
    assert ("https", gateway_netloc, "/.tabiji/device/check") in path_of, navigations
    assert any(url.startswith(loopback) for url in navigations), navigations
    assert ("https", gateway_netloc, "/.tabiji/device/attested") in path_of, navigations
    assert navigations[-1] == target

    # Step 5: the disk turns unencrypted; the agent notices and reports; the next page is denied.
    flipped = time.monotonic()
    agent.set_facts(disk_encrypted=False)
    _until(
        "the gateway's answer naming the unencrypted disk",
        lambda: _reasons_reported(journey, (DISK,)),
        POSTURE_TIMEOUT,
    )
    reported = time.monotonic() - flipped
    response = page.goto(target)
    denied = time.monotonic() - flipped
    assert journey.devices_show(device_id)["posture"]["disk_encrypted"] is False
    assert response is not None
    assert response.status == 403
    message = CATALOGUE.get(DISK, "ja")
    assert page.get_attribute("html", "lang") == "ja"
    reason = page.locator(f'[data-code="{DISK}"]').first
    assert message.title in reason.inner_text()
    assert message.fix in page.inner_text("body")
    _shot(page, "5-denied-disk-unencrypted-ja")
    told = agent.run("status")
    assert told.returncode == 0, told.stderr
    assert message.title in told.stdout
    assert message.fix in told.stdout
    assert say("report-fixes", "ja") in told.stdout

    # Step 6: encrypted again → allowed again, on the same binding.
    agent.set_facts(disk_encrypted=True)
    _until(
        "the gateway's answer with nothing to fix",
        lambda: _reasons_reported(journey, ()),
        POSTURE_TIMEOUT,
    )
    response = page.goto(target)
    assert response is not None
    assert response.status == 200
    assert page.title() == "page"
    _shot(page, "6-allowed-again")

    # The agent stops cleanly on SIGTERM (as systemd stops it at logout).
    assert run.stop() == 0, run.output()
    assert say("run-stopped", "ja") in run.lines

    # Step 7: the audit trail — allow, deny, allow, each naming the device and its posture.
    records = _until(
        "three audited decisions on the device route",
        lambda: _three_decisions(journey, device_id),
        10,
    )
    allow_before, deny, allow_after = records
    assert "disk=on" in allow_before["posture"]
    assert DISK in deny["reasons"]
    assert "disk=off" in deny["posture"]
    assert "disk=on" in allow_after["posture"]
    admin = query(journey.config, "--kind", "admin")
    assert {"device.confirm", "device.approve", "device.bind"} <= {r["action"] for r in admin}
    (approval,) = [r for r in admin if r["action"] == "device.approve"]
    assert approval["actor"] == "policy:staff-laptops"  # approved at once by the staff policy
    verified = verify(journey.config)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    print(
        f"\nenrolment (agent start → enrolled and approved, incl. the browser sign-in): "
        f"{enrolled.enrol_seconds:.2f} s\n"
        f"first silent attestation (navigation → upstream page): {first_attestation:.2f} s\n"
        f"posture change → gateway has it: {reported:.2f} s; → deny page shown: {denied:.2f} s"
    )


def _three_decisions(journey: DeviceEnv, device_id: str) -> list[dict[str, Any]] | None:
    """The device route's allow → deny → allow for this device, oldest first (or None yet)."""
    records = query(journey.config, "--kind", "request", "--route", "records")
    ours = [
        r
        for r in reversed(records)
        if r.get("device_id") == device_id and r["decision"] in ("allow", "deny")
    ]
    decisions = [r["decision"] for r in ours]
    if decisions[-3:] != ["allow", "deny", "allow"]:
        return None
    return ours[-3:]


# -- programs and ingress headers ------------------------------------------------------------------


def test_a_proof_from_tabiji_agent_works_once_and_its_replay_is_refused(
    journey: DeviceEnv, enrolled: Enrolled, program: httpx.Client
) -> None:
    """`tabiji-agent proof GET URL` opens the device route for a program once; the same proof
    again is refused 401 device-proof-invalid (audited as proof-replayed); the upstream never
    sees the proof."""
    url = journey.p + "/own/_up/echo"
    made = journey.agent.run("proof", "GET", url)
    assert made.returncode == 0, made.stderr
    proof = made.stdout.strip()
    headers = {"DPoP": proof, "Accept": "application/json"}
    first = program.get(url, headers=headers)
    echo = echo_of(first)
    assert header_of(echo, "dpop") == []
    again = program.get(url, headers=headers)
    assert again.status_code == 401
    assert again.json()["reasons"] == ["device-proof-invalid"]
    assert "invalid_dpop_proof" in again.headers["www-authenticate"]
    refused = _until(
        "the replay's audit record",
        lambda: _record(journey, again.headers["x-request-id"]),
        10,
    )
    assert refused["reasons"] == ["device-proof-invalid", "proof-replayed"]
    assert refused["device_id"] == enrolled.device_id


def test_the_agents_certificate_in_the_ingress_header_from_an_untrusted_client_is_ignored(
    journey: DeviceEnv, enrolled: Enrolled, program: httpx.Client
) -> None:
    """The device certificate the agent received at enrolment, put in the ingress header by the
    client itself (not a trusted proxy): no device for the route (device-unenrolled), and the
    header never reaches the upstream."""
    certificate = (journey.agent.home / "device-cert.pem").read_text("ascii")
    header = {CERT_HEADER: quote(certificate, safe=""), "Accept": "application/json"}
    refused = program.get(journey.p + "/own/_up/echo", headers=header)
    assert refused.status_code == 403
    assert refused.json()["reasons"][0] == "device-unenrolled"
    echo = echo_of(program.get(journey.p + "/plain/_up/echo", headers=header))
    assert header_of(echo, CERT_HEADER) == []


def _record(journey: DeviceEnv, request_id: str) -> dict[str, Any] | None:
    for record in query(journey.config, "--kind", "request", "--text", request_id):
        if record["request_id"] == request_id:
            return record
    return None
