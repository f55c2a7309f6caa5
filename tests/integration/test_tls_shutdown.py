"""Graceful stop of a gateway that terminates TLS itself: idle keep-alive connections are closed at
once, in-flight requests still finish, and the process exits long before the grace period ends."""

from __future__ import annotations

import concurrent.futures
import http.client
import signal
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Gateway, Upstream, gateway_config, run_gateway, standard_routes
from .idp_fixture import make_ca

pytestmark = pytest.mark.integration

GRACE_SECONDS = 20
# Well under the grace: a stop bounded by the grace (the bug) can never pass, a prompt one always
# does even on a loaded machine. Plain HTTP stops in about 0.3 s.
EXIT_BOUND_SECONDS = 10.0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path, Path]:
    """A client context trusting a fresh test CA, and a server certificate and key for 127.0.0.1."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory)
    cert, key = ca.issue(["127.0.0.1"], directory)
    return ssl.create_default_context(cafile=str(ca.ca_path)), cert, key


@pytest.fixture
def tls_gateway(
    upstream: Upstream, tmp_path: Path, tls_files: tuple[ssl.SSLContext, Path, Path]
) -> Iterator[Gateway]:
    """A gateway of its own (each test stops it), serving HTTPS with a 20 s grace period."""
    context, cert, key = tls_files

    def build(port: int) -> dict[str, object]:
        return gateway_config(
            port,
            standard_routes(port, upstream.port),
            public_url=f"https://127.0.0.1:{port}",
            tls={"cert": str(cert), "key": str(key)},
            # The gateway's own keep-alive timer must not be what closes the idle connection.
            server={"graceful_shutdown": f"{GRACE_SECONDS}s", "keep_alive_timeout": "60s"},
        )

    with run_gateway(tmp_path, build, scheme="https", client={"verify": context}) as gateway:
        yield gateway


def _idle_keep_alive(gateway: Gateway, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """A TLS connection that made one request and is kept open, idle, never reading again."""
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=30)
    connection.request("GET", "/public/idle")
    response = connection.getresponse()
    assert response.status == 200
    response.read()
    assert not response.will_close, "the gateway did not keep the connection alive"
    return connection


def _stop_seconds(gateway: Gateway) -> float:
    """SIGTERM the gateway and return how long it took to exit (asserting it exited 0)."""
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=GRACE_SECONDS + 15) == 0
    return time.monotonic() - started


@pytest.mark.slow
def test_idle_tls_keep_alive_does_not_hold_the_stop(
    tls_gateway: Gateway, tls_files: tuple[ssl.SSLContext, Path, Path]
) -> None:
    """An idle keep-alive TLS client (which never sends close_notify) does not make a SIGTERM wait
    out the grace period: the gateway exits within 10 s of a 20 s grace."""
    idle = _idle_keep_alive(tls_gateway, tls_files[0])
    try:
        took = _stop_seconds(tls_gateway)
    finally:
        idle.close()
    assert took < EXIT_BOUND_SECONDS, f"the stop took {took:.1f}s (grace {GRACE_SECONDS}s)"


@pytest.mark.slow
def test_in_flight_tls_request_completes_while_idle_ones_are_closed(
    upstream: Upstream, tls_gateway: Gateway, tls_files: tuple[ssl.SSLContext, Path, Path]
) -> None:
    """During the drain a slow in-flight request over TLS still gets its whole answer, an idle
    keep-alive TLS connection is closed, and the gateway exits soon after the request ends."""
    context = tls_files[0]
    marker = uuid.uuid4().hex
    idle = _idle_keep_alive(tls_gateway, context)
    slow = http.client.HTTPSConnection("127.0.0.1", tls_gateway.port, context=context, timeout=30)

    def slow_request() -> tuple[int, bytes]:
        slow.request("GET", f"/public/_up/slow?s=2&m={marker}")
        response = slow.getresponse()
        return response.status, response.read()

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(slow_request)
            deadline = time.monotonic() + 10
            while not upstream.received(marker):
                assert time.monotonic() < deadline, "the slow request never reached the upstream"
                time.sleep(0.02)
            took = _stop_seconds(tls_gateway)
            status, body = pending.result(timeout=5)
    finally:
        idle.close()
        slow.close()
    assert status == 200
    assert body == b'{"slept": 2.0}'
    assert took < EXIT_BOUND_SECONDS, f"the stop took {took:.1f}s (grace {GRACE_SECONDS}s)"
