"""A tiny ASGI app and a subprocess runner for the serving tests: `serve()` over real sockets.

The app reports what the server did (pid, event loop, TCP_NODELAY, raw target) so tests can
assert it from the outside; it does not depend on gateway.app.
Run as `python -m asgi_probe OPTIONS_JSON`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import observability
from gateway.protocol import ProtocolLimits
from gateway.serving import ServeOptions, serve

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("tabiji.probe")


def _nodelay_of(client: tuple[str, int]) -> int | None:
    """TCP_NODELAY of this process's socket connected to `client`, read from the server side."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] != tuple(client):
                    continue
            except OSError:
                continue
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return None


async def _json(send: Send, body: dict[str, Any], status: int = 200) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The probe app factory (what `gateway.app:create_app` is in production)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        raw_target = scope.get("extensions", {}).get("tabiji.raw_target")
        target = raw_target.decode("latin-1") if raw_target is not None else None
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps({"raw_target": target})})
            await send({"type": "websocket.close", "code": 1000})
            return
        path = scope["path"]
        if path == "/slow":
            await asyncio.sleep(float(scope["query_string"] or b"2"))
        elif path == "/log":
            observability.request_id_var.set("req-probe-1")
            observability.route_var.set("probe")
            log.info("probe says\r\nhello", extra={"authorization": "Bearer secret", "n": 1})
        elif path == "/count":
            observability.metrics.request_started()
            observability.stages.add("route", 1500)
            observability.metrics.request_finished("probe", 200, "allow", 0.003)
        await _json(
            send,
            {
                "pid": os.getpid(),
                "loop": type(asyncio.get_running_loop()).__module__,
                "nodelay": _nodelay_of(scope["client"]),
                "raw_target": target,
                "multiproc_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                "config": os.environ.get("TABIJI_CONFIG"),
            },
        )

    return app


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """One GET on a fresh connection; the status and the JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body.startswith(b"{") else {"text": body.decode()})


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class RunningServer:
    """A `serve()` subprocess; `log` is its stderr (JSON lines)."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def running_server(tmp_path: Path, **options: Any) -> Iterator[RunningServer]:
    """Start `serve(ServeOptions(**options))` with the probe app; always stopped by PID at exit."""
    port = free_port()
    options = {
        "port": port,
        "app": "asgi_probe:create_app",
        "graceful_shutdown_seconds": 5,
    } | options
    log_path = tmp_path / f"server-{port}.log"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{Path(__file__).parent}")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "asgi_probe", json.dumps(options)],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a stuck worker can be reaped below
        )
    server = RunningServer(process, port, options.get("metrics_port"), log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers orphaned by a failed test, if any


def _wait_ready(server: RunningServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("server exited at startup:\n" + server.log_path.read_text())
        try:
            http_get(server.port, "/ready", timeout=1)
        except OSError:
            time.sleep(0.05)
            continue
        return
    raise RuntimeError("server not ready:\n" + server.log_path.read_text())


def _main() -> int:
    options = json.loads(sys.argv[1])
    options["limits"] = ProtocolLimits(**options.get("limits", {}))
    return serve(ServeOptions(**options))


if __name__ == "__main__":
    sys.exit(_main())
