"""The pipeline in-process: default deny, fail closed, the reserved namespace, ambiguous targets."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.app import GatewayApp, build_app
from gateway.context import RequestContext
from gateway.decide import Verdict
from gateway.observability import AccessLog
from gateway.settings import load_settings


def closed_port() -> int:
    """A port nothing listens on: a request forwarded there would come back as 502."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


CONFIG = """\
public_url: http://gw.example.test
routes:
  - name: open
    from: http://open.example.test
    to: http://127.0.0.1:{port}
    public: true
  - name: closed
    from: http://closed.example.test
    to: http://127.0.0.1:{port}
"""


@pytest.fixture
def app(tmp_path: Path) -> GatewayApp:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(port=closed_port()), encoding="utf-8")
    return build_app(load_settings(path))


async def call(
    app: GatewayApp, host: str, target: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one HTTP request through the app in-process; return status, headers and body."""
    path, _, query = target.partition(b"?")
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "headers": [(b"host", host.encode()), (b"accept", b"application/json"), *(headers or [])],
        "client": ("198.51.100.9", 50000),
        "server": ("127.0.0.1", 8080),
        "extensions": {"tabiji.raw_target": target},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app.forwarder.start()
    try:
        await app(scope, receive, send)
    finally:
        await app.forwarder.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


class ExplodingDecider:
    """A decision stage that fails, as a broken policy or store might."""

    def decide(self, ctx: RequestContext) -> Verdict:
        raise RuntimeError("policy store unavailable")


@pytest.mark.anyio
async def test_route_without_policy_is_denied(app: GatewayApp) -> None:
    """A route that is neither public nor governed by a policy refuses every request (403)."""
    status, headers, body = await call(app, "closed.example.test", b"/")
    data = json.loads(body)
    assert status == 403
    assert data["reasons"] == ["route-not-public"]
    assert headers[b"x-request-id"].decode() == data["request_id"]


@pytest.mark.anyio
async def test_public_route_is_forwarded(app: GatewayApp) -> None:
    """A public route is forwarded (here to a closed port, so the upstream error shows it)."""
    status, _, body = await call(app, "open.example.test", b"/")
    assert status == 502
    assert json.loads(body)["error"] == "upstream-unavailable"


@pytest.mark.anyio
async def test_an_error_in_the_decision_stage_refuses(app: GatewayApp) -> None:
    """A stage that raises means refusal (500 page), never a forward (which would give 502)."""
    app.pipeline.decider = ExplodingDecider()
    status, _, body = await call(app, "open.example.test", b"/")
    assert status == 500
    assert json.loads(body)["error"] == "gateway-error"


@pytest.mark.anyio
async def test_reserved_namespace_is_served_on_any_host(app: GatewayApp) -> None:
    """/.tabiji/ belongs to the gateway on every host, also when reached through dot-segments."""
    status, headers, body = await call(app, "open.example.test", b"/x/../.tabiji/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "alive"}
    assert b"frame-ancestors 'none'" in headers[b"content-security-policy"]


@pytest.mark.anyio
async def test_readiness_reports_its_checks(app: GatewayApp) -> None:
    """readyz says ready and lists the checks it ran."""
    status, _, body = await call(app, "gw.example.test", b"/.tabiji/readyz")
    data = json.loads(body)
    assert status == 200
    assert data["status"] == "ready"
    assert data["checks"]["config"]["ok"] is True


@pytest.mark.anyio
async def test_absolute_form_must_agree_with_host(app: GatewayApp) -> None:
    """An absolute-form target naming another authority than Host is refused (RFC 9112 §3.2.2)."""
    status, _, body = await call(app, "open.example.test", b"http://closed.example.test/")
    assert status == 400
    assert json.loads(body)["error"] == "target-authority-mismatch"


@pytest.mark.anyio
async def test_unknown_host_is_404(app: GatewayApp) -> None:
    """A Host no route serves is answered by the gateway and never forwarded."""
    status, _, body = await call(app, "evil.example.test", b"/")
    assert status == 404
    assert json.loads(body)["error"] == "route-not-found"


@pytest.mark.anyio
async def test_access_log_line_per_request(app: GatewayApp) -> None:
    """Each request writes one JSON line with its id, route, decision and reasons — no headers."""
    stream = io.StringIO()
    app.pipeline.access_log = AccessLog(stream)
    status, headers, _ = await call(
        app,
        "closed.example.test",
        b"/secret\r\nforged",
        [(b"authorization", b"Bearer s3cr3t"), (b"cookie", b"sid=s3cr3t")],
    )
    app.pipeline.access_log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert status == 400  # the CR/LF target is refused, and still logged
    assert record["request_id"] == headers[b"x-request-id"].decode()
    assert record["status"] == 400
    assert record["decision"] == "error"
    assert "s3cr3t" not in lines[0]
    stream.truncate(0)
    stream.seek(0)
    await call(app, "closed.example.test", b"/x")
    app.pipeline.access_log.flush()
    record = json.loads(stream.getvalue())
    assert (record["route"], record["decision"], record["reasons"]) == (
        "closed",
        "deny",
        ["route-not-public"],
    )
    assert record["policy_hash"] == "none"
