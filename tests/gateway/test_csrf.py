"""CSRF tokens and same-origin checks for the gateway's own forms."""

from __future__ import annotations

import pytest

from gateway.identity.csrf import Csrf, origin_of

SECRET = b"k" * 32
ORIGIN = "https://app.example.test"
SESSION = "a" * 64


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    """Request headers from keyword arguments (underscores become dashes)."""
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in values.items()]


def test_a_short_secret_is_refused() -> None:
    """A secret under 32 bytes is a configuration error, not a weak token."""
    with pytest.raises(ValueError, match="32 bytes"):
        Csrf(b"short")


def test_the_token_of_the_session_and_purpose_verifies() -> None:
    """The token made for (session, purpose) is accepted for exactly that pair."""
    csrf = Csrf(SECRET)
    token = csrf.token(SESSION, "logout")
    assert csrf.token_ok(token, SESSION, "logout")
    assert not csrf.token_ok(token, "b" * 64, "logout")  # another session
    assert not csrf.token_ok(token, SESSION, "revoke")  # another form


@pytest.mark.parametrize("token", [None, "", "x", "A" * 43, "A" * 500])
def test_missing_or_wrong_tokens_fail(token: str | None) -> None:
    """No token, a guessed one or an absurdly long one is refused."""
    assert not Csrf(SECRET).token_ok(token, SESSION, "logout")


def test_another_secret_makes_other_tokens() -> None:
    """A token from a gateway with another secret does not verify (it is an HMAC)."""
    token = Csrf(b"x" * 32).token(SESSION, "logout")
    assert not Csrf(SECRET).token_ok(token, SESSION, "logout")


def test_fields_cannot_be_shifted_between_purpose_and_session() -> None:
    """("ab", "c") and ("a", "bc") give different tokens: the fields are separated."""
    csrf = Csrf(SECRET)
    assert csrf.token("c", "ab") != csrf.token("bc", "a")


@pytest.mark.parametrize(
    "request_headers",
    [
        headers(origin=ORIGIN),
        headers(origin=ORIGIN + ":443"),  # the default port is the same origin
        headers(origin=ORIGIN, sec_fetch_site="same-origin"),
        headers(referer=ORIGIN + "/.tabiji/logout"),
        headers(referer=ORIGIN + "/.tabiji/logout", sec_fetch_site="same-origin"),
    ],
)
def test_same_origin_requests_pass(request_headers: list[tuple[bytes, bytes]]) -> None:
    """A form posted from a page of the same origin passes the header checks."""
    assert Csrf.same_origin(request_headers, ORIGIN)


@pytest.mark.parametrize(
    "request_headers",
    [
        [],  # neither Origin nor Referer
        headers(origin="https://evil.example"),
        headers(origin="http://app.example.test"),  # another scheme
        headers(origin="https://app.example.test:8443"),  # another port
        headers(origin="https://sub.app.example.test"),
        headers(origin="null"),
        headers(origin=ORIGIN, sec_fetch_site="cross-site"),
        headers(origin=ORIGIN, sec_fetch_site="same-site"),
        headers(referer="https://evil.example/?" + ORIGIN),
        headers(referer="https://app.example.test.evil.example/"),
        headers(referer="https://user@app.example.test/"),
        headers(origin="https://evil.example", referer=ORIGIN + "/"),  # Origin wins
        [(b"origin", ORIGIN.encode()), (b"origin", b"https://evil.example")],
    ],
)
def test_cross_origin_requests_fail(request_headers: list[tuple[bytes, bytes]]) -> None:
    """Another origin, an opaque one, cross-site fetch metadata or no evidence at all fail."""
    assert not Csrf.same_origin(request_headers, ORIGIN)


def test_check_needs_both_the_token_and_the_origin() -> None:
    """`check` passes only with the right token and same-origin headers together."""
    csrf = Csrf(SECRET)
    token = csrf.token(SESSION, "logout")
    good = headers(origin=ORIGIN)
    evil = headers(origin="https://evil.example")
    common = {"session_hash": SESSION, "purpose": "logout", "request_origin": ORIGIN}
    assert csrf.check(token=token, headers=good, **common)
    assert not csrf.check(token=token, headers=evil, **common)
    assert not csrf.check(token=None, headers=good, **common)
    assert not csrf.check(token="wrong", headers=good, **common)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://A.Example.TEST/x", "https://a.example.test"),
        ("https://a.example.test:443/", "https://a.example.test"),
        ("http://127.0.0.1:8080/p", "http://127.0.0.1:8080"),
        ("null", None),
        ("javascript:alert(1)", None),
        ("https://", None),
        ("https://[::1", None),
    ],
)
def test_origin_of(url: str, origin: str | None) -> None:
    """The origin of a URL is its lower-case scheme://host[:non-default port], else None."""
    assert origin_of(url) == origin
