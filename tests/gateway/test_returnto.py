"""The return-to address after login: same-host paths pass, every open-redirect trick falls back."""

from __future__ import annotations

from urllib.parse import urljoin

import pytest

from gateway.identity.returnto import MAX_LENGTH, safe_return_path

ACCEPTED = [
    "/",
    "/app",
    "/app/page?x=1&y=2",
    "/app/page?next=%2Fother",  # an encoded slash inside the query decodes to a plain path
    "/a/b#section",
    "/%E6%97%85%E8%B7%AF",  # percent-encoded UTF-8 (旅路)
    "/app;v=1",
    "/~user/@home",
    "/.tabiji/",
    "/files/My%20Doc.pdf",  # an encoded space inside a path: a file name
    "/a%2520b",
]
REFUSED = [
    None,
    "",
    "//evil.example",
    "//evil.example/path",
    "///evil.example",
    "/\\evil.example",
    "\\/evil.example",
    "\\\\evil.example",
    "https:evil.example",
    "https://evil.example",
    "http://evil",
    "HTTP://evil",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,x",
    "evil.example",
    "evil.example/path",
    "/%2F%2Fevil.example",
    "/%2f%2fevil.example",
    "%2F%2Fevil",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%5cevil.example",
    "/%252F%252Fevil.example",  # double-encoded "//"
    "/%25252F%25252Fevil.example",  # triple-encoded
    "/%2525252F%2525252Fevil",  # four rounds: still changing after three, refused
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r/evil.example",
    "/%09/evil.example",
    "/%0A/evil.example",
    "/%0d%0aSet-Cookie:x=1",  # header injection
    " /app",
    "/app ",
    "/ /evil",
    "/\x00evil",
    "/%00evil",
    "/\u200b/evil",  # zero-width space
    "/%E2%80%8B/evil",  # the same, encoded
    "/\u202e/evil",  # bidi override
    "/\u3000/evil",  # ideographic space
    "/%E3%80%80/evil",  # the same, encoded
    "/%C2%A0/evil",  # no-break space, encoded
    "/旅路",  # raw non-ASCII: not sent as-is by a browser
    "/../../etc",
    "/a/../../b",
    "/a/./b",
    "/%2e%2e/admin",
    "/%2E/x",
    "/a\\b",
    "/a?x=\\",
    "/a?x=%5C",
    '/a"onmouseover',
    "/a<script>",
    "/%FF%FE",  # not UTF-8
    "/" + "a" * MAX_LENGTH,
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_same_host_paths_are_kept(raw: str) -> None:
    """A plain path on the same host is returned unchanged."""
    assert safe_return_path(raw) == raw


@pytest.mark.parametrize("raw", REFUSED)
def test_tricks_fall_back_to_the_default(raw: str | None) -> None:
    """Other hosts, schemes, encodings, control characters and overlong values give "/"."""
    assert safe_return_path(raw) == "/"


@pytest.mark.parametrize("raw", REFUSED)
def test_the_default_can_be_chosen(raw: str | None) -> None:
    """A refused value gives the caller's default (the signed-in page on the public URL)."""
    assert safe_return_path(raw, default="/.tabiji/") == "/.tabiji/"


@pytest.mark.parametrize("raw", ACCEPTED)
def test_an_accepted_path_stays_on_the_host_when_a_browser_resolves_it(raw: str) -> None:
    """Every accepted value, resolved against the host's URL as a browser does, keeps the host."""
    resolved = urljoin("https://app.example.test/some/page", safe_return_path(raw))
    assert resolved.startswith("https://app.example.test/")


def test_the_longest_accepted_value() -> None:
    """A path of exactly 2048 characters is still accepted; one more is refused."""
    at_limit = "/" + "a" * (MAX_LENGTH - 1)
    assert safe_return_path(at_limit) == at_limit
    assert safe_return_path(at_limit + "a") == "/"
