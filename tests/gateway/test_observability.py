"""Observability: JSON log lines, the metrics exporter and listener, the readiness registry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import urllib.request
from pathlib import Path

import pytest
from asgi_probe import free_port, http_get, running_server
from prometheus_client import CollectorRegistry, generate_latest

from gateway.observability import (
    CheckResult,
    Exporter,
    JsonFormatter,
    Metrics,
    Readiness,
    Stages,
    request_id_var,
    route_var,
)


def _format(record_logger: logging.Logger, stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def json_logger() -> tuple[logging.Logger, io.StringIO]:
    """A logger writing through JsonFormatter into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tabiji.test-json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_line_has_the_fields_and_context(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """One line per event: time, level, logger, message, request id, route, then the extras."""
    logger, stream = json_logger
    token_id, token_route = request_id_var.set("rid-1"), route_var.set("wiki")
    try:
        logger.info("forwarded", extra={"status": 200})
    finally:
        request_id_var.reset(token_id)
        route_var.reset(token_route)
    (line,) = _format(logger, stream)
    assert list(line)[:6] == ["time", "level", "logger", "message", "request_id", "route"]
    assert line["request_id"] == "rid-1"
    assert line["route"] == "wiki"
    assert line["status"] == 200
    assert line["level"] == "INFO"


def test_control_characters_cannot_forge_lines(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """CR/LF in a message stays inside one JSON string: one event, one line."""
    logger, stream = json_logger
    logger.warning('evil\r\n{"level": "INFO"}\x00')
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == 'evil\r\n{"level": "INFO"}\x00'


def test_secret_looking_extras_are_redacted(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """Extras named like credentials are replaced, as a safety net."""
    logger, stream = json_logger
    logger.info("oops", extra={"authorization": "Bearer abc", "cookie": "sid=1"})
    (line,) = _format(logger, stream)
    assert line["authorization"] == "[redacted]"
    assert line["cookie"] == "[redacted]"


def test_exporter_writes_counters_histogram_and_stages() -> None:
    """Hot-path ints become Prometheus series with the documented names and labels."""
    registry = CollectorRegistry()
    metrics, stages = Metrics(), Stages()
    exporter = Exporter(metrics, stages, registry=registry)
    metrics.request_started()
    metrics.request_finished("wiki", 200, "allow", 0.004)
    metrics.request_started()
    metrics.request_finished("wiki", 403, "deny", None)
    metrics.request_started()
    metrics.refused("head-timeout")
    stages.add("route", 2_000)
    stages.add("route", 3_000)
    exporter.flush()
    exporter.flush()  # a second flush adds nothing: deltas only
    text = generate_latest(registry).decode()
    assert 'tabiji_requests_total{decision="allow",route="wiki",status="200"} 1.0' in text
    assert 'tabiji_requests_total{decision="deny",route="wiki",status="403"} 1.0' in text
    assert 'tabiji_upstream_seconds_bucket{le="0.0025",route="wiki"} 0.0' in text
    assert 'tabiji_upstream_seconds_bucket{le="0.005",route="wiki"} 1.0' in text
    assert 'tabiji_upstream_seconds_sum{route="wiki"} 0.004' in text
    assert "tabiji_in_flight_requests 1.0" in text
    assert 'tabiji_refused_total{reason="head-timeout"} 1.0' in text
    assert 'tabiji_stage_seconds_total{stage="route"} 5e-06' in text
    assert 'tabiji_stage_calls_total{stage="route"} 2.0' in text


def test_bucket_bounds_are_inclusive() -> None:
    """A value equal to a bucket bound counts in that bucket (Prometheus `le`)."""
    metrics = Metrics()
    metrics.request_started()
    metrics.request_finished("r", 200, "allow", 0.005)
    counts = metrics.upstream["r"].counts
    assert counts[2] == 1
    assert sum(counts) == 1


def test_readiness_reports_each_check() -> None:
    """check_all runs sync and async checks; a failure, exception or timeout makes it not ready."""
    readiness = Readiness()

    async def slow() -> CheckResult:
        await asyncio.sleep(5)
        return True, "never"

    async def store() -> CheckResult:
        return True, "sqlite ok"

    def broken() -> CheckResult:
        raise ConnectionError("postgresql://user:pw@db/x refused")

    readiness.add("config", lambda: (True, "loaded"))
    readiness.add("store", store)
    readiness.add("broken", broken)
    readiness.add("slow", slow, timeout=0.1)
    report = asyncio.run(readiness.check_all())
    checks = report["checks"]
    assert report["ready"] is False
    assert checks["config"]["ok"] is True
    assert checks["store"]["detail"] == "sqlite ok"
    assert checks["broken"] == {
        "ok": False,
        "detail": "ConnectionError",
        "ms": checks["broken"]["ms"],
    }
    assert "pw" not in json.dumps(report)
    assert checks["slow"]["ok"] is False


def test_readiness_all_ok_is_ready() -> None:
    """With every check ok (or none registered) the gateway is ready; names are unique."""
    readiness = Readiness()
    assert asyncio.run(readiness.check_all()) == {"ready": True, "checks": {}}
    readiness.add("config", lambda: (True, ""))
    with pytest.raises(ValueError, match="already"):
        readiness.add("config", lambda: (True, ""))
    assert asyncio.run(readiness.check_all())["ready"] is True


@pytest.mark.integration
def test_metrics_listener_and_json_logs(tmp_path: Path) -> None:
    """A separate listener serves Prometheus text with the request counter; logs are JSON."""
    metrics_port = free_port()
    with running_server(tmp_path, metrics_port=metrics_port, metrics_flush_seconds=0.1) as server:
        assert http_get(server.port, "/count")[0] == 200
        assert http_get(server.port, "/log")[0] == 200
        time.sleep(0.4)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        assert 'tabiji_requests_total{decision="allow",route="probe",status="200"} 1.0' in text
        assert "tabiji_in_flight_requests 0.0" in text
        # the app port does not serve metrics
        assert http_get(server.port, "/metrics")[1].get("raw_target") == "/metrics"
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log_lines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    probe = next(line for line in lines if line["logger"] == "tabiji.probe")
    assert probe["request_id"] == "req-probe-1"
    assert probe["message"] == "probe says\r\nhello"
    assert probe["authorization"] == "[redacted]"
    assert any(line["message"].startswith("Uvicorn running") for line in lines)
