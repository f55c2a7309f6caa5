"""Operability end to end: Prometheus metrics on their own listener, JSON logs with request ids."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Gateway, Upstream, free_port, gateway_config, run_gateway, standard_routes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def observed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with a metrics listener on its own port."""
    metrics_port = free_port()

    def build(port: int) -> dict[str, Any]:
        return gateway_config(
            port,
            standard_routes(port, upstream.port),
            metrics={"listen": {"host": "127.0.0.1", "port": metrics_port}},
        )

    with run_gateway(tmp_path_factory.mktemp("observed"), build) as running:
        running.extra["metrics_port"] = metrics_port
        yield running


def _scrape(gateway: Gateway) -> str:
    response = httpx.get(f"http://127.0.0.1:{gateway.extra['metrics_port']}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def test_metrics_count_requests_by_route_status_and_decision(observed: Gateway) -> None:
    """Requests show up in tabiji_requests on the metrics listener, by route/status/decision."""
    assert httpx.get(observed.url("/public/m"), timeout=10).status_code == 200
    assert httpx.get(observed.url("/admin/m"), timeout=10).status_code == 403
    deadline = time.monotonic() + 10
    while True:
        text = _scrape(observed)
        allowed = 'decision="allow",route="public",status="200"' in text
        denied = 'decision="deny",route="admin",status="403"' in text
        if allowed and denied:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert "tabiji_upstream_seconds" in text


def test_metrics_are_not_served_on_the_public_listener(
    observed: Gateway, upstream: Upstream
) -> None:
    """/metrics on the public listener is an ordinary path for the routes, not the gateway's."""
    response = httpx.get(observed.url("/metrics"), timeout=10)
    assert "tabiji_requests" not in response.text
    assert response.json()["raw_path"] == "/metrics"  # the catch-all upstream answered


def test_access_log_is_json_with_the_request_id(observed: Gateway) -> None:
    """Each request is logged once as a JSON line carrying the id the client got back."""
    response = httpx.get(observed.url("/public/logged"), timeout=10)
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while True:
        records = []
        for line in observed.stderr().splitlines():
            if request_id in line:
                records.append(json.loads(line))
        if records:
            break
        assert time.monotonic() < deadline, "no log line carries the request id"
        time.sleep(0.1)
    assert len(records) == 1
    assert records[0]["request_id"] == request_id
    assert records[0]["status"] == 200
