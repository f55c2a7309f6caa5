"""resolve_peer / TrustedProxies: proxy headers believed only from trusted proxies, never junk."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.errors import BadRequestTarget
from gateway.peer import TrustedProxies, resolve_peer

TRUSTED = TrustedProxies(
    [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48")]
)
NOBODY = TrustedProxies([])
HOST = (b"host", b"app.example.test")


def test_contains_matches_networks_and_caches() -> None:
    """Addresses inside a trusted network are trusted, others and garbage are not."""
    assert TRUSTED.contains("10.1.2.3")
    assert TRUSTED.contains("10.1.2.3")  # cached answer
    assert TRUSTED.contains("2001:db8:ffff::1")
    assert TRUSTED.contains("::ffff:10.0.0.1")  # IPv4-mapped IPv6
    assert not TRUSTED.contains("192.0.2.1")
    assert not TRUSTED.contains("not-an-ip")
    assert not TRUSTED.contains("")
    assert not NOBODY.contains("10.1.2.3")


def test_untrusted_peer_ignores_proxy_headers() -> None:
    """From an untrusted socket, X-Forwarded-* and Forwarded are ignored: the socket speaks."""
    headers = [
        HOST,
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"evil.example"),
        (b"forwarded", b"for=5.6.7.8;proto=https"),
    ]
    peer = resolve_peer("192.0.2.10", "http", headers, TRUSTED)
    assert peer.client_ip == "192.0.2.10"
    assert peer.scheme == "http"
    assert peer.authority == "app.example.test"
    assert not peer.via_trusted_proxy
    assert peer.forwarded_for == ("192.0.2.10",)


def test_trusted_peer_walks_xff_right_to_left() -> None:
    """From a trusted proxy, the client is the first untrusted address from the right."""
    headers = [HOST, (b"x-forwarded-for", b"6.6.6.6, 198.51.100.9, 10.0.0.5")]
    peer = resolve_peer("10.0.0.1", "http", headers, TRUSTED)
    assert peer.client_ip == "198.51.100.9"
    assert peer.via_trusted_proxy
    # Entries left of the client are unverifiable (a spoofed 6.6.6.6): not passed on.
    assert peer.forwarded_for == ("198.51.100.9", "10.0.0.5", "10.0.0.1")


def test_trusted_peer_joins_multiple_xff_lines() -> None:
    """Several X-Forwarded-For lines are one comma-separated list (RFC 9110 §5.3)."""
    headers = [HOST, (b"x-forwarded-for", b"198.51.100.9"), (b"X-Forwarded-For", b"10.0.0.5")]
    assert resolve_peer("10.0.0.1", "http", headers, TRUSTED).client_ip == "198.51.100.9"


def test_all_trusted_chain_takes_leftmost() -> None:
    """When every hop is trusted, the leftmost address is the client."""
    headers = [HOST, (b"x-forwarded-for", b"10.9.9.9, 10.0.0.5")]
    assert resolve_peer("10.0.0.1", "http", headers, TRUSTED).client_ip == "10.9.9.9"


@pytest.mark.parametrize(
    "xff", [b"198.51.100.9, garbage", b"", b"198.51.100.9,,", b"unknown", b"1.2.3.4.5"]
)
def test_malformed_xff_falls_back_to_socket(xff: bytes) -> None:
    """A malformed X-Forwarded-For from a trusted proxy is ignored: the socket is the client."""
    peer = resolve_peer("10.0.0.1", "http", [HOST, (b"x-forwarded-for", xff)], TRUSTED)
    assert peer.client_ip == "10.0.0.1"
    assert peer.forwarded_for == ("10.0.0.1",)


def test_xff_accepts_ports_and_bracketed_ipv6() -> None:
    """XFF entries with ports and bracketed IPv6 are understood and canonicalised."""
    headers = [HOST, (b"x-forwarded-for", b"[2001:DB8::7]:4711, 10.0.0.5:80")]
    peer = resolve_peer("10.0.0.1", "http", headers, TRUSTED)
    assert peer.client_ip == "2001:db8::7"


def test_trusted_proto_and_host() -> None:
    """X-Forwarded-Proto and X-Forwarded-Host from a trusted proxy set scheme and authority."""
    headers = [
        (b"host", b"internal:8080"),
        (b"x-forwarded-for", b"198.51.100.9"),
        (b"x-forwarded-proto", b"HTTPS"),
        (b"x-forwarded-host", b"App.Example.Test:443"),
    ]
    peer = resolve_peer("10.0.0.1", "http", headers, TRUSTED)
    assert peer.scheme == "https"
    assert peer.authority == "app.example.test"


@pytest.mark.parametrize(
    ("proto", "host"),
    [(b"gopher", b"bad host"), (b"https, http", b"a.test, b.test"), (b"", b"")],
)
def test_malformed_proto_and_host_are_ignored(proto: bytes, host: bytes) -> None:
    """Unknown or contradictory X-Forwarded-Proto/-Host fall back to the socket scheme and Host."""
    headers = [HOST, (b"x-forwarded-proto", proto), (b"x-forwarded-host", host)]
    peer = resolve_peer("10.0.0.1", "http", headers, TRUSTED)
    assert peer.scheme == "http"
    assert peer.authority == "app.example.test"


def test_rfc7239_forwarded_when_no_xff() -> None:
    """RFC 7239 Forwarded gives client, proto and host when X-Forwarded-For is absent."""
    headers = [
        HOST,
        (
            b"forwarded",
            b'for="[2001:db8::9]:1234";proto=https;host="App.Example.Test", for=10.0.0.5',
        ),
    ]
    peer = resolve_peer("10.0.0.1", "http", headers, TRUSTED)
    assert peer.client_ip == "2001:db8::9"
    assert peer.scheme == "https"
    assert peer.authority == "app.example.test"
    assert peer.forwarded_for == ("2001:db8::9", "10.0.0.5", "10.0.0.1")


@pytest.mark.parametrize(
    "forwarded",
    [b"for=unknown", b"for=_hidden", b"for=1.2.3.4;for=5.6.7.8", b"for=", b'for="1.2.3.4', b"junk"],
)
def test_malformed_forwarded_falls_back_to_socket(forwarded: bytes) -> None:
    """A malformed or obfuscated Forwarded header is not believed."""
    peer = resolve_peer("10.0.0.1", "http", [HOST, (b"forwarded", forwarded)], TRUSTED)
    assert peer.client_ip == "10.0.0.1"


def test_missing_host_is_refused() -> None:
    """A request without Host is a 400 (RFC 9112 §3.2)."""
    with pytest.raises(BadRequestTarget) as caught:
        resolve_peer("192.0.2.10", "http", [], NOBODY)
    assert caught.value.code == "host-missing"


def test_multiple_host_is_refused() -> None:
    """Two Host headers are a 400 (RFC 9112 §3.2)."""
    with pytest.raises(BadRequestTarget) as caught:
        resolve_peer("192.0.2.10", "http", [HOST, (b"Host", b"other.test")], NOBODY)
    assert caught.value.code == "host-multiple"


@pytest.mark.parametrize("host", [b"a b", b"x/y", b"user@host", b"\xff"])
def test_invalid_host_is_refused(host: bytes) -> None:
    """An invalid Host value is a 400, never routed."""
    with pytest.raises(BadRequestTarget) as caught:
        resolve_peer("192.0.2.10", "http", [(b"host", host)], NOBODY)
    assert caught.value.code == "host-invalid"


def test_authority_is_canonical() -> None:
    """Host is lower-cased and its default port dropped; ws/wss scopes map to http/https."""
    peer = resolve_peer("192.0.2.10", "wss", [(b"host", b"App.Example.Test:443")], NOBODY)
    assert peer.authority == "app.example.test"
    assert peer.scheme == "https"
