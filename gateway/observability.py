"""Observability: JSON logs, Prometheus metrics (cheap on the hot path) and the readiness registry.

The hot path only adds to plain Python ints; a flusher thread copies the deltas into
prometheus_client metrics once a second (this process's registry, or with `--workers N` the
multiprocess files: workers import prometheus_client after the supervisor set
PROMETHEUS_MULTIPROC_DIR).
Imports no other gateway module (it is a leaf every layer may use).
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import inspect
import logging
import logging.config
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

# ------------------------------------------------------------------------------------------------
# Logging

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tabiji_request_id", default=None
)
route_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tabiji_route", default=None)

# Extra keys whose values are replaced before a record is written: a safety net, not a licence to
# pass headers to a logger (DESIGN: never log header values, cookies or tokens).
_REDACTED_KEYS = frozenset(
    {
        "authorization",
        "cookie",
        "set-cookie",
        "set_cookie",
        "token",
        "password",
        "secret",
        "headers",
    }
)


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: time, level, logger, message, request_id, route, then the extras.

    json.dumps escapes control characters, so a client-supplied CR/LF cannot forge a log line.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        for key in log_data.keys() & _REDACTED_KEYS:
            log_data[key] = "[redacted]"
        request_id = request_id_var.get()
        if request_id is not None:
            log_data.setdefault("request_id", request_id)
        route = route_var.get()
        if route is not None:
            log_data.setdefault("route", route)
        # uvicorn's colour hint is noise in JSON.
        log_data.pop("color_message", None)
        # Fixed leading fields make the lines easy to scan: time, level, logger, message first.
        rest = dict(log_data)
        log_data.clear()
        for key in ("time", "level", "logger", "message", "request_id", "route"):
            if key in rest:
                log_data[key] = rest.pop(key)
        log_data.update(rest)


class AccessLog:
    """One JSON line per request, written without the logging machinery, a batch at a time.

    The logging path (LogRecord, formatter, handler lock) costs ≈ 55 µs a line, and a write per
    line is a system call; this encodes a line for ≈ 2 µs (orjson) and writes what gathered every
    `flush_interval` seconds (and at shutdown). Callers pass fixed, known fields only (never
    header values), and json escapes control characters, so no line can be forged.
    """

    def __init__(self, stream: TextIO | None = None, *, flush_interval: float = 0.1) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._flush_interval = flush_interval
        self._scheduled = False

    def write(self, fields: dict[str, Any]) -> None:
        line = {
            "time": datetime.now(UTC).isoformat(),
            "level": "INFO",
            "logger": "tabiji.access",
            "message": "request",
            **fields,
        }
        self._lines.append(orjson.dumps(line, default=str).decode() + "\n")
        if len(self._lines) >= 512:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (tools, tests): write at once
                self.flush()
                return
            self._scheduled = True
            loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Write every gathered line now."""
        self._scheduled = False
        lines, self._lines = self._lines, []
        if lines:
            # sys.stderr is looked up per call so tests and uvicorn's redirections are honoured.
            stream = self._stream or sys.stderr
            stream.write("".join(lines))
            stream.flush()


def logging_config(level: str = "info") -> dict[str, Any]:
    """A `dictConfig` dict routing every logger (uvicorn's too) through JsonFormatter.

    Given to uvicorn as `log_config`, so each spawned worker applies it again at start.
    """
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "gateway.observability.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": upper, "propagate": True},
            # The pipeline writes its own request log; uvicorn's access line would duplicate it.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": upper},
    }


def setup_logging(level: str = "info") -> None:
    """Configure JSON logging for this process (the CLI calls it before anything logs)."""
    logging.config.dictConfig(logging_config(level))


# ------------------------------------------------------------------------------------------------
# Metrics: the hot-path side

# Upper bounds (seconds) of the upstream latency histogram; "+Inf" is implied.
UPSTREAM_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _Histogram:
    """Non-cumulative bucket counts (index len(UPSTREAM_BUCKETS) is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(UPSTREAM_BUCKETS) + 1)
        self.total = 0.0


class Metrics:
    """Request counters for the pipeline and protocol; each call costs well under a microsecond.

    `route` must be a configured route name or a fixed placeholder ("-"), never a Host header value:
    label values are kept forever, so client-chosen ones would grow without bound.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests: dict[tuple[str, int, str], int] = {}
        self.upstream: dict[str, _Histogram] = {}
        self.refusals: dict[str, int] = {}
        # Audit records committed to the SQLite log but not yet indexed (deferred work; the
        # audit writer sets it after each flush or indexing step).
        self.audit_unindexed = 0

    def request_started(self) -> None:
        """A request entered the pipeline."""
        self.in_flight += 1

    def request_finished(
        self, route: str, status: int, decision: str, upstream_seconds: float | None
    ) -> None:
        """A request left the pipeline; `upstream_seconds`: time to the upstream's response head."""
        self.in_flight -= 1
        key = (route, status, decision)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if upstream_seconds is not None:
            hist = self.upstream.get(route)
            if hist is None:
                hist = self.upstream[route] = _Histogram()
            # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
            hist.counts[bisect.bisect_left(UPSTREAM_BUCKETS, upstream_seconds)] += 1
            hist.total += upstream_seconds

    def refused(self, reason: str) -> None:
        """The protocol refused a request before any app ran (head too large, head timeout, ...)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class Stages:
    """Per-stage time for the bench: `stages.add("route", ns)` adds to plain ints.

    Time synchronous sections with `time.perf_counter_ns()` (vDSO, ~50 ns); across an `await` it
    would count waiting, not CPU.
    """

    def __init__(self) -> None:
        self.cells: dict[str, list[int]] = {}  # stage -> [ns, calls]: one lookup per add

    def add(self, stage: str, ns: int) -> None:
        """Account `ns` nanoseconds and one call to `stage` (~0.2 µs)."""
        cell = self.cells.get(stage)
        if cell is None:
            cell = self.cells[stage] = [0, 0]
        cell[0] += ns
        cell[1] += 1

    def totals(self) -> dict[str, tuple[int, int]]:
        """stage -> (ns, calls) so far; safe to call from another thread."""
        return {stage: (cell[0], cell[1]) for stage, cell in self.cells.copy().items()}


# Rare events (a policy reload) go straight to prometheus_client: their cost does not matter.
policy_reloads = Counter(
    "tabiji_policy_reloads",
    "Policy directory reloads, by result: applied, unchanged or rejected (last good set kept).",
    ["result"],
)


def count_policy_reload(result: str) -> None:
    """Count one policy reload attempt by its result."""
    policy_reloads.labels(result).inc()


# The process-wide instances: uvicorn builds the protocol objects itself, so they cannot be handed
# these as arguments; the composition root passes the same objects on to the pipeline.
metrics = Metrics()
stages = Stages()


# ------------------------------------------------------------------------------------------------
# Metrics: the export side

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Exporter:
    """Copies what `Metrics` and `Stages` gathered into prometheus_client metrics, as deltas.

    Runs in a daemon thread of each serving process (`start`), plus a final `flush` at shutdown.
    Plain ints read from another thread are consistent under the GIL; dicts are copied first.
    """

    def __init__(
        self,
        source: Metrics,
        stage_source: Stages,
        *,
        registry: Any = None,
        interval: float = 1.0,
    ) -> None:
        reg = REGISTRY if registry is None else registry
        self._source = source
        self._stages = stage_source
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._requests = Counter(
            "tabiji_requests",
            "Requests answered, by route, status and policy decision.",
            ["route", "status", "decision"],
            registry=reg,
        )
        self._upstream = Histogram(
            "tabiji_upstream_seconds",
            "Time from sending the request upstream to its response head.",
            ["route"],
            buckets=UPSTREAM_BUCKETS,
            registry=reg,
        )
        self._in_flight = Gauge(
            "tabiji_in_flight_requests",
            "Requests inside the pipeline now (flushed once a second).",
            registry=reg,
            multiprocess_mode="livesum",  # dead workers' in-flight requests are gone
        )
        self._audit_unindexed = Gauge(
            "tabiji_audit_unindexed_records",
            "Audit records committed to the log but not indexed yet (deferred; flushed once a"
            " second).",
            registry=reg,
            multiprocess_mode="livemax",  # one database: every worker sees the same backlog
        )
        self._refused = Counter(
            "tabiji_refused",
            "Requests refused by the protocol before any app ran, by reason.",
            ["reason"],
            registry=reg,
        )
        self._stage_seconds = Counter(
            "tabiji_stage_seconds", "Time spent per pipeline stage.", ["stage"], registry=reg
        )
        self._stage_calls = Counter(
            "tabiji_stage_calls", "Calls per pipeline stage.", ["stage"], registry=reg
        )
        self._sent_requests: dict[tuple[str, int, str], int] = {}
        self._sent_upstream: dict[str, tuple[list[int], float]] = {}
        self._sent_refusals: dict[str, int] = {}
        self._sent_ns: dict[str, int] = {}
        self._sent_calls: dict[str, int] = {}

    def start(self) -> None:
        """Flush every `interval` seconds in a daemon thread until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tabiji-metrics", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and flush what is left (called at shutdown, after in-flight requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        """Push the deltas since the last flush."""
        with self._lock:
            src = self._source
            self._in_flight.set(src.in_flight)
            self._audit_unindexed.set(src.audit_unindexed)
            for key, total in src.requests.copy().items():
                delta = total - self._sent_requests.get(key, 0)
                if delta:
                    route, status, decision = key
                    self._requests.labels(route, str(status), decision).inc(delta)
                    self._sent_requests[key] = total
            for route, hist in src.upstream.copy().items():
                counts, total_s = list(hist.counts), hist.total
                sent_counts, sent_total = self._sent_upstream.get(route, ([0] * len(counts), 0.0))
                if counts != sent_counts:
                    child = self._upstream.labels(route)
                    # prometheus_client has no public "add n observations to bucket i"; its own
                    # observe() writes exactly these values (non-cumulative bucket counts and _sum).
                    for i, (now, before) in enumerate(zip(counts, sent_counts, strict=True)):
                        if now != before:
                            child._buckets[i].inc(now - before)
                    child._sum.inc(total_s - sent_total)
                    self._sent_upstream[route] = (counts, total_s)
            _push(src.refusals, self._sent_refusals, self._refused, 1)
            totals = self._stages.totals()
            _push({k: v[0] for k, v in totals.items()}, self._sent_ns, self._stage_seconds, 1e-9)
            _push({k: v[1] for k, v in totals.items()}, self._sent_calls, self._stage_calls, 1)


def _push(totals: dict[str, int], sent: dict[str, int], counter: Any, scale: float) -> None:
    for label, total in totals.copy().items():
        delta = total - sent.get(label, 0)
        if delta:
            counter.labels(label).inc(delta * scale)
            sent[label] = total


_exporter: Exporter | None = None


def start_exporter(interval: float = 1.0) -> Exporter:
    """Start this process's exporter for the module-level `metrics` and `stages` (idempotent)."""
    global _exporter  # noqa: PLW0603 - one exporter per process, like the metrics it reads
    if _exporter is None:
        _exporter = Exporter(metrics, stages, interval=interval)
    _exporter.start()
    return _exporter


def stop_exporter() -> None:
    """Stop this process's exporter and flush the last deltas."""
    if _exporter is not None:
        _exporter.stop()


@dataclass(slots=True)
class MetricsListener:
    """The separate /metrics listener; `close()` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsListener:
    """Serve Prometheus text on host:port in a thread: this process's registry, or with
    PROMETHEUS_MULTIPROC_DIR set, the sum over every worker's files (the supervisor's case)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    else:
        registry = REGISTRY
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsListener(host, server.server_port, server, thread)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals never go down)."""
    if os.environ.get(MULTIPROC_ENV):
        mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream


# ------------------------------------------------------------------------------------------------
# Readiness

CheckResult = tuple[bool, str]  # (ok, detail) - the detail is shown to operators, never secrets
Check = Callable[[], CheckResult | Awaitable[CheckResult]]

readiness_logger = logging.getLogger("tabiji.readiness")


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    check: Check
    timeout: float


class Readiness:
    """Named checks that `/.tabiji/readyz` reports; ready only when every check is ok."""

    def __init__(self) -> None:
        self._checks: dict[str, _Registered] = {}

    def add(self, name: str, check: Check, *, timeout: float = 2.0) -> None:
        """Register `check` (sync or async, returning (ok, detail)) under a unique `name`."""
        if name in self._checks:
            raise ValueError(f"readiness check {name!r} is already registered")
        self._checks[name] = _Registered(name, check, timeout)

    @property
    def names(self) -> Iterable[str]:
        return tuple(self._checks)

    async def check_all(self) -> dict[str, Any]:
        """Run the checks concurrently: {"ready", "checks": {name: {"ok", "detail", "ms"}}}."""
        results = await asyncio.gather(*(self._run(reg) for reg in self._checks.values()))
        checks = dict(results)
        return {"ready": all(body["ok"] for body in checks.values()), "checks": checks}

    async def _run(self, reg: _Registered) -> tuple[str, dict[str, Any]]:
        started = time.perf_counter()
        try:
            result = reg.check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, reg.timeout)
            ok, detail = result
        except TimeoutError:
            ok, detail = False, f"timed out after {reg.timeout:g} s"
        except Exception as exc:  # a failing check means not ready, never a crashed endpoint
            # Only the type: exception texts can carry DSNs with passwords (traceback: debug).
            readiness_logger.warning(
                "readiness check failed", extra={"check": reg.name, "error": type(exc).__name__}
            )
            readiness_logger.debug("readiness check %s traceback", reg.name, exc_info=exc)
            ok, detail = False, type(exc).__name__
        ms = round((time.perf_counter() - started) * 1000, 2)
        return reg.name, {"ok": bool(ok), "detail": str(detail), "ms": ms}
