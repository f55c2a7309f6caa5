"""Header hygiene over real sockets: proxy headers, the X-Tabiji- namespace, hop-by-hop fields,
X-Request-Id and Host, seen from the upstream's side and the client's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import (
    Gateway,
    Upstream,
    echo_headers,
    gateway_config,
    route,
    run_gateway,
    standard_routes,
)

pytestmark = pytest.mark.integration

HEX32 = re.compile(r"[0-9a-f]{32}")

SPOOFED = {
    "X-Forwarded-For": "203.0.113.66",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Port": "8443",
    "Forwarded": "for=203.0.113.66;proto=https;host=evil.example",
    "X-Real-IP": "203.0.113.66",
}


@pytest.fixture(scope="module")
def trusting_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A second gateway that trusts 127.0.0.1 as a proxy (so the test client is a proxy)."""

    def build(port: int) -> dict[str, Any]:
        # The proxy in front names the public host in X-Forwarded-Host: route it too.
        portal = route("portal", "https://portal.town.example", upstream.origin, public=True)
        routes = [portal, *standard_routes(port, upstream.port)]
        return gateway_config(port, routes, trusted_proxies=["127.0.0.1/32"])

    with run_gateway(tmp_path_factory.mktemp("trusting"), build) as running:
        yield running


def _echo(gateway: Gateway, path: str = "/public/echo", **kwargs: Any) -> httpx.Response:
    response = httpx.get(gateway.url(path), timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    return response


def test_spoofed_proxy_headers_from_untrusted_peer_are_replaced(gateway: Gateway) -> None:
    """An untrusted client's X-Forwarded-*/Forwarded/X-Real-IP are dropped; the gateway's stand."""
    echo = _echo(gateway, headers=SPOOFED).json()
    assert echo_headers(echo, "x-forwarded-for") == ["127.0.0.1"]
    assert echo_headers(echo, "x-forwarded-proto") == ["http"]
    assert echo_headers(echo, "x-forwarded-host") == [gateway.host]
    assert echo_headers(echo, "forwarded") == [f'for=127.0.0.1;proto=http;host="{gateway.host}"']
    assert echo_headers(echo, "x-real-ip") == []
    assert echo_headers(echo, "x-forwarded-port") == []
    assert "203.0.113.66" not in str(echo["headers"])
    assert "evil.example" not in str(echo["headers"])


def test_trusted_proxy_chain_is_honoured_and_extended(trusting_gateway: Gateway) -> None:
    """From a trusted proxy, X-Forwarded-* are believed (routing included) and extended."""
    echo = _echo(
        trusting_gateway,
        headers={
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "portal.town.example",
        },
    ).json()
    assert echo_headers(echo, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    assert echo_headers(echo, "x-forwarded-proto") == ["https"]
    assert echo_headers(echo, "x-forwarded-host") == ["portal.town.example"]
    assert echo_headers(echo, "forwarded") == [
        "for=203.0.113.7;proto=https;host=portal.town.example, for=127.0.0.1"
    ]


def test_trusted_proxy_forwarded_header_gives_client_ip(trusting_gateway: Gateway) -> None:
    """From a trusted proxy, an RFC 7239 Forwarded header alone names the client."""
    echo = _echo(trusting_gateway, headers={"Forwarded": "for=198.51.100.9;proto=http"}).json()
    assert echo_headers(echo, "x-forwarded-for") == ["198.51.100.9, 127.0.0.1"]
    assert echo_headers(echo, "x-real-ip") == []


def test_trusted_proxy_cannot_inject_x_real_ip(trusting_gateway: Gateway) -> None:
    """X-Real-IP is dropped even from a trusted proxy (the gateway writes the client address)."""
    echo = _echo(trusting_gateway, headers={"X-Real-IP": "203.0.113.1"}).json()
    assert echo_headers(echo, "x-real-ip") == []


@pytest.mark.parametrize("which", ["untrusted", "trusted"])
def test_x_tabiji_headers_are_always_dropped(
    which: str, gateway: Gateway, trusting_gateway: Gateway
) -> None:
    """Every client-sent X-Tabiji-* header is dropped, whoever the peer is."""
    target = gateway if which == "untrusted" else trusting_gateway
    echo = _echo(
        target,
        headers={"X-Tabiji-User": "mayor", "x-tabiji-device": "trusted", "X-TABIJI-Z": "1"},
    ).json()
    assert [k for k, _ in echo["headers"] if k.lower().startswith("x-tabiji-")] == []


@pytest.mark.parametrize(
    "named",
    [
        "X-Forwarded-For",
        "X-Request-Id",
        "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Forwarded, X-Request-Id, Host",
    ],
)
def test_connection_tokens_cannot_remove_gateway_headers(gateway: Gateway, named: str) -> None:
    """Naming the gateway's own headers in Connection does not remove or alter them upstream."""
    response = _echo(gateway, headers={"Connection": f"keep-alive, {named}"})
    echo = response.json()
    assert echo_headers(echo, "x-forwarded-for") == ["127.0.0.1"]
    assert echo_headers(echo, "x-forwarded-proto") == ["http"]
    assert echo_headers(echo, "x-forwarded-host") == [gateway.host]
    assert len(echo_headers(echo, "forwarded")) == 1
    assert echo_headers(echo, "x-request-id") == [response.headers["x-request-id"]]
    assert len(echo_headers(echo, "host")) == 1


def test_hop_by_hop_request_headers_are_stripped(gateway: Gateway) -> None:
    """Hop-by-hop request fields, and every field the client names in Connection, stay here."""
    echo = _echo(
        gateway,
        headers={
            "Connection": "keep-alive, X-Hop, x-other-hop",
            "X-Hop": "secret",
            "X-Other-Hop": "secret",
            "Keep-Alive": "timeout=100",
            "TE": "trailers",
            "Trailer": "X-Foo",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Proxy-Connection": "keep-alive",
            "X-End-To-End": "kept",
        },
    ).json()
    names = {k.lower() for k, _ in echo["headers"]}
    for hop in ("x-hop", "x-other-hop", "keep-alive", "te", "trailer", "proxy-authorization"):
        assert hop not in names
    assert "proxy-connection" not in names
    assert "x-hop" not in " ".join(echo_headers(echo, "connection")).lower()
    assert echo_headers(echo, "x-end-to-end") == ["kept"]


def test_hop_by_hop_response_headers_are_stripped(gateway: Gateway) -> None:
    """Hop-by-hop response fields (and one the upstream names in Connection) do not reach us."""
    response = httpx.get(gateway.url("/public/_up/hop"), timeout=10)
    assert response.status_code == 200
    assert response.text == "hop"
    assert "x-secret" not in response.headers
    assert "keep-alive" not in response.headers
    assert "proxy-authenticate" not in response.headers
    assert response.headers["x-kept"] == "yes"
    # The upstream's own X-Request-Id is replaced by the gateway's.
    assert HEX32.fullmatch(response.headers["x-request-id"])


def test_request_id_generated_sent_upstream_and_returned(gateway: Gateway) -> None:
    """Each request gets a fresh X-Request-Id, the same one upstream and in the response."""
    first = _echo(gateway, headers={"X-Request-Id": "client-chosen-id-0001"})
    second = _echo(gateway)
    for response in (first, second):
        request_id = response.headers["x-request-id"]
        assert HEX32.fullmatch(request_id)
        assert echo_headers(response.json(), "x-request-id") == [request_id]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_request_id_kept_from_trusted_proxy_when_well_formed(trusting_gateway: Gateway) -> None:
    """A trusted proxy's well-formed X-Request-Id is kept end to end."""
    response = _echo(trusting_gateway, headers={"X-Request-Id": "edge-4f2a9c01-77"})
    assert response.headers["x-request-id"] == "edge-4f2a9c01-77"
    assert echo_headers(response.json(), "x-request-id") == ["edge-4f2a9c01-77"]


@pytest.mark.parametrize("bad", ["short", "has space in it", "semi;colon;id;x", "x" * 200])
def test_malformed_request_id_from_trusted_proxy_is_replaced(
    trusting_gateway: Gateway, bad: str
) -> None:
    """A malformed X-Request-Id, even from a trusted proxy, is replaced by a fresh one."""
    response = _echo(trusting_gateway, headers={"X-Request-Id": bad})
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    assert echo_headers(response.json(), "x-request-id") == [request_id]


def test_host_is_rewritten_to_the_upstream(gateway: Gateway, upstream: Upstream) -> None:
    """Without preserve_host, the upstream sees its own authority as Host."""
    echo = _echo(gateway).json()
    assert echo_headers(echo, "host") == [f"127.0.0.1:{upstream.port}"]


def test_host_is_preserved_when_configured(gateway: Gateway) -> None:
    """With preserve_host, the upstream sees the Host the client used."""
    echo = _echo(gateway, "/keephost/echo").json()
    assert echo_headers(echo, "host") == [gateway.host]
