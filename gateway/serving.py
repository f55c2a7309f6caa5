"""Run the gateway under uvicorn: one process, or a supervisor with N workers sharing one socket.

Owns the uvicorn Config (our protocols and limits, uvloop, no proxy-header trust, JSON logs), the
metrics listener and the per-worker metrics exporter. Must not import gateway.settings, app,
cli or pipeline: the CLI fills `ServeOptions` from settings, and each worker loads the app by
import string.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import ssl
import tempfile
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.supervisors.multiprocess import Multiprocess

from gateway import observability
from gateway.protocol import DEFAULT_LIMITS, ProtocolConfig, ProtocolLimits

CONFIG_ENV = "TABIJI_CONFIG"

logger = logging.getLogger("tabiji.serving")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """Everything `serve` needs; the CLI builds it from settings."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    ssl_certfile: str | None = None  # TLS terminated here when both are set
    ssl_keyfile: str | None = None
    limits: ProtocolLimits = field(default=DEFAULT_LIMITS)
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection is kept
    graceful_shutdown_seconds: int = 30  # in-flight requests get this long after SIGTERM
    backlog: int = 2048
    limit_concurrency: int | None = None  # connections+tasks per worker before 503; None: no cap
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics listener
    metrics_flush_seconds: float = 1.0  # how stale /metrics may be
    log_level: str = "info"
    config_path: str | None = None  # exported as TABIJI_CONFIG for the app factory in each worker
    app: str = "gateway.app:create_app"  # an app *factory*, imported in each worker

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both a certificate and a key file")
        if self.graceful_shutdown_seconds < 0 or self.keep_alive_timeout < 1:
            raise ValueError("timeouts must be positive")


def _tls_context(config: Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's context from the cert and key, with TLS 1.2 as the floor (RFC 8996, BCP 195)."""
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _WorkerLifespan(LifespanOn):
    """The app's lifespan, plus this process's metrics exporter around it."""

    async def startup(self) -> None:
        interval = (
            self.config.metrics_flush_seconds if isinstance(self.config, WorkerConfig) else 1.0
        )
        observability.start_exporter(interval)
        await super().startup()

    async def shutdown(self) -> None:
        await super().shutdown()
        # After uvicorn waited for in-flight requests: the last deltas reach /metrics.
        observability.stop_exporter()


class WorkerConfig(ProtocolConfig):
    """The Config each worker loads; picklable, since uvicorn spawns workers with it."""

    def __init__(self, app: Any, *, metrics_flush_seconds: float = 1.0, **kwargs: Any) -> None:
        self.metrics_flush_seconds = metrics_flush_seconds
        super().__init__(app, **kwargs)

    def load(self) -> None:
        super().load()
        self.lifespan_class = _WorkerLifespan


def build_config(options: ServeOptions) -> WorkerConfig:
    """The uvicorn Config for `options` (exposed for tests and the bench)."""
    tls = options.ssl_certfile is not None
    return WorkerConfig(
        options.app,
        limits=options.limits,
        metrics_flush_seconds=options.metrics_flush_seconds,
        factory=True,
        host=options.host,
        port=options.port,
        workers=options.workers,
        loop="uvloop",  # asyncio + --workers leaves Nagle on (uvicorn #3149); uvloop is faster
        lifespan="on",
        proxy_headers=False,  # the pipeline trusts X-Forwarded-* only from `trusted_proxies`
        server_header=False,
        # Forwarded responses keep the upstream's own Date; the gateway's pages add theirs.
        date_header=False,
        access_log=False,  # the pipeline logs each request once, with its request id
        log_config=observability.logging_config(options.log_level),
        log_level=options.log_level,
        timeout_keep_alive=options.keep_alive_timeout,
        timeout_graceful_shutdown=options.graceful_shutdown_seconds,
        backlog=options.backlog,
        limit_concurrency=options.limit_concurrency,
        ssl_certfile=options.ssl_certfile,
        ssl_keyfile=options.ssl_keyfile,
        ssl_context_factory=_tls_context if tls else None,
        # Each request task starts from an empty context: a request id never leaks across requests.
        reset_contextvars=True,
    )


class _Supervisor(Multiprocess):
    """uvicorn's Multiprocess, plus: closing the listening socket first on exit, dropping dead
    workers' live gauges, and remembering whether it stopped because a worker failed to start."""

    def __init__(self, config: Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        self.by_signal = False

    def handle_int(self) -> None:
        self.by_signal = True
        super().handle_int()

    def handle_term(self) -> None:
        self.by_signal = True
        super().handle_term()

    def terminate_all(self) -> None:
        # The supervisor's copy keeps the socket listening while workers drain, so new clients
        # would queue in the backlog and be reset later; closing it makes them refused at once.
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def join_all(self) -> None:
        super().join_all()
        for process in self.processes:
            if process.pid is not None:
                observability.mark_worker_dead(process.pid)

    def restart_all(self) -> None:
        self._replacing(super().restart_all)

    def keep_subprocess_alive(self) -> None:
        self._replacing(super().keep_subprocess_alive)

    def _replacing(self, step: Callable[[], None]) -> None:
        before = {p.pid for p in self.processes}
        step()
        for pid in before - {p.pid for p in self.processes}:
            if pid is not None:
                observability.mark_worker_dead(pid)


class _Server(uvicorn.Server):
    """uvicorn's Server without re-raising the stop signal after a graceful stop.

    uvicorn re-raises SIGTERM once it has shut down, so the process would end "killed by SIGTERM";
    `serve` returns 0 instead. SIGHUP is logged and ignored (see `_ignore_hup`).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _ignore_hup)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code (0 after a graceful stop).

    workers == 1: uvicorn's Server in this process. workers > 1: this process binds the socket once,
    serves /metrics for all workers, and supervises them (SIGHUP: rolling restart of the workers).
    """
    observability.setup_logging(options.log_level)
    if options.config_path is not None:
        os.environ[CONFIG_ENV] = options.config_path
    if options.workers == 1:
        return _serve_single(options)
    return _serve_workers(options)


def _serve_single(options: ServeOptions) -> int:
    # One process: metrics live in this process's registry, never in leftover multiprocess files.
    os.environ.pop(observability.MULTIPROC_ENV, None)
    config = build_config(options)
    listener = None
    if options.metrics_port is not None:
        listener = observability.serve_metrics(options.metrics_host, options.metrics_port)
    server = _Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits with 3 when the app or the socket fails at startup
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if listener is not None:
            listener.close()
    return 0 if server.started else 1


def _ignore_hup(signum: int, frame: FrameType | None) -> None:
    # A lone server cannot replace itself without a gap; the default action kills it mid-request.
    logger.warning(
        "SIGHUP ignored: with workers = 1 restart the service to reload (workers >= 2 roll)"
    )


def _serve_workers(options: ServeOptions) -> int:
    # A fresh directory per run: prometheus_client's multiprocess files must not outlive it, and
    # must be set before the workers start (they choose file-backed values when they import it).
    metrics_dir = tempfile.mkdtemp(prefix="tabiji-metrics-")
    previous = os.environ.get(observability.MULTIPROC_ENV)
    os.environ[observability.MULTIPROC_ENV] = metrics_dir
    listener = None
    try:
        config = build_config(options)
        sock = config.bind_socket()
        try:
            if options.metrics_port is not None:
                listener = observability.serve_metrics(options.metrics_host, options.metrics_port)
            supervisor = _Supervisor(config, sockets=[sock])
            supervisor.run()
        finally:
            sock.close()
        return 0 if supervisor.by_signal else 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if listener is not None:
            listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(observability.MULTIPROC_ENV, None)
        else:
            os.environ[observability.MULTIPROC_ENV] = previous
