"""normalise_target: one canonical path for routing, policy and forwarding; ambiguity refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequestTarget
from gateway.target import Target, normalise_target

NORMALISED = [
    (b"/", "/", ""),
    (b"/app/items?id=3", "/app/items", "id=3"),
    (b"/public/../admin", "/admin", ""),
    (b"/public/%2e%2e/admin", "/admin", ""),
    (b"/public/%2E%2E/admin", "/admin", ""),
    (b"/public/.%2e/admin", "/admin", ""),
    (b"/a/./b/.", "/a/b/", ""),
    (b"/a/b/..", "/a/", ""),
    (b"/../../etc", "/etc", ""),
    (b"//admin", "/admin", ""),
    (b"/a//b///c", "/a/b/c", ""),
    (b"/a//../b", "/b", ""),
    (b"/Admin", "/Admin", ""),
    (b"/%7E", "/~", ""),
    (b"/%7euser", "/~user", ""),
    (b"/%41", "/A", ""),
    (b"/%3a", "/%3A", ""),
    (b"/%e6%97%85", "/%E6%97%85", ""),
    (b"/a%20b", "/a%20b", ""),
    (b"/a|b", "/a%7Cb", ""),
    (b"/.well-known/x", "/.well-known/x", ""),
    (b"/a?x=%2F&y=../..&z=%zz", "/a", "x=%2F&y=../..&z=%zz"),
    (b"/a?", "/a", ""),
    (b"/%25", "/%25", ""),
]


@pytest.mark.parametrize(("raw", "path", "query"), NORMALISED)
def test_normalises(raw: bytes, path: str, query: str) -> None:
    """Unreserved escapes are decoded, others upper-cased, dots resolved, slashes collapsed."""
    assert normalise_target(raw) == Target(path, query)


REFUSED = [
    (b"/a%2Fb", "target-encoded-slash"),
    (b"/a%2fb", "target-encoded-slash"),
    (b"/a%5Cb", "target-encoded-backslash"),
    (b"/a%5cb", "target-encoded-backslash"),
    (b"/a%00b", "target-nul"),
    (b"/a%0d%0aSet-Cookie:x", "target-control-character"),
    (b"/a%zz", "target-invalid-percent"),
    (b"/a%4", "target-invalid-percent"),
    (b"/a%", "target-invalid-percent"),
    (b"/public/..;/admin", "target-path-parameter-dots"),
    (b"/public/.;/admin", "target-path-parameter-dots"),
    (b"/public/%2e%2e;x=1/admin", "target-path-parameter-dots"),
    (b"/admin;jsessionid=1", "target-path-parameter"),
    (b"/a\\b", "target-backslash"),
    (b"/public\\..\\admin", "target-backslash"),
    (b"/a\x01", "target-control-character"),
    (b"/a\x7f", "target-control-character"),
    (b"/a b", "target-control-character"),
    (b"/a\tb", "target-control-character"),
    (b"/\xe6\x97\x85", "target-non-ascii"),
    (b"/a?q=\xff", "target-non-ascii"),
    (b"/a#frag", "target-fragment"),
    (b"*", "target-not-origin-form"),
    (b"app.example.test:443", "target-not-origin-form"),
    (b"ftp://app.example.test/x", "target-not-origin-form"),
    (b"", "target-not-origin-form"),
    (b"http://user@app.example.test/", "target-userinfo"),
    (b"http:///x", "target-authority"),
    (b"http://bad_host!/x", "target-authority"),
]


@pytest.mark.parametrize(("raw", "code"), REFUSED)
def test_refuses_ambiguous_targets(raw: bytes, code: str) -> None:
    """Ambiguous or malformed targets raise BadRequestTarget with a specific code."""
    with pytest.raises(BadRequestTarget) as caught:
        normalise_target(raw)
    assert caught.value.code == code
    assert caught.value.status == 400


def test_absolute_form_returns_authority() -> None:
    """An absolute-form target yields its lower-cased authority (default port dropped) and path."""
    target = normalise_target(b"http://App.Example.TEST:80/a/%2e%2e/b?q=1")
    assert target == Target("/b", "q=1", "app.example.test")


def test_absolute_form_keeps_non_default_port() -> None:
    """A non-default port stays in the authority so the pipeline can compare it with Host."""
    assert normalise_target(b"https://app.example.test:8443").authority == "app.example.test:8443"
    assert normalise_target(b"https://app.example.test:8443").path == "/"


def test_origin_form_has_no_authority() -> None:
    """An origin-form target carries no authority (Host decides)."""
    assert normalise_target(b"/x").authority is None


def test_paths_stay_case_sensitive() -> None:
    """/Admin and /admin normalise to different paths."""
    assert normalise_target(b"/Admin").path != normalise_target(b"/admin").path


# Pieces that exercise the slow path: dots, slashes, escapes (valid and invalid), ';', '\'.
PIECES = st.sampled_from(
    [
        "/",
        ".",
        "..",
        "%2e",
        "%2E",
        "%2f",
        "%5c",
        "%41",
        "%7e",
        "%3a",
        "%",
        "%0",
        "%00",
        "a",
        "B",
        ";",
        "\\",
        "?",
        "~",
        "|",
        "%zz",
        "-",
        "//",
        "%25",
    ]
)


def _check(raw: bytes) -> None:
    try:
        target = normalise_target(raw)
    except BadRequestTarget:
        return
    path = target.path
    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path
    assert "/../" not in path
    assert not path.endswith(("/.", "/.."))
    again = target.path + ("?" + target.query if target.query else "")
    assert normalise_target(again.encode("ascii")) == Target(target.path, target.query)


@given(st.binary(max_size=64))
@settings(max_examples=400)
def test_arbitrary_bytes_only_raise_bad_request_target(raw: bytes) -> None:
    """On arbitrary bytes, normalisation is idempotent and raises nothing but BadRequestTarget."""
    _check(raw)
    _check(b"/" + raw)


@given(st.lists(PIECES, max_size=20))
@settings(max_examples=600)
def test_normalisation_is_idempotent(pieces: list[str]) -> None:
    """The result never holds '//', '/./' or '/../', and normalising it again changes nothing."""
    _check(("/" + "".join(pieces)).encode("ascii"))
