"""The agent's command line against the protocol peer: enroll, status (ja/en with the gateway's
fixes), report, proof, curl, renew and run — real files, keys, sockets and processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agent_gateway_peer import Peer, running_peer
from test_loopback import free_port_range

from device_agent import report
from device_agent.cli import curl_command, curl_method, main, open_browser, proof_target
from device_agent.client import GatewayClient
from device_agent.enrolment import Enroller, EnrolmentFailed, Machine
from device_agent.keys import FileKeyStore, open_key_store
from device_agent.state import AgentState, Enrolment, Fix, LastReport
from tests import swtpm_fixture
from tests.swtpm_fixture import Swtpm

swtpm_template = swtpm_fixture.swtpm_template
swtpm = swtpm_fixture.swtpm

DISK_FIX = Fix(
    "device-disk-unencrypted",
    {"ja": "ディスクの暗号化が無効です", "en": "Disk encryption is off"},
    {
        "ja": "設定 → プライバシーとセキュリティ → デバイスの暗号化 で有効にしてください",
        "en": "Turn it on in Settings → Privacy & security → Device encryption",
    },
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An agent home of its own, Japanese locale, no TPM."""
    directory = tmp_path / "agent-home"
    monkeypatch.setenv("TABIJI_AGENT_HOME", str(directory))
    monkeypatch.setenv("LANG", "ja_JP.UTF-8")
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    monkeypatch.delenv("TABIJI_AGENT_TCTI", raising=False)
    return directory


@pytest.fixture
def peer() -> Iterator[Peer]:
    with running_peer() as running:
        yield running


def enrolled(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str], decision: str = "approved"
) -> str:
    peer.state.decision = decision
    assert main(["enroll", peer.origin, "--no-browser"]) == 0
    return capsys.readouterr().out


# -- light imports, usage ----------------------------------------------------------------------


def test_agent_does_not_load_the_gateway_stack() -> None:
    """A laptop's agent never imports the server stack (it is not even installed there)."""
    code = (
        "import sys, device_agent.cli as c; c.main(['status', '--json']); "
        "heavy = {'uvicorn', 'starlette', 'aiohttp', 'pydantic', 'yaml', 'gateway', 'policies', "
        "'tpm2_pytss'}; print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    assert out[-1] == "[]"


def test_usage_errors_exit_2() -> None:
    """No command, an unknown one, or a bad port range is a usage error."""
    assert main([]) == 2
    assert main(["fly"]) == 2
    assert main(["run", "--ports", "80-90"]) == 2
    assert main(["run", "--interval", "0"]) == 2
    assert main(["proof", "GET"]) == 2


def test_run_refuses_a_check_interval_of_zero(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --check-every 0` (a busy loop) is a usage error: exit 2 and the allowed range."""
    assert main(["run", "--check-every", "0"]) == 2
    assert "1〜3600 秒" in capsys.readouterr().err


# -- status ------------------------------------------------------------------------------------


def test_status_not_enrolled_in_japanese_by_default(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no enrolment record the agent says so, in Japanese unless asked otherwise."""
    assert main(["status"]) == 0
    assert "この端末はまだ登録されていません。" in capsys.readouterr().out
    assert main(["status", "--lang", "en"]) == 0
    assert "This device is not enrolled yet." in capsys.readouterr().out


def test_an_english_locale_speaks_english(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LANG=en_US.UTF-8 is enough for English."""
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert main(["status"]) == 0
    assert "This device is not enrolled yet." in capsys.readouterr().out


def test_a_broken_record_is_an_error_not_a_guess(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable enrolment record fails status with a sentence naming the file."""
    home.mkdir()
    (home / "enrolment.json").write_text("{broken", encoding="utf-8")
    assert main(["status", "--lang", "en"]) == 1
    assert "cannot be read" in capsys.readouterr().err


def save_status_fixture(home: Path, last: LastReport) -> None:
    state = AgentState(home)
    state.save_enrolment(
        Enrolment(
            gateway="https://gw.example",
            status="approved",
            key_storage="software",
            enrolled_at=1_700_000_000,
            device_id="dev-17",
        )
    )
    state.save_last_report(last)


def test_status_explains_each_rejected_fact_with_the_gateways_fix(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each reason comes with the gateway's fix text in the chosen language; key kind in words."""
    last = LastReport(
        at=int(time.time()),
        accepted=True,
        status="approved",
        reasons=("device-disk-unencrypted", "device-firewall-off"),
        fixes=(DISK_FIX,),
    )
    save_status_fixture(home, last)
    assert main(["status"]) == 0
    japanese = capsys.readouterr().out
    assert "この端末は登録済みです（端末 ID: dev-17）。" in japanese
    assert "鍵の保管場所: ファイル" in japanese
    assert ": 受理されました。" in japanese
    assert (
        "  ・ディスクの暗号化が無効です。"
        "設定 → プライバシーとセキュリティ → デバイスの暗号化 で有効にしてください"
        in japanese.splitlines()
    )
    assert "  ・device-firewall-off" in japanese.splitlines()  # a reason without a text: its code
    assert main(["status", "--lang", "en"]) == 0
    english = capsys.readouterr().out
    assert "Key storage: a file only you can read" in english
    assert (
        "  ・Disk encryption is off. "
        "Turn it on in Settings → Privacy & security → Device encryption" in english.splitlines()
    )


def test_status_reports_a_refused_report_and_all_good(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal shows the gateway's message and code; no reasons shows that all is well."""
    refused = LastReport(
        at=int(time.time()),
        accepted=False,
        error="report-clock-skew",
        message={"ja": "時計がずれています。", "en": "The clock is off."},
    )
    save_status_fixture(home, refused)
    assert main(["status", "--lang", "en"]) == 0
    assert "not accepted — The clock is off. (report-clock-skew)" in capsys.readouterr().out
    save_status_fixture(home, LastReport(at=int(time.time()), accepted=True, status="approved"))
    assert main(["status"]) == 0
    assert "この端末はゲートウェイの基準を満たしています。" in capsys.readouterr().out


def test_status_json_is_machine_readable(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json gives the record, the key kind and the last answer as one JSON object."""
    save_status_fixture(home, LastReport(at=1, accepted=True, reasons=("device-disk-unencrypted",)))
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["enrolled"] is True
    assert data["device_id"] == "dev-17"
    assert data["key_storage"] == "software"
    assert data["last_report"]["reasons"] == ["device-disk-unencrypted"]


# -- enroll ------------------------------------------------------------------------------------


def test_enroll_approved_at_once(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Enrolment prints the link and code, stores the certificate and says what comes next."""
    out = enrolled(home, peer, capsys)
    assert f"{peer.origin}/.tabiji/devices/confirm?code=KXQP-7MZD" in out
    assert "確認コード: KXQP-7MZD" in out
    assert "登録が完了しました" in out
    assert "tabiji-agent run" in out
    record = AgentState(home).load_enrolment()
    assert record is not None
    assert record.status == "approved"
    assert record.gateway == peer.origin
    assert record.key_storage == "software"
    assert record.certificate is not None
    assert Path(record.certificate).exists()
    (request,) = peer.state.enrolment_requests
    assert request["key_storage"] == "software"
    assert request["os"] == "linux"
    assert "attestation" not in request
    assert (home / "key" / "device-key.pem").stat().st_mode & 0o077 == 0
    assert main(["status"]) == 0
    assert "鍵の保管場所: ファイル" in capsys.readouterr().out


def test_enroll_pending_waits_for_it(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device the policy does not approve at once is saved as pending, and status says so."""
    out = enrolled(home, peer, capsys, decision="pending")
    assert "情報政策担当の承認を待っています" in out
    assert main(["status", "--lang", "en"]) == 0
    assert "waits for IT's approval" in capsys.readouterr().out


def test_enroll_refused_leaves_no_record(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused enrolment says so, exits 1 and keeps no enrolment record."""
    peer.state.decision = "refused"
    assert main(["enroll", peer.origin, "--no-browser", "--lang", "en"]) == 1
    assert "The enrolment was refused." in capsys.readouterr().err
    assert AgentState(home).load_enrolment() is None


def test_enroll_twice_is_refused(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """An enrolled device is not enrolled again by accident; the key is never replaced."""
    enrolled(home, peer, capsys)
    key_before = (home / "key" / "device-key.pem").read_bytes()
    assert main(["enroll", peer.origin, "--no-browser"]) == 1
    assert "すでに" in capsys.readouterr().err
    assert (home / "key" / "device-key.pem").read_bytes() == key_before
    assert len(peer.state.enrolment_requests) == 1


def test_enroll_replace_starts_over_with_a_new_key(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`enroll --replace` discards the enrolment and its key and enrols a new key."""
    enrolled(home, peer, capsys)
    key_before = (home / "key" / "device-key.pem").read_bytes()
    first_id = AgentState(home).load_enrolment()
    assert main(["enroll", peer.origin, "--no-browser", "--replace"]) == 0
    assert "新しい鍵で登録し直します" in capsys.readouterr().out
    assert (home / "key" / "device-key.pem").read_bytes() != key_before
    assert len(peer.state.enrolment_requests) == 2
    again = AgentState(home).load_enrolment()
    assert first_id is not None
    assert again is not None
    assert again.device_id != first_id.device_id


def test_enroll_after_revocation_needs_no_flag(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device the gateway revoked enrols again with a new key (its old key never comes back)."""
    enrolled(home, peer, capsys)
    state = AgentState(home)
    record = state.load_enrolment()
    assert record is not None
    state.save_enrolment(dataclasses.replace(record, status="revoked"))
    key_before = (home / "key" / "device-key.pem").read_bytes()
    assert main(["enroll", peer.origin, "--no-browser"]) == 0
    assert (home / "key" / "device-key.pem").read_bytes() != key_before
    assert len(peer.state.enrolment_requests) == 2


def test_enroll_refuses_plain_http_to_another_machine(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """http:// to anything but this machine is refused before any key is made."""
    assert main(["enroll", "http://gw.example", "--lang", "en"]) == 1
    assert "https://" in capsys.readouterr().err
    assert not (home / "key").exists()


def test_enroll_unreachable_gateway_is_explained(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that does not answer is a sentence about the network, not a traceback."""
    port = free_port_range(1)[0]
    assert main(["enroll", f"http://127.0.0.1:{port}", "--lang", "en", "--no-browser"]) == 1
    assert "Cannot reach the gateway" in capsys.readouterr().err


def test_enrolment_waits_for_the_user_through_rate_limits(tmp_path: Path, peer: Peer) -> None:
    """The flow polls until the user confirms, backs off on 429, opens the browser once."""
    polls = [0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        polls[0] += 1
        if polls[0] == 4:
            peer.state.decision = "approved"

    opened: list[str] = []
    peer.state.rate_limit_next = 2
    told: list[str] = []
    state = AgentState(tmp_path / "agent")
    record = Enroller(
        state=state,
        key_store=FileKeyStore(state.key_directory),
        client=GatewayClient(peer.origin),
        tell=lambda message_id, **values: told.append(message_id),
        open_browser=lambda url: bool(opened.append(url)) or True,
        machine=Machine("pc-17", "SN1", "linux"),
        sleep=sleep,
    ).run()
    assert record.status == "approved"
    assert opened == [f"{peer.origin}/.tabiji/devices/confirm?code=KXQP-7MZD"]
    assert slept[1:3] == [5.0, 5.0]  # the 429s: waited longer than the poll interval
    assert "enrol-waiting" in told
    assert peer.state.enrolment_requests[0]["hostname"] == "pc-17"


def test_an_unconfirmed_enrolment_expires(tmp_path: Path, peer: Peer) -> None:
    """When the code expires unconfirmed, the flow ends with enrolment-expired and no record."""
    peer.state.expires_in = 10
    offset = [0.0]

    def sleep(seconds: float) -> None:
        offset[0] += 4  # time passes without the user confirming

    state = AgentState(tmp_path / "agent")
    enroller = Enroller(
        state=state,
        key_store=FileKeyStore(state.key_directory),
        client=GatewayClient(peer.origin),
        tell=lambda *a, **k: None,
        open_browser=None,
        machine=Machine("pc", "", "linux"),
        clock=lambda: time.time() + offset[0],
        sleep=sleep,
    )
    with pytest.raises(EnrolmentFailed) as caught:
        enroller.run()
    assert caught.value.code == "enrolment-expired"
    assert state.load_enrolment() is None
    assert 2 <= len(peer.state.credential_answers) <= 3  # it did poll while waiting


def make_enroller(state: AgentState, peer: Peer, sleep: Any) -> Enroller:
    return Enroller(
        state=state,
        key_store=FileKeyStore(state.key_directory),
        client=GatewayClient(peer.origin),
        tell=lambda *a, **k: None,
        open_browser=None,
        machine=Machine("pc", "", "linux"),
        sleep=sleep,
    )


def test_an_interrupted_enrolment_resumes_with_the_same_code(tmp_path: Path, peer: Peer) -> None:
    """Stopped while waiting (Ctrl+C), `enroll` again keeps polling the same enrolment — the
    user may have confirmed it meanwhile — instead of starting a new one."""

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    state = AgentState(tmp_path / "agent")
    with pytest.raises(KeyboardInterrupt):
        make_enroller(state, peer, interrupt).run()
    waiting = state.load_enrolment()
    assert waiting is not None
    assert waiting.status == "waiting-for-user"
    assert waiting.confirm_url is not None
    peer.state.decision = "approved"  # the user confirmed in the browser meanwhile
    record = make_enroller(state, peer, lambda seconds: None).run()
    assert record.status == "approved"
    assert len(peer.state.enrolment_requests) == 1  # no second enrolment was sent
    assert record.enrolment_id is None
    assert record.confirm_url is None


def test_a_resumed_enrolment_the_gateway_forgot_starts_afresh(tmp_path: Path, peer: Peer) -> None:
    """If the gateway no longer knows the saved enrolment, a new one is sent with the same key."""
    state = AgentState(tmp_path / "agent")
    state.save_enrolment(
        Enrolment(
            gateway=peer.origin,
            status="waiting-for-user",
            key_storage="software",
            enrolled_at=int(time.time()),
            enrolment_id="enr-gone",
            expires_at=int(time.time()) + 600,
        )
    )
    peer.state.decision = "pending"
    record = make_enroller(state, peer, lambda seconds: None).run()
    assert record.status == "pending"
    assert len(peer.state.enrolment_requests) == 1


def test_no_browser_is_started_on_a_text_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a display, the link is only printed (webbrowser would start lynx in the terminal)."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert open_browser("https://gw.example/.tabiji/devices/confirm?code=X") is False


def test_enroll_with_a_tpm_key_proves_it_to_the_gateway(
    home: Path,
    peer: Peer,
    swtpm: Swtpm,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a TPM the key is made in the chip, its attestation is sent, the gateway's credential
    is activated and the answer matches; status says the key is in the TPM."""
    from gateway.devices.attestation import AttestationVerifier

    monkeypatch.setenv("TABIJI_AGENT_TCTI", swtpm.tcti)
    peer.state.attestation_verifier = AttestationVerifier.from_pem_files(swtpm.ca_cert_pem_paths)
    out = enrolled(home, peer, capsys)
    assert "TPM（セキュリティチップ）" in out
    (request,) = peer.state.enrolment_requests
    assert request["key_storage"] == "tpm"
    assert request["attestation"]["format"] == "tpm2-certify-v1"
    assert peer.state.credential_confirmed
    assert all(peer.state.credential_confirmed)
    assert main(["status"]) == 0
    assert "鍵の保管場所: TPM" in capsys.readouterr().out
    assert main(["proof", "GET", peer.origin + "/x"]) == 0
    (device,) = peer.state.devices.values()
    report.verify_proof(
        capsys.readouterr().out.strip(),
        device.key,
        device_id=device.device_id,
        method="GET",
        url=peer.origin + "/x",
        now=time.time(),
    )


def test_the_tpm_credential_answer_goes_out_before_the_first_wait(
    tmp_path: Path, peer: Peer, swtpm: Swtpm
) -> None:
    """The answer to the gateway's TPM credential is sent in a poll at once, not one poll
    interval later, so a quick confirmation already finds the key attested ("tpm")."""
    from gateway.devices.attestation import AttestationVerifier

    peer.state.attestation_verifier = AttestationVerifier.from_pem_files(swtpm.ca_cert_pem_paths)
    confirmed_before_each_wait: list[list[bool]] = []

    def sleep(seconds: float) -> None:
        confirmed_before_each_wait.append(list(peer.state.credential_confirmed))
        peer.state.decision = "approved"  # the user confirms during the first wait

    state = AgentState(tmp_path / "agent")
    record = Enroller(
        state=state,
        key_store=open_key_store(state.key_directory, tcti=swtpm.tcti),
        client=GatewayClient(peer.origin),
        tell=lambda *a, **k: None,
        open_browser=None,
        machine=Machine("pc", "", "linux"),
        sleep=sleep,
    ).run()
    assert record.status == "approved"
    assert record.key_storage == "tpm"
    assert confirmed_before_each_wait[0] == [True]  # answered and checked before any wait
    assert all(peer.state.credential_confirmed)


def test_a_tpm_key_serves_the_loopback_thread_and_the_reports_at_once(
    home: Path,
    peer: Peer,
    swtpm: Swtpm,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Browser attestations (loopback thread) and reports (run loop) share one TPM key without
    interleaving commands to the chip: every signature verifies."""
    from device_agent.cli import open_device

    monkeypatch.setenv("TABIJI_AGENT_TCTI", swtpm.tcti)
    enrolled(home, peer, capsys)
    device = open_device(AgentState())
    attestations: list[str] = []
    errors: list[BaseException] = []

    def attest_many() -> None:
        try:
            attestations.extend(device.attest(f"challenge-number-{i:04d}") for i in range(5))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    thread = threading.Thread(target=attest_many)
    thread.start()
    with device.client:
        answers = [device.send_report(report.PostureFacts(os="linux")) for _ in range(3)]
    thread.join(60)
    assert errors == []
    assert all(answer.accepted for answer in answers)
    (registered,) = peer.state.devices.values()
    for number, token in enumerate(attestations):
        report.verify_attestation(
            token,
            registered.key,
            device_id=registered.device_id,
            challenge=f"challenge-number-{number:04d}",
            origin=peer.origin,
            now=time.time(),
        )
    assert len(registered.reports) == 3


# -- report, renew, proof ----------------------------------------------------------------------


def test_report_sends_the_probed_facts_and_prints_the_fixes(
    home: Path,
    peer: Peer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`report` sends one signed report with the (overridden) facts and explains the answer."""
    enrolled(home, peer, capsys)
    facts_file = tmp_path / "facts.json"
    facts_file.write_text('{"disk_encrypted": false}', encoding="utf-8")
    monkeypatch.setenv("TABIJI_AGENT_FACTS_FILE", str(facts_file))
    peer.state.reasons = ["device-disk-unencrypted"]
    peer.state.fixes = [{"code": DISK_FIX.code, "title": DISK_FIX.title, "fix": DISK_FIX.fix}]
    assert main(["report", "--lang", "en"]) == 1  # sent, but the device falls short
    out = capsys.readouterr().out
    assert "accepted" in out
    assert "Disk encryption is off. Turn it on in Settings" in out
    (device,) = peer.state.devices.values()
    (sent,) = device.reports
    assert sent.facts.disk_encrypted is False
    assert sent.facts.os == "linux"
    assert sent.facts.agent_version
    peer.state.reasons, peer.state.fixes = [], []
    facts_file.write_text('{"disk_encrypted": true}', encoding="utf-8")
    assert main(["report"]) == 0
    assert "基準を満たしています" in capsys.readouterr().out
    assert device.reports[1].counter > device.reports[0].counter


def test_report_when_not_enrolled_says_what_to_do(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Commands that need an enrolment say how to enrol."""
    assert main(["report"]) == 1
    assert "tabiji-agent enroll" in capsys.readouterr().err


def test_renew_replaces_the_certificate(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`renew` fetches a fresh certificate with a device proof and says until when it is valid."""
    enrolled(home, peer, capsys)
    record = AgentState(home).load_enrolment()
    assert record is not None
    assert record.certificate is not None
    before = Path(record.certificate).read_text()
    assert main(["renew", "--lang", "en"]) == 0
    assert "Device certificate renewed" in capsys.readouterr().out
    assert Path(record.certificate).read_text() != before
    assert peer.state.certificates_issued == 2


def test_proof_prints_a_header_value_the_gateway_verifies(
    home: Path, peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed value verifies for the method and the URL without its query."""
    enrolled(home, peer, capsys)
    assert main(["proof", "post", "https://app.example/api/items?page=2"]) == 0
    value = capsys.readouterr().out.strip()
    (device,) = peer.state.devices.values()
    proof = report.verify_proof(
        value,
        device.key,
        device_id=device.device_id,
        method="POST",
        url="https://app.example/api/items",
        now=time.time(),
    )
    assert proof.url == "https://app.example/api/items"


# -- curl --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "method"),
    [
        ([], "GET"),
        (["-X", "DELETE"], "DELETE"),
        (["-XPUT"], "PUT"),
        (["--request", "patch"], "PATCH"),
        (["-sSX", "POST"], "POST"),
        (["-d", "a=1"], "POST"),
        (["--data-binary", "@file"], "POST"),
        (["-F", "f=@x"], "POST"),
        (["--json", "{}"], "POST"),
        (["-G", "-d", "q=1"], "GET"),
        (["-I"], "HEAD"),
        (["--head"], "HEAD"),
        (["-T", "file.txt"], "PUT"),
        (["-H", "X-Method: -X DELETE", "-d", "-X"], "POST"),  # values are not options
        (["-d", "x", "-X", "PUT"], "PUT"),
    ],
)
def test_curl_method_follows_curls_own_rules(args: list[str], method: str) -> None:
    """The proof's method is the one curl will send."""
    assert curl_method(args) == method


def test_curl_command_adds_the_dpop_header_before_the_url() -> None:
    """curl's argv keeps the user's arguments and adds -H "DPoP: …" for method and URL."""
    seen: list[tuple[str, str]] = []

    def proof(method: str, url: str) -> str:
        seen.append((method, url))
        return "PROOF"

    argv = curl_command(["-s", "-X", "POST", "https://app.example/a?b=1"], proof, "/usr/bin/curl")
    assert argv == [
        "/usr/bin/curl",
        "-s",
        "-X",
        "POST",
        "-H",
        "DPoP: PROOF",
        "https://app.example/a?b=1",
    ]
    assert seen == [("POST", "https://app.example/a?b=1")]
    curl_command(["https://app.example"], proof)
    assert seen[-1] == ("GET", "https://app.example/")  # curl asks for "/"
    with pytest.raises(ValueError, match="curl-no-url"):
        curl_command(["-s"], proof)
    assert proof_target("https://app.example:8443") == "https://app.example:8443/"


class Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []  # noqa: RUF012 — one test's scratch space

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        Recorder.seen.append((self.command, self.path, self.headers.get("DPoP", "")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_PUT = _record  # noqa: N815 — http.server's naming

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_curl_runs_the_real_curl_with_a_valid_proof(
    home: Path, peer: Peer, capfd: pytest.CaptureFixture[str]
) -> None:
    """`tabiji-agent curl -X PUT -d … URL` makes curl send a DPoP header valid for PUT and URL."""
    peer.state.decision = "approved"
    assert main(["enroll", peer.origin, "--no-browser"]) == 0
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/files/report.txt?v=2"
        assert main(["curl", "-s", "-X", "PUT", "-d", "hello", url]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert capfd.readouterr().out.endswith("ok")
    ((method, path, header),) = Recorder.seen
    assert (method, path) == ("PUT", "/files/report.txt?v=2")
    (device,) = peer.state.devices.values()
    report.verify_proof(
        header,
        device.key,
        device_id=device.device_id,
        method="PUT",
        url=url,
        now=time.time(),
    )


# -- run ---------------------------------------------------------------------------------------


def test_run_reports_answers_the_browser_and_stops_cleanly_on_sigterm(
    home: Path, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real `tabiji-agent run`: it reports with its loopback port, the loopback server answers a
    challenge with a redirect to the gateway, and SIGTERM stops it with exit 0."""
    import http.client

    enrolled(home, peer, capsys)
    facts_file = tmp_path / "facts.json"
    facts_file.write_text('{"disk_encrypted": true}', encoding="utf-8")
    ports = free_port_range(2)
    env = {
        **os.environ,
        "TABIJI_AGENT_HOME": str(home),
        "TABIJI_AGENT_FACTS_FILE": str(facts_file),
        "LANG": "en_US.UTF-8",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "run", "--ports", f"{ports[0]}-{ports[1]}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        (device,) = peer.state.devices.values()
        deadline = time.monotonic() + 60
        while not device.reports and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert device.reports, "no report arrived"
        assert device.reports[0].loopback_port == ports[0]
        connection = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
        challenge = "c" * 43
        return_url = f"{peer.origin}/.tabiji/device/attested"
        connection.request("GET", f"/tabiji/attest?challenge={challenge}&return={return_url}")
        response = connection.getresponse()
        connection.close()
        assert response.status == 302
        assert (response.getheader("Location") or "").startswith(
            return_url + "?challenge=" + challenge
        )
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Agent started" in out
    assert "Agent stopped." in out
