"""Process lifecycle: graceful shutdown lets in-flight requests finish; --workers 2 serves and
stops cleanly."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from .conftest import Upstream, gateway_config, run_gateway, standard_routes

pytestmark = pytest.mark.integration


def _workers(pid: int) -> set[int]:
    """The worker processes of a supervisor (multiprocessing's resource tracker excluded)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.slow
def test_in_flight_request_completes_after_sigterm(upstream: Upstream, tmp_path: Path) -> None:
    """After SIGTERM, a slow in-flight request still completes, new connections are refused, and
    the gateway exits 0."""
    marker = uuid.uuid4().hex
    with (
        run_gateway(
            tmp_path,
            lambda port: gateway_config(
                port, standard_routes(port, upstream.port), server={"graceful_shutdown": "10s"}
            ),
        ) as gateway,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        pending = pool.submit(
            httpx.get, gateway.url(f"/public/_up/slow?s=2&m={marker}"), timeout=20
        )
        deadline = time.monotonic() + 10
        while not upstream.received(marker):
            assert time.monotonic() < deadline, "the slow request never reached the upstream"
            time.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert gateway.process.poll() is None, "the gateway did not wait for the request"
        assert _refused(gateway.port)
        response = pending.result(timeout=20)
        assert response.status_code == 200
        assert response.json() == {"slept": 2.0}
        assert gateway.process.wait(timeout=10) == 0


@pytest.mark.slow
def test_two_workers_serve_and_stop_cleanly(upstream: Upstream, tmp_path: Path) -> None:
    """With --workers 2, two worker processes serve requests and all exit on SIGTERM."""
    with run_gateway(
        tmp_path,
        lambda port: gateway_config(port, standard_routes(port, upstream.port)),
        workers=2,
    ) as gateway:
        deadline = time.monotonic() + 20
        while len(workers := _workers(gateway.process.pid)) < 2:
            assert time.monotonic() < deadline, f"workers: {workers}"
            time.sleep(0.1)
        assert len(workers) == 2
        with httpx.Client(base_url=gateway.origin, timeout=10) as client:
            for i in range(20):
                response = client.get(f"/public/w{i}")
                assert response.status_code == 200
                assert response.json()["raw_path"] == f"/public/w{i}"
            assert client.get("/admin/x").status_code == 403
            assert client.get("/.tabiji/readyz").status_code == 200
        # Fresh connections too (uvicorn hands connections to either worker).
        for _ in range(10):
            assert httpx.get(gateway.url("/public/fresh"), timeout=10).status_code == 200
        assert gateway.stop() == 0
    for pid in workers:
        assert not _alive(pid)
