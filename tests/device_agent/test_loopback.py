"""The loopback attestation server on a real 127.0.0.1 port: one redirect back to the enrolled
gateway for a well-formed challenge, a 400 page (never a redirect) for everything else."""

from __future__ import annotations

import http.client
import random
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent import report
from device_agent.keys import FileKeyStore
from device_agent.loopback import LoopbackServer, LoopbackUnavailable

ORIGIN = "https://gw.example"
DEVICE = "dev-1"
CHALLENGE = "q3Jv0lS1d8n7Zb-fA_4xYk2mW9pTt6uHcRrEeGg1Lh0"
RETURN = f"{ORIGIN}/.tabiji/device/attested"


def free_port_range(count: int) -> tuple[int, ...]:
    """`count` consecutive ports that are free right now on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        with ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return tuple(range(base, base + count))
    raise RuntimeError("no free port range")


@dataclass
class Running:
    server: LoopbackServer
    port: int
    public_key: ec.EllipticCurvePublicKey


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Running]:
    """The server with a real file key, on the first port of a free range."""
    key = FileKeyStore(tmp_path / "key").create()

    def attest(challenge: str) -> str:
        with key.signing_key() as signing_key:
            return report.sign_attestation(
                signing_key, device_id=DEVICE, challenge=challenge, origin=ORIGIN, now=time.time()
            )

    server = LoopbackServer(
        origin=ORIGIN, device_id=DEVICE, attest=attest, ports=free_port_range(2), poll_interval=0.05
    )
    port = server.start()
    try:
        yield Running(server, port, key.public_key())
    finally:
        server.stop()


def get(
    port: int,
    target: str,
    *,
    host: str | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, target, skip_host=True)
    connection.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def attest_target(challenge: str | None = CHALLENGE, return_url: str | None = RETURN) -> str:
    query = []
    if challenge is not None:
        query.append(f"challenge={quote(challenge, safe='')}")
    if return_url is not None:
        query.append(f"return={quote(return_url, safe='')}")
    return "/tabiji/attest?" + "&".join(query)


def assert_refused(response: http.client.HTTPResponse, status: int = 400) -> None:
    assert response.status == status
    assert response.getheader("Location") is None
    assert not [
        name for name, _ in response.getheaders() if name.lower().startswith("access-control")
    ]


def test_a_good_challenge_redirects_to_the_enrolled_gateway_with_a_valid_attestation(
    loopback: Running,
) -> None:
    """The answer is a 302 to <origin>/.tabiji/device/attested whose attestation verifies."""
    response = get(loopback.port, attest_target())
    assert response.status == 302
    location = response.getheader("Location") or ""
    parts = urlsplit(location)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == RETURN
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert query["challenge"] == CHALLENGE
    assert query["device"] == DEVICE
    verified = report.verify_attestation(
        query["attestation"],
        loopback.public_key,
        device_id=DEVICE,
        challenge=CHALLENGE,
        origin=ORIGIN,
        now=time.time(),
    )
    assert verified.origin == ORIGIN
    assert response.getheader("Cache-Control") == "no-store"
    assert not [n for n, _ in response.getheaders() if n.lower().startswith("access-control")]


@pytest.mark.parametrize(
    "return_url",
    [
        "https://evil.example/.tabiji/device/attested",
        "https://gw.example.evil.example/.tabiji/device/attested",
        "http://gw.example/.tabiji/device/attested",
        "https://gw.example:8443/.tabiji/device/attested",
        "https://gw.example@evil.example/.tabiji/device/attested",
        "https://evil.example@gw.example/.tabiji/device/attested",
        "https://gw.example/.tabiji/device/attested/",
        "https://gw.example/.tabiji/device/attested2",
        "https://gw.example/.tabiji/device/attested/../../evil",
        "https://gw.example/.tabiji/device/%61ttested",
        "https://gw.example/",
        "https://gw.example/.tabiji/device/attested?next=https://evil.example",
        "https://gw.example/.tabiji/device/attested#frag",
        "https://gw.example\\@evil.example/.tabiji/device/attested",
        "https://gw.example /.tabiji/device/attested",
        "//evil.example/.tabiji/device/attested",
        "/.tabiji/device/attested",
        "javascript:alert(1)//https://gw.example/.tabiji/device/attested",
        "data:text/html,<script>alert(1)</script>",
        "",
    ],
)
def test_any_other_return_is_refused_without_a_redirect(loopback: Running, return_url: str) -> None:
    """Another origin, another path, user info, query, fragment, javascript: or data: → 400."""
    assert_refused(get(loopback.port, attest_target(return_url=return_url)))


@pytest.mark.parametrize(
    "target",
    [
        attest_target(challenge=None),
        attest_target(return_url=None),
        attest_target(challenge="short"),
        attest_target(challenge="has spaces and more than sixteen"),
        attest_target(challenge="x" * 300),
        attest_target() + "&challenge=" + CHALLENGE,
        attest_target() + "&return=" + quote(RETURN, safe=""),
        attest_target() + "&extra=1",
        "/tabiji/attest",
        "/tabiji/attest?challenge",
    ],
)
def test_malformed_requests_are_refused(loopback: Running, target: str) -> None:
    """Missing, short, odd or repeated parameters are a 400 page, not a redirect."""
    assert_refused(get(loopback.port, target))


def test_other_paths_are_not_found(loopback: Running) -> None:
    """Nothing else is served: any other path is a 404 page without a redirect."""
    for target in (
        "/",
        "/favicon.ico",
        "/tabiji/attest/",
        "/tabiji/attestx?" + attest_target()[15:],
    ):
        assert_refused(get(loopback.port, target), status=404)


@pytest.mark.parametrize(
    "host",
    ["localhost:{port}", "evil.example:{port}", "127.0.0.1", "127.0.0.1:1", "[::1]:{port}", ""],
)
def test_a_foreign_host_header_is_refused(loopback: Running, host: str) -> None:
    """DNS rebinding: a request whose Host is not exactly 127.0.0.1:<port> is refused."""
    assert_refused(get(loopback.port, attest_target(), host=host.format(port=loopback.port)))


@pytest.mark.parametrize(
    "method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"]
)
def test_only_get_is_answered(loopback: Running, method: str) -> None:
    """Every other method is refused; a CORS preflight gets no Access-Control header."""
    response = get(
        loopback.port,
        attest_target(),
        method=method,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert_refused(response, status=405)


def test_the_refusal_page_speaks_the_browsers_language(loopback: Running) -> None:
    """Japanese by default, English when the browser prefers English."""
    target = attest_target(return_url="https://evil.example/.tabiji/device/attested")
    connection = http.client.HTTPConnection("127.0.0.1", loopback.port, timeout=10)
    connection.request("GET", target)
    japanese = connection.getresponse().read().decode()
    connection.close()
    assert "登録されたゲートウェイ以外" in japanese
    connection = http.client.HTTPConnection("127.0.0.1", loopback.port, timeout=10)
    connection.request("GET", target, headers={"Accept-Language": "en-GB,en;q=0.9"})
    response = connection.getresponse()
    english = response.read().decode()
    connection.close()
    assert (
        "not the gateway this device is enrolled with" in english or "did not come from" in english
    )
    assert response.getheader("Content-Security-Policy") == "default-src 'none'"


def test_a_signing_failure_is_a_page_not_a_redirect(tmp_path: Path) -> None:
    """When the key cannot sign (TPM gone), the browser gets a 500 page and no redirect."""

    def broken(challenge: str) -> str:
        raise RuntimeError("the TPM went away")

    server = LoopbackServer(
        origin=ORIGIN, device_id=DEVICE, attest=broken, ports=free_port_range(1), poll_interval=0.05
    )
    port = server.start()
    try:
        assert_refused(get(port, attest_target()), status=500)
    finally:
        server.stop()


def test_the_first_free_port_of_the_range_is_taken(tmp_path: Path) -> None:
    """A busy first port moves the server to the next; a fully busy range is a clear error."""
    ports = free_port_range(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[0]))
        squatter.listen()
        server = LoopbackServer(
            origin=ORIGIN, device_id=DEVICE, attest=lambda c: c, ports=ports, poll_interval=0.05
        )
        assert server.start() == ports[1]
        try:
            with pytest.raises(LoopbackUnavailable):
                LoopbackServer(
                    origin=ORIGIN, device_id=DEVICE, attest=lambda c: c, ports=ports
                ).start()
        finally:
            server.stop()


def test_it_listens_on_loopback_only(loopback: Running) -> None:
    """The socket is bound to 127.0.0.1, not to every interface."""
    assert loopback.server._server is not None
    assert loopback.server._server.server_address[0] == "127.0.0.1"
