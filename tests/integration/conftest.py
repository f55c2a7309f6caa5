"""Fixtures that start real servers on 127.0.0.1: the test upstream and the gateway itself.

The gateway runs as `python -m gateway.cli serve --config FILE` in a subprocess, exactly as an
operator starts it; it is stopped by its PID (SIGTERM, then SIGKILL), and its stderr is attached
to the report of any failing test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .idp_fixture import idp, idp_b, idp_ca, idp_logout_receiver  # noqa: F401 — shared fixtures

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_SCRIPT = Path(__file__).with_name("upstream_app.py")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

_LIVE: list[Gateway] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM by PID, then SIGKILL after `timeout`; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return int(process.returncode)


# -- the upstream ------------------------------------------------------------------------------


@dataclass
class Upstream:
    """The test upstream (tests/integration/upstream_app.py) and a direct client for its log."""

    port: int
    process: subprocess.Popen[str]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        """What the upstream saw, asked directly (never through the gateway)."""
        response = httpx.get(self.origin + "/_up/log", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def received(self, marker: str) -> list[str]:
        """Raw paths the upstream received that contain `marker`."""
        return [path for path in self.state()["log"] if marker in path]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """One real upstream server for the whole session."""
    stderr_path = tmp_path_factory.mktemp("upstream") / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(UPSTREAM_SCRIPT), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            stop_process(process)
            pytest.fail(f"the test upstream did not start: {line!r} {stderr_path.read_text()}")
        yield Upstream(int(line), process)
    finally:
        stop_process(process)
        if process.stdout is not None:
            process.stdout.close()


# -- the gateway -------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A running gateway subprocess."""

    port: int
    process: subprocess.Popen[bytes]
    config_path: Path
    stderr_path: Path
    scheme: str = "http"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        return stop_process(self.process, timeout)


def route(name: str, frm: str, to: str, **options: Any) -> dict[str, Any]:
    """One route entry of the config."""
    return {"name": name, "from": frm, "to": to, **options}


def gateway_config(port: int, routes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """A whole gateway config listening on 127.0.0.1:`port`."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "public_url": f"http://127.0.0.1:{port}",
        "routes": routes,
    }
    config.update(top)
    return config


def standard_routes(port: int, upstream_port: int) -> list[dict[str, Any]]:
    """The routes most modules use; all on Host 127.0.0.1:`port`, all to the test upstream.

    /public (public), /admin (not public: refused until the policy engine lands), /nows (public,
    no WebSockets), /keephost (preserve_host), /small (1 KiB body limit), /slow (1 s read
    timeout), /dead (an upstream port nothing listens on), / (public catch-all with WebSockets).
    """
    frm = f"http://127.0.0.1:{port}"
    to = f"http://127.0.0.1:{upstream_port}"
    return [
        route("public", frm + "/public", to, public=True, websockets=True),
        route("admin", frm + "/admin", to),
        route("nows", frm + "/nows", to, public=True),
        route("keephost", frm + "/keephost", to, public=True, preserve_host=True),
        route("small", frm + "/small", to, public=True, max_body_bytes=1024),
        route("slow", frm + "/slow", to, public=True, read_timeout="1s"),
        route("dead", frm + "/dead", f"http://127.0.0.1:{free_port()}", public=True),
        route("root", frm, to, public=True, websockets=True),
    ]


def wait_healthy(gateway: Gateway, timeout: float = START_TIMEOUT, **client: Any) -> None:
    """Poll /.tabiji/healthz until it answers 200; fail with the gateway's stderr otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(
                f"the gateway exited with {gateway.process.returncode}:\n{gateway.stderr()}"
            )
        with contextlib.suppress(httpx.TransportError):
            response = httpx.get(gateway.url("/.tabiji/healthz"), timeout=2, **client)
            if response.status_code == 200:
                return
        time.sleep(0.05)
    gateway.stop()
    pytest.fail(f"the gateway did not become healthy in {timeout}s:\n{gateway.stderr()}")


@contextlib.contextmanager
def run_gateway(
    directory: Path,
    build: Callable[[int], dict[str, Any]],
    *,
    workers: int | None = None,
    scheme: str = "http",
    client: dict[str, Any] | None = None,
) -> Iterator[Gateway]:
    """Write the config `build(port)` into `directory`, serve it, yield once healthy, stop it."""
    port = free_port()
    config_path = directory / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(build(port), sort_keys=False), "utf-8")
    stderr_path = directory / "gateway.stderr.log"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stderr, stderr=subprocess.STDOUT
        )
    gateway = Gateway(port, process, config_path, stderr_path, scheme=scheme)
    _LIVE.append(gateway)
    try:
        wait_healthy(gateway, **(client or {}))
        yield gateway
    finally:
        gateway.stop()
        _LIVE.remove(gateway)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the stderr of every live gateway to a failing test's report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for gateway in _LIVE:
            tail = gateway.stderr()[-6000:]
            report.sections.append((f"gateway :{gateway.port} stderr (tail)", tail))


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with the standard routes, one per test module."""
    with run_gateway(
        tmp_path_factory.mktemp("gateway"),
        lambda port: gateway_config(port, standard_routes(port, upstream.port)),
    ) as running:
        yield running


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    """An httpx client for the module's gateway (redirects never followed)."""
    with httpx.Client(base_url=gateway.origin, timeout=10, follow_redirects=False) as http:
        yield http


# -- raw HTTP/1.1 over a socket ----------------------------------------------------------------


@dataclass
class RawResponse:
    """A response read off a raw socket."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_exchange(
    port: int, data: bytes, *, method: str = "GET", timeout: float = 10
) -> RawResponse:
    """Send `data` as-is on a new connection and parse one response (no client normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
        return RawResponse(response.status, response.headers, body)


def raw_get(
    port: int,
    target: str,
    *,
    host: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    method: str = "GET",
) -> RawResponse:
    """`METHOD target HTTP/1.1` with the request-target exactly as given."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return raw_exchange(port, head, method=method)


def echo_headers(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of header `name` the upstream received, from its echo."""
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


class RssSampler:
    """Samples a process's VmRSS (from /proc) in a thread; `peak` is the highest seen, in bytes."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.rss())
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
