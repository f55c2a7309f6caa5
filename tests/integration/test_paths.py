"""Request-target normalisation over raw sockets: the path the gateway routes on is the path the
upstream receives, and ambiguous targets are refused before anything is forwarded."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from .conftest import Gateway, Upstream, raw_get

pytestmark = pytest.mark.integration


def _marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


@pytest.mark.parametrize(
    "template",
    [
        "/public/../admin/{m}",
        "/public/%2e%2e/admin/{m}",
        "/public/%2E%2E/admin/{m}",
        "/public/.%2e/admin/{m}",
        "/public/./../admin/{m}",
        "//admin/{m}",
        "/public/x/../../admin/{m}",
        "/%61dmin/{m}",
        "/admin/./{m}",
    ],
)
def test_tricks_into_admin_end_at_admin_refusal(
    gateway: Gateway, upstream: Upstream, template: str
) -> None:
    """Dot-segments, encoded dots and repeated slashes route to /admin's 403, never upstream."""
    marker = _marker()
    response = raw_get(gateway.port, template.format(m=marker))
    assert response.status == 403
    assert b"route-not-public" in response.body
    assert upstream.received(marker) == []


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/public//x//{m}", "/public/x/{m}"),
        ("/public/a/./b/../{m}", "/public/a/{m}"),
        ("/public/%7Euser/%41{m}", "/public/~user/A{m}"),
        ("/public/caf%c3%a9/{m}", "/public/caf%C3%A9/{m}"),
        ("/public/{m}?q=%2F..%2F&x=1", "/public/{m}?q=%2F..%2F&x=1"),
        ("/elsewhere/../public/{m}", "/public/{m}"),
    ],
)
def test_upstream_receives_the_normalised_path(
    gateway: Gateway, upstream: Upstream, raw: str, forwarded: str
) -> None:
    """The upstream receives exactly the normalised path the gateway routed on (query untouched)."""
    marker = _marker()
    response = raw_get(gateway.port, raw.format(m=marker))
    assert response.status == 200, response.body
    assert response.json()["raw_path"] == forwarded.format(m=marker)
    assert upstream.received(marker) == [forwarded.format(m=marker)]


@pytest.mark.parametrize(
    ("template", "code"),
    [
        ("/public%2Fadmin/{m}", "target-encoded-slash"),
        ("/public/..%2Fadmin/{m}", "target-encoded-slash"),
        ("/public/..%2fadmin/{m}", "target-encoded-slash"),
        ("/public/..;/admin/{m}", "target-path-parameter-dots"),
        ("/public;x/{m}", "target-path-parameter"),
        ("/public\\..\\admin/{m}", "target-backslash"),
        ("/public/%5C../admin/{m}", "target-encoded-backslash"),
        ("/public/%00/{m}", "target-nul"),
        ("/public/%0d%0aX-Injected:%201/{m}", "target-control-character"),
        ("/public/%zz/{m}", "target-invalid-percent"),
        ("/public/%4/{m}", "target-invalid-percent"),
        ("/public/{m}%", "target-invalid-percent"),
        ("/public/{m}#frag", "target-fragment"),
    ],
)
def test_ambiguous_targets_are_refused_with_400(
    gateway: Gateway, upstream: Upstream, template: str, code: str
) -> None:
    """Encoded slash/backslash, ..;/, raw backslash, NUL, controls, bad escapes: 400, never sent."""
    marker = _marker()
    response = raw_get(gateway.port, template.format(m=marker), headers=(("Accept", "*/*"),))
    assert response.status == 400, response.body
    assert code.encode() in response.body
    assert upstream.received(marker) == []


def test_paths_are_case_sensitive(gateway: Gateway, upstream: Upstream) -> None:
    """/Admin is not /admin: it misses the admin route and reaches the catch-all as /Admin."""
    marker = _marker()
    assert raw_get(gateway.port, f"/admin/{marker}").status == 403
    response = raw_get(gateway.port, f"/Admin/{marker}")
    assert response.status == 200
    assert response.json()["raw_path"] == f"/Admin/{marker}"
    assert upstream.received(marker) == [f"/Admin/{marker}"]


def test_absolute_form_with_other_authority_is_refused(
    gateway: Gateway, upstream: Upstream
) -> None:
    """An absolute-form target whose authority differs from Host is a 400, never forwarded."""
    marker = _marker()
    response = raw_get(gateway.port, f"http://other.example/public/{marker}")
    assert response.status == 400
    assert b"target-authority-mismatch" in response.body
    assert upstream.received(marker) == []


def test_absolute_form_matching_host_is_forwarded_in_origin_form(
    gateway: Gateway, upstream: Upstream
) -> None:
    """An absolute-form target that agrees with Host is served, sent upstream in origin-form."""
    marker = _marker()
    response = raw_get(gateway.port, f"http://{gateway.host}/public/../public/{marker}")
    assert response.status == 200
    assert upstream.received(marker) == [f"/public/{marker}"]


def test_unknown_host_is_404_and_not_forwarded(gateway: Gateway, upstream: Upstream) -> None:
    """A Host no route serves is answered 404 and nothing is forwarded."""
    marker = _marker()
    response = raw_get(gateway.port, f"/public/{marker}", host="unknown.example")
    assert response.status == 404
    assert b"route-not-found" in response.body
    assert upstream.received(marker) == []


@pytest.mark.parametrize(
    "target",
    ["/.tabiji/healthz", "/x/../.tabiji/healthz", "/%2etabiji/healthz", "//.tabiji//healthz"],
)
def test_reserved_prefix_served_by_the_gateway(gateway: Gateway, target: str) -> None:
    """/.tabiji/ (however it is spelled) is the gateway's own: healthz answers from the gateway."""
    response = raw_get(gateway.port, target)
    assert response.status == 200
    assert response.json() == {"status": "alive"}


@pytest.mark.parametrize("host", [None, "unknown.example"])
def test_reserved_prefix_is_never_forwarded(
    gateway: Gateway, upstream: Upstream, host: str | None
) -> None:
    """Unknown paths under /.tabiji/ are 404 from the gateway, on every host, never forwarded."""
    marker = _marker()
    for target in (f"/.tabiji/{marker}", f"/public/../.tabiji/{marker}"):
        response = raw_get(gateway.port, target, host=host)
        assert response.status == 404
        assert upstream.received(marker) == []


def test_readyz_reports_config(gateway: Gateway) -> None:
    """/.tabiji/readyz says ready, with the config check's details."""
    response = httpx.get(gateway.url("/.tabiji/readyz"), timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert "config" in body["checks"]


def test_refusal_page_is_html_with_request_id(gateway: Gateway) -> None:
    """A browser gets an HTML page (Japanese by default) that shows the request id."""
    response = httpx.get(gateway.url("/admin/x"), headers={"Accept": "text/html"}, timeout=10)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-language"] == "ja"
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert request_id in response.text
    assert "route-not-public" in response.text


def test_refusal_page_follows_accept_language(gateway: Gateway) -> None:
    """Accept-Language: en gives the English page first."""
    response = httpx.get(gateway.url("/admin/x"), headers={"Accept-Language": "en"}, timeout=10)
    assert response.status_code == 403
    assert response.headers["content-language"] == "en"
    assert '<html lang="en"' in response.text


def test_refusal_is_json_when_asked(gateway: Gateway) -> None:
    """Accept: application/json gives a JSON body with the code, reasons and request id."""
    response = httpx.get(
        gateway.url("/admin/x"), headers={"Accept": "application/json"}, timeout=10
    )
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == 403
    assert body["reasons"] == ["route-not-public"]
    assert body["request_id"] == response.headers["x-request-id"]
