"""The agent's gateway client against a real HTTP(S) protocol peer on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from agent_gateway_peer import Device, running_peer
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent import report
from device_agent.client import GatewayClient, GatewayError, gateway_origin
from device_agent.report import PostureFacts, PostureReport


@pytest.mark.parametrize(
    ("typed", "origin"),
    [
        ("https://gw.example", "https://gw.example"),
        ("https://GW.Example/", "https://gw.example"),
        ("https://gw.example:443", "https://gw.example"),
        ("https://gw.example:8443", "https://gw.example:8443"),
        ("  https://gw.example  ", "https://gw.example"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://localhost", "http://localhost"),
        ("https://[::1]:9000", "https://[::1]:9000"),
    ],
)
def test_gateway_origin_normalises(typed: str, origin: str) -> None:
    """What the user types becomes one canonical origin (the `aud` of every report)."""
    assert gateway_origin(typed) == origin


@pytest.mark.parametrize(
    ("typed", "code"),
    [
        ("gw.example", "gateway-url-invalid"),
        ("ftp://gw.example", "gateway-url-invalid"),
        ("https://user:pw@gw.example", "gateway-url-invalid"),
        ("https://gw.example/portal", "gateway-url-invalid"),
        ("https://gw.example/?x=1", "gateway-url-invalid"),
        ("https://gw.example:99999", "gateway-url-invalid"),
        ("http://gw.example", "gateway-url-insecure"),
    ],
)
def test_gateway_origin_refuses(typed: str, code: str) -> None:
    """Anything but an https origin (or http to this machine) is refused with a precise code."""
    with pytest.raises(GatewayError) as caught:
        gateway_origin(typed)
    assert caught.value.code == code


def _enrolment_token(key: ec.EllipticCurvePrivateKey, origin: str) -> str:
    request = {"hostname": "pc", "serial": "", "os": "linux", "key_storage": "software"}
    return report.sign_enrolment(key, request=request, audience=origin, now=time.time())


def test_enrol_and_poll_speak_the_protocol() -> None:
    """Enrolment gives a ticket on the gateway's origin; polls follow the gateway's decision."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        ticket = client.enrol(_enrolment_token(key, peer.origin))
        assert ticket.user_code == "KXQP-7MZD"
        assert ticket.confirm_url.startswith(peer.origin + "/.tabiji/devices/confirm?")
        assert ticket.credential is None
        poll = report.sign_enrolment(
            key,
            request={"enrolment_id": ticket.enrolment_id},
            audience=peer.origin,
            now=time.time(),
        )
        assert client.poll(poll).status == "waiting-for-user"
        peer.state.decision = "approved"
        approved = client.poll(poll)
        assert approved.status == "approved"
        assert approved.device_id is not None
        assert approved.certificate is not None
        assert "BEGIN CERTIFICATE" in approved.certificate


def test_a_confirm_link_on_another_origin_is_refused() -> None:
    """The user is never sent to a link outside the gateway they named."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.confirm_origin = "https://evil.example"
        with pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
        assert caught.value.code == "gateway-answer-malformed"


def test_refusals_carry_the_gateways_code_and_texts() -> None:
    """A 4xx answer is a GatewayError with the gateway's code and ja/en message, not retryable."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        device = Device("dev-1", key.public_key())
        peer.state.devices["dev-1"] = device
        peer.state.revoked = True
        token = report.sign_report(
            PostureReport("dev-1", peer.origin, 1, int(time.time()), PostureFacts(os="linux")), key
        )
        with pytest.raises(GatewayError) as caught:
            client.report(token)
    assert caught.value.code == "device-revoked"
    assert caught.value.status == 403
    assert caught.value.message["ja"] == "この端末は取り消されています。"
    assert not caught.value.retryable


def test_a_report_answer_is_parsed_into_values() -> None:
    """An accepted report gives status, reasons, localised fixes and the next interval."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.devices["dev-1"] = Device("dev-1", key.public_key())
        peer.state.decision = "approved"
        peer.state.reasons = ["device-disk-unencrypted"]
        peer.state.fixes = [
            {
                "code": "device-disk-unencrypted",
                "title": {"ja": "ディスクの暗号化が無効です", "en": "Disk encryption is off"},
                "fix": {"ja": "設定で有効にしてください", "en": "Turn it on"},
            }
        ]
        peer.state.next_report_in = 120
        token = report.sign_report(
            PostureReport("dev-1", peer.origin, 1, int(time.time()), PostureFacts(os="linux")), key
        )
        answer = client.report(token)
    assert answer.accepted
    assert answer.status == "approved"
    assert answer.reasons == ("device-disk-unencrypted",)
    assert answer.fixes[0].fix["ja"] == "設定で有効にしてください"
    assert answer.next_report_in == 120


def test_redirects_are_never_followed() -> None:
    """A redirect is an error; the signed body never reaches the Location's server."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as elsewhere, running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.redirect_to = elsewhere.origin + "/.tabiji/devices/enroll"
        with pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
        assert caught.value.code == "gateway-redirected"
        assert elsewhere.state.requests == []


def test_oversized_answers_are_refused() -> None:
    """An answer beyond the size limit is refused before it is parsed."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.oversized = True
        with pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
        assert caught.value.code == "gateway-answer-too-large"


@pytest.mark.parametrize("body", [b"<html>hello</html>", b"[1, 2]", b'{"user_code": 7}'])
def test_malformed_answers_are_refused(body: bytes) -> None:
    """A 200 that is not the protocol's JSON object is gateway-answer-malformed."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.raw_body = body
        with pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
        assert caught.value.code == "gateway-answer-malformed"


def test_server_errors_and_unreachable_gateways_are_retryable() -> None:
    """5xx answers and refused connections say 'try again later'."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer() as peer, GatewayClient(peer.origin) as client:
        peer.state.fail_next = 1
        with pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
        assert caught.value.code == "gateway-unavailable"
        assert caught.value.retryable
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with (
        GatewayClient(f"http://127.0.0.1:{closed_port}", timeout=5) as client,
        pytest.raises(GatewayError) as caught,
    ):
        client.enrol("x.y.z")
    assert caught.value.code == "gateway-unreachable"
    assert caught.value.retryable


def test_tls_with_a_private_ca_file(tmp_path: Path) -> None:
    """An HTTPS gateway with a private CA works with --ca-file and is refused without it."""
    key = ec.generate_private_key(ec.SECP256R1())
    with running_peer(tls_dir=tmp_path) as peer:
        with GatewayClient(peer.origin, ca_file=tmp_path / "server-ca.pem") as client:
            assert client.enrol(_enrolment_token(key, peer.origin)).user_code == "KXQP-7MZD"
        with GatewayClient(peer.origin) as client, pytest.raises(GatewayError) as caught:
            client.enrol(_enrolment_token(key, peer.origin))
    assert caught.value.code == "gateway-tls-untrusted"


def test_an_unreadable_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    """A CA file that does not exist is refused up front with its own code."""
    with pytest.raises(GatewayError) as caught:
        GatewayClient("https://gw.example", ca_file=tmp_path / "nope.pem")
    assert caught.value.code == "gateway-ca-file-unreadable"
