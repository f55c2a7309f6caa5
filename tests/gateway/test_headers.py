"""Header hygiene: hop-by-hop removal, the X-Tabiji- namespace, X-Forwarded-*, X-Request-Id."""

from __future__ import annotations

import re

from factories import make_peer, make_route, make_upstream

from gateway.headers import (
    downstream_response_headers,
    new_request_id,
    upstream_request_headers,
)

ROUTE = make_route(make_upstream("10.1.1.1", 8080))


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in headers]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def test_spoofed_xff_from_untrusted_peer_is_replaced() -> None:
    """An untrusted client's X-Forwarded-*/Forwarded/X-Real-IP never reach the upstream."""
    client = [
        (b"host", b"app.example.test"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"evil.test"),
        (b"x-forwarded-port", b"1"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-real-ip", b"1.2.3.4"),
    ]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="rid-12345678")
    assert values(out, "x-forwarded-for") == ["203.0.113.7"]
    assert values(out, "x-forwarded-proto") == ["https"]
    assert values(out, "x-forwarded-host") == ["app.example.test"]
    assert values(out, "forwarded") == ["for=203.0.113.7;proto=https;host=app.example.test"]
    assert values(out, "x-forwarded-port") == []
    assert values(out, "x-real-ip") == []


def test_connection_cannot_remove_gateway_headers() -> None:
    """`Connection: X-Forwarded-For, X-Request-Id, Forwarded` cannot drop the gateway's own ones."""
    client = [
        (b"connection", b"X-Forwarded-For, x-request-id, Forwarded, host"),
        (b"x-request-id", b"client-chosen-id"),
    ]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="rid-12345678")
    assert values(out, "x-forwarded-for") == ["203.0.113.7"]
    assert values(out, "x-request-id") == ["rid-12345678"]
    assert len(values(out, "forwarded")) == 1
    assert values(out, "host") == ["10.1.1.1:8080"]


def test_connection_cannot_remove_gateway_extra_headers() -> None:
    """Headers passed as gateway_headers survive Connection tokens and replace client copies."""
    client = [
        (b"connection", b"x-assertion"),
        (b"X-Assertion", b"forged"),
    ]
    out = upstream_request_headers(
        client,
        peer=make_peer(),
        route=ROUTE,
        request_id="rid-12345678",
        gateway_headers=[("X-Assertion", "signed")],
    )
    assert values(out, "x-assertion") == ["signed"]


def test_hop_by_hop_and_connection_named_headers_dropped() -> None:
    """RFC 9110 §7.6.1 hop-by-hop headers and those named in Connection are not forwarded."""
    client = [
        (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"trailer", b"x"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic eA=="),
        (b"x-secret", b"1"),
        (b"expect", b"100-continue"),
        (b"accept", b"text/html"),
    ]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="rid-12345678")
    kept = set(names(out))
    for dropped in (
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "x-secret",
        "expect",
    ):
        assert dropped not in kept
    assert values(out, "accept") == ["text/html"]


def test_tabiji_namespace_dropped_case_insensitively() -> None:
    """Every client header starting X-Tabiji- is dropped, whatever its case."""
    client = [(b"X-Tabiji-User", b"admin"), (b"x-TABIJI-groups", b"root"), (b"x-tabiji", b"kept")]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="rid-12345678")
    assert not [n for n in names(out) if n.startswith("x-tabiji-")]
    assert values(out, "x-tabiji") == ["kept"]


def test_trusted_chain_is_extended() -> None:
    """Behind a trusted proxy the XFF chain and Forwarded list every hop, client first."""
    peer = make_peer(
        "2001:db8::9",
        via_trusted_proxy=True,
        forwarded_for=("2001:db8::9", "10.0.0.5", "10.0.0.1"),
        authority="app.example.test:8443",
    )
    client = [(b"x-forwarded-for", b"2001:db8::9, 10.0.0.5"), (b"x-forwarded-port", b"8443")]
    out = upstream_request_headers(client, peer=peer, route=ROUTE, request_id="rid-12345678")
    assert values(out, "x-forwarded-for") == ["2001:db8::9, 10.0.0.5, 10.0.0.1"]
    assert values(out, "forwarded") == [
        'for="[2001:db8::9]";proto=https;host="app.example.test:8443", for=10.0.0.5, for=10.0.0.1'
    ]
    assert values(out, "x-forwarded-port") == ["8443"]


def test_host_is_upstream_unless_preserved() -> None:
    """Host is the upstream's unless the route preserves the client's authority."""
    client = [(b"host", b"app.example.test")]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="r" * 8)
    assert values(out, "host") == ["10.1.1.1:8080"]
    preserving = make_route(make_upstream("10.1.1.1", 8080), preserve_host=True)
    out = upstream_request_headers(client, peer=make_peer(), route=preserving, request_id="r" * 8)
    assert values(out, "host") == ["app.example.test"]


def test_cookie_and_end_to_end_headers_pass_unchanged() -> None:
    """Cookie, Authorization and UTF-8 values pass through byte for byte."""
    client = [
        (b"cookie", b"a=1; b=2"),
        (b"authorization", b"Bearer x"),
        (b"x-name", "旅路".encode()),
    ]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="r" * 8)
    assert values(out, "cookie") == ["a=1; b=2"]
    assert values(out, "authorization") == ["Bearer x"]
    assert values(out, "x-name")[0].encode() == "旅路".encode()


def test_request_id_from_trusted_proxy_kept_if_well_formed() -> None:
    """A trusted proxy's well-formed X-Request-Id is kept; anything else gets a fresh id."""
    good = [(b"x-request-id", b"abc-123:XYZ.9")]
    assert new_request_id(good, trusted=True) == "abc-123:XYZ.9"
    assert new_request_id(good, trusted=False) != "abc-123:XYZ.9"
    for bad in (b"short", b"has space here", b"x" * 129, b"<script>alert(1)</script>"):
        assert new_request_id([(b"x-request-id", bad)], trusted=True) != bad.decode()
    assert new_request_id(good + good, trusted=True) != "abc-123:XYZ.9"
    fresh = new_request_id([], trusted=False)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    assert fresh != new_request_id([], trusted=False)


def test_response_headers_drop_hop_by_hop_and_add_request_id() -> None:
    """Upstream hop-by-hop headers (and those its Connection names) are dropped; ours added."""
    upstream = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"X-Request-Id", b"upstream-own"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    out = downstream_response_headers(upstream, "rid-12345678")
    assert out == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-request-id", b"rid-12345678"),
    ]


def test_gateway_cookies_never_reach_the_upstream() -> None:
    """The gateway's session and login cookies are removed; the app's own cookies pass."""
    client = [
        (b"cookie", b"__Host-tabiji-session=SECRET1; app=1; tabiji-login=SECRET2"),
        (b"cookie", b"__HOST-TABIJI-SESSION=SECRET3"),
        (b"cookie", b"theme=dark"),
    ]
    out = upstream_request_headers(client, peer=make_peer(), route=ROUTE, request_id="rid-12345678")
    cookies = [value for name, value in out if name == "cookie"]
    assert cookies == ["app=1", "theme=dark"]
    assert not any("SECRET" in value for _, value in out)
