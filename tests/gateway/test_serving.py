"""serve() over real sockets: graceful shutdown, several workers, SIGHUP, exported config path."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from asgi_probe import free_port, http_get, running_server

from gateway.serving import ServeOptions, build_config

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _slow_request(port: int, seconds: float, out: dict[str, object]) -> None:
    try:
        out["status"], out["body"] = http_get(port, f"/slow?{seconds}", timeout=30)
    except OSError as exc:
        out["error"] = exc


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_options_reject_half_tls() -> None:
    """A certificate without a key (or the reverse) is a usage error, not plain HTTP."""
    with pytest.raises(ValueError, match="TLS"):
        ServeOptions(ssl_certfile="cert.pem")


def test_config_pins_the_safe_defaults() -> None:
    """The uvicorn Config uses uvloop, our protocols, no proxy-header trust and no server header."""
    config = build_config(ServeOptions(app="asgi_probe:create_app"))
    assert config.loop == "uvloop"
    assert config.proxy_headers is False
    assert config.server_header is False
    assert config.http.__name__ == "TabijiHttpProtocol"  # type: ignore[union-attr]
    assert config.ws.__name__ == "TabijiWebSocketProtocol"  # type: ignore[union-attr]


@pytest.mark.slow
def test_graceful_shutdown_single_worker(tmp_path: Path) -> None:
    """After SIGTERM a slow in-flight request completes, new connections are refused, exit 0."""
    with running_server(tmp_path, graceful_shutdown_seconds=5, config_path="/etc/t.yaml") as server:
        assert http_get(server.port, "/info")[1]["config"] == "/etc/t.yaml"
        out: dict[str, object] = {}
        worker = threading.Thread(target=_slow_request, args=(server.port, 2, out))
        worker.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert _refused(server.port)
        worker.join(timeout=10)
        assert out.get("status") == 200
        assert server.stop(timeout=10) == 0
        assert time.monotonic() - started < 5


@pytest.mark.slow
def test_grace_exceeded_cancels_request(tmp_path: Path) -> None:
    """A request longer than the grace is cut and the process still exits soon after the grace."""
    with running_server(tmp_path, graceful_shutdown_seconds=1) as server:
        out: dict[str, object] = {}
        worker = threading.Thread(target=_slow_request, args=(server.port, 30, out))
        worker.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.stop(timeout=10) == 0
        assert time.monotonic() - started < 3
        worker.join(timeout=10)
        assert out.get("status") != 200


@pytest.mark.slow
def test_sighup_is_ignored_with_one_worker(tmp_path: Path) -> None:
    """With one worker SIGHUP is logged and ignored instead of killing the server mid-request."""
    with running_server(tmp_path) as server:
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert http_get(server.port, "/info")[0] == 200
        assert any("SIGHUP ignored" in line for line in server.log_lines())


@pytest.mark.slow
def test_two_workers_serve_and_stop_gracefully(tmp_path: Path) -> None:
    """Two uvloop workers with TCP_NODELAY serve, metrics sum over both, SIGTERM drains them."""
    metrics_port = free_port()
    with running_server(
        tmp_path, workers=2, metrics_port=metrics_port, metrics_flush_seconds=0.1
    ) as server:
        pids: set[int] = set()
        multiproc_dir = None
        for _ in range(40):
            status, body = http_get(server.port, "/count")
            assert status == 200
            assert body["loop"] == "uvloop"
            assert body["nodelay"] == 1
            pids.add(body["pid"])
            multiproc_dir = body["multiproc_dir"]
        assert server.process.pid not in pids
        assert multiproc_dir is not None
        assert Path(multiproc_dir).is_dir()
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'tabiji_requests_total{decision="allow",route="probe",status="200"} 40.0' in text
        assert 'tabiji_stage_calls_total{stage="route"} 40.0' in text

        out: dict[str, object] = {}
        worker = threading.Thread(target=_slow_request, args=(server.port, 2, out))
        worker.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.8)  # the supervisor notices within 0.5 s
        assert _refused(server.port)
        worker.join(timeout=10)
        assert out.get("status") == 200
        assert server.stop(timeout=15) == 0
        assert not any(_alive(pid) for pid in pids)
        assert not Path(multiproc_dir).exists()


@pytest.mark.slow
def test_sighup_rolls_workers(tmp_path: Path) -> None:
    """With two workers SIGHUP replaces every worker while the socket keeps serving."""
    with running_server(tmp_path, workers=2) as server:
        before = {http_get(server.port, "/info")[1]["pid"] for _ in range(20)}
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        after: set[int] = set()
        while time.monotonic() < deadline:
            assert http_get(server.port, "/info")[0] == 200  # never a refused connection
            if not any(_alive(pid) for pid in before):
                after = {http_get(server.port, "/info")[1]["pid"] for _ in range(20)}
                break
            time.sleep(0.1)
        assert after
        assert not after & before
