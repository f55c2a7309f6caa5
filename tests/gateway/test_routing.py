"""Route matching: by canonical authority, then the longest path prefix on segment boundaries."""

from __future__ import annotations

import pytest
from factories import make_route

from gateway.routing import RouteTable, canonical_authority


def table() -> RouteTable:
    return RouteTable(
        [
            make_route(name="root", host="app.example.test", path_prefix="/"),
            make_route(name="admin", host="app.example.test", path_prefix="/admin"),
            make_route(name="admin-api", host="app.example.test", path_prefix="/admin/api"),
            make_route(name="other", host="other.example.test:8443", path_prefix="/"),
        ]
    )


@pytest.mark.parametrize(
    ("authority", "path", "expected"),
    [
        ("app.example.test", "/", "root"),
        ("app.example.test", "/admin", "admin"),
        ("app.example.test", "/admin/users", "admin"),
        ("app.example.test", "/admin/api/v1", "admin-api"),
        ("app.example.test", "/administrator", "root"),  # segment boundary, not string prefix
        ("app.example.test", "/Admin", "root"),  # case-sensitive
        ("other.example.test:8443", "/x", "other"),
        ("other.example.test", "/x", None),  # the port is part of the authority
        ("unknown.example.test", "/", None),
    ],
)
def test_match(authority: str, path: str, expected: str | None) -> None:
    """The longest segment-wise prefix on the exact authority wins; anything else is no route."""
    route = table().match(authority, path)
    assert (route.name if route else None) == expected


@pytest.mark.parametrize(
    ("authority", "scheme", "expected"),
    [
        ("App.Example.TEST", "https", "app.example.test"),
        ("app.example.test:443", "https", "app.example.test"),
        ("app.example.test:80", "http", "app.example.test"),
        ("app.example.test:80", "https", "app.example.test:80"),
        ("[2001:DB8::1]:443", "https", "[2001:db8::1]"),
        ("[2001:db8::1]", "https", "[2001:db8::1]"),
    ],
)
def test_canonical_authority(authority: str, scheme: str, expected: str) -> None:
    """Host comparison ignores case and the scheme's default port, and keeps IPv6 brackets."""
    assert canonical_authority(authority, scheme) == expected
