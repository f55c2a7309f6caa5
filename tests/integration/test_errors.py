"""Upstream failures become branded 502/504 pages with the request id; redirects go back to the
client untouched and are never followed."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from .conftest import Gateway, Upstream

pytestmark = pytest.mark.integration

READ_TIMEOUT = 1.0  # the /slow route's read_timeout
SLACK = 2.0


def test_refused_upstream_is_502_page_with_request_id(gateway: Gateway) -> None:
    """An upstream that refuses connections gives a 502 HTML page carrying the request id."""
    response = httpx.get(gateway.url("/dead/x"), headers={"Accept": "text/html"}, timeout=10)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert request_id in response.text
    assert "upstream-unavailable" in response.text


def test_refused_upstream_is_502_json_when_asked(gateway: Gateway) -> None:
    """A JSON client gets the 502 as JSON with the same request id as the header."""
    response = httpx.get(gateway.url("/dead/x"), headers={"Accept": "application/json"}, timeout=10)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream-unavailable"
    assert body["request_id"] == response.headers["x-request-id"]


def test_hanging_upstream_is_504_within_read_timeout(gateway: Gateway, upstream: Upstream) -> None:
    """An upstream that never answers gives 504 soon after the route's read_timeout."""
    marker = uuid.uuid4().hex
    started = time.monotonic()
    response = httpx.get(
        gateway.url(f"/slow/_up/slow?s=30&{marker}"),
        headers={"Accept": "application/json"},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"] == "upstream-timeout"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + SLACK
    assert len(upstream.received(marker)) == 1


def test_slow_but_timely_upstream_is_served(gateway: Gateway) -> None:
    """An upstream that answers within read_timeout is served normally."""
    response = httpx.get(gateway.url("/slow/_up/slow?s=0.3"), timeout=10)
    assert response.status_code == 200
    assert response.json() == {"slept": 0.3}


@pytest.mark.parametrize(
    "location",
    [
        "http://elsewhere.example/landing?x=1",
        "/public/after-redirect?y=%2F",
        "http://127.0.0.1:1/internal",
    ],
)
def test_redirect_is_returned_not_followed(
    gateway: Gateway, upstream: Upstream, location: str
) -> None:
    """A 3xx from the upstream reaches the client with Location unchanged; the gateway never
    follows it."""
    marker = uuid.uuid4().hex
    response = httpx.get(
        gateway.url("/public/_up/redirect"),
        params={"to": location, "m": marker},
        timeout=10,
        follow_redirects=False,
    )
    assert response.status_code == 302
    assert response.headers["location"] == location
    assert [p for p in upstream.state()["log"] if p.startswith("/public/after-redirect")] == []
    assert len(upstream.received(marker)) == 1


def test_upstream_1kib_page_is_served_intact(gateway: Gateway) -> None:
    """A plain 1 KiB page passes through with its status, type and length."""
    response = httpx.get(gateway.url("/public/_up/page"), timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert len(response.content) == 1024
    assert response.headers["content-length"] == "1024"
