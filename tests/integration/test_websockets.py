"""WebSockets through the gateway: text, binary, close codes and reasons both ways, and refusals
on routes that do not allow them."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from .conftest import Gateway, Upstream

pytestmark = pytest.mark.integration


def _ws_url(gateway: Gateway, path: str) -> str:
    return f"ws://127.0.0.1:{gateway.port}{path}"


def test_text_and_binary_messages_are_relayed(gateway: Gateway) -> None:
    """Text stays text and binary stays binary, both ways, byte for byte."""
    with connect(_ws_url(gateway, "/public/_up/ws"), open_timeout=10) as ws:
        ws.send("こんにちは, gateway")
        assert ws.recv(timeout=5) == "こんにちは, gateway"
        payload = bytes(range(256)) * 64
        ws.send(payload)
        assert ws.recv(timeout=5) == payload
        assert ws.response is not None
        assert ws.response.headers["x-request-id"]


def test_upstream_sees_gateway_headers_on_the_handshake(gateway: Gateway) -> None:
    """The upstream handshake carries the gateway's headers, not the client's spoofed ones."""
    with connect(
        _ws_url(gateway, "/public/_up/ws"),
        additional_headers={"X-Forwarded-For": "203.0.113.5", "X-Tabiji-User": "mayor"},
        open_timeout=10,
    ) as ws:
        ws.send("headers")
        seen = {k.lower(): v for k, v in json.loads(ws.recv(timeout=5)).items()}
        assert ws.response is not None
        request_id = ws.response.headers["x-request-id"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"] == request_id
    assert not [name for name in seen if name.startswith("x-tabiji-")]


def test_upstream_close_code_and_reason_reach_the_client(gateway: Gateway) -> None:
    """When the upstream closes with 4321 "bye now", the client sees that code and reason."""
    with connect(_ws_url(gateway, "/public/_up/ws"), open_timeout=10) as ws:
        ws.send("close:4321:bye now")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4321
    assert closed.value.rcvd.reason == "bye now"


def test_client_close_code_and_reason_reach_the_upstream(
    gateway: Gateway, upstream: Upstream
) -> None:
    """When the client closes with 4000 "client done", the upstream sees that code and reason."""
    ident = uuid.uuid4().hex
    with connect(_ws_url(gateway, f"/public/_up/ws?id={ident}"), open_timeout=10) as ws:
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
        ws.close(code=4000, reason="client done")
    deadline = time.monotonic() + 5
    while ident not in upstream.state()["ws_closes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.state()["ws_closes"][ident] == [4000, "client done"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/nows/_up/ws", 403), ("/admin/_up/ws", 403), ("/.tabiji/healthz", 404)],
)
def test_upgrade_refused_where_not_allowed(
    gateway: Gateway, upstream: Upstream, path: str, status: int
) -> None:
    """Routes without websockets: true (or not allowed at all) refuse the upgrade with a status."""
    marker = uuid.uuid4().hex
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(gateway, f"{path}?{marker}"), open_timeout=10)
    assert refused.value.response.status_code == status
    assert upstream.received(marker) == []


def test_upgrade_is_routed_on_the_normalised_path(gateway: Gateway) -> None:
    """A handshake to /nows/../public/… is routed (and relayed) as /public/…, which allows it."""
    with connect(_ws_url(gateway, "/nows/../public/_up/ws"), open_timeout=10) as ws:
        ws.send("via dots")
        assert ws.recv(timeout=5) == "via dots"


def test_upgrade_cannot_reach_a_refusing_route_by_dots(
    gateway: Gateway, upstream: Upstream
) -> None:
    """A handshake to /public/../nows/… ends at /nows, which refuses WebSockets."""
    marker = uuid.uuid4().hex
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(gateway, f"/public/../nows/_up/ws?{marker}"), open_timeout=10)
    assert refused.value.response.status_code == 403
    assert upstream.received(marker) == []


def test_upgrade_with_ambiguous_target_is_400(gateway: Gateway, upstream: Upstream) -> None:
    """A handshake whose target has an encoded slash is refused with 400, never relayed."""
    marker = uuid.uuid4().hex
    with pytest.raises(InvalidStatus) as refused:
        connect(_ws_url(gateway, f"/public%2F_up/ws?{marker}"), open_timeout=10)
    assert refused.value.response.status_code == 400
    assert upstream.received(marker) == []
