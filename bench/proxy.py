"""`python -m bench proxy`: direct vs nginx `proxy_pass` vs the Tabiji gateway, one run, loopback.

Starts every server itself on 127.0.0.1 and stops each by PID at the end. Imports nothing from
gateway/: the gateway runs as a subprocess, exactly as an operator starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    KIB,
    MIB,
    NOISY_LOAD,
    REPO,
    BenchError,
    Server,
    WrkResult,
    cpu_seconds,
    ensure_tools,
    fmt,
    free_port,
    http_get,
    log,
    machine_info,
    make_workdir,
    median_run,
    parse_by_label,
    render_proxy_conf,
    render_upstream_conf,
    rss_bytes,
    run_wrk,
    signals_as_interrupt,
    start_nginx,
    start_server,
    table,
    wait_http,
    wait_until,
    write_webroot,
)

# Targets from issue 2, point 5: public route, 2 workers, c=32.
TARGET_1K_RATIO = 0.25
TARGET_1K_P99_MS = 15.0
TARGET_1M_RATIO = 0.5
# Issue 4 (speed): the whole authorised request (session + policy + assertion + audit) ≥ 0.2×.
TARGET_AUTH_RATIO = 0.2
# Issue 5 point 7: the core case with audit on stays within 10% of audit off.
TARGET_AUDIT_RATIO = 0.9

BENCH_HOST = "bench.localhost"
# The authenticated route's host is also the gateway's public URL host, so a main session (the
# one a login creates at the public URL) is valid there without a hand-off.
AUTH_HOST = "auth.localhost"
AUTH_POLICY = "bench-staff"
STAGE_SECONDS = "tabiji_stage_seconds_total"
STAGE_CALLS = "tabiji_stage_calls_total"
UNINDEXED = "tabiji_audit_unindexed_records"
SETTLE_STEP_S = 1.1  # longer than the gateway's 1 s flush interval, so a flush lies between
SETTLE_MAX_S = 5.0


@dataclass(frozen=True)
class Case:
    """One response shape to measure."""

    name: str
    path: str
    size: int
    label: str


CASES = {
    "1k": Case("1k", "/", KIB, "1 KiB response"),
    "1m": Case("1m", "/1m", MIB, "1 MiB response"),
}
TARGET_NAMES = (
    "direct",
    "nginx",
    "tabiji",
    "tabiji-auth",
    "tabiji-noaudit",
    "tabiji-noaudit-auth",  # the signed-in case without audit: identity's own cost
)
# The extra gateway cases answer questions about the 1 KiB request path only.
ONLY_1K = ("tabiji-auth", "tabiji-noaudit", "tabiji-noaudit-auth")


@dataclass
class Target:
    """Something wrk hits: a base URL, the Host header to send, and whose CPU to account."""

    name: str
    base: str
    host: str
    cpu_root: int
    metrics_url: str | None = None
    headers: tuple[str, ...] = ()  # extra request headers ("Cookie: …")


@dataclass
class Run:
    """One wrk run and, for the gateway, the per-stage counters' deltas over it."""

    wrk: WrkResult
    stage_seconds: dict[str, float] | None = None
    stage_calls: dict[str, float] | None = None
    # The deferred audit indexing of this run's records, done after it (SQLite audit): the
    # gateway's CPU while its backlog drained, per request of the run.
    index_cpu_us: float | None = None
    index_seconds: float | None = None


@dataclass
class Report:
    """Everything measured; rendered as a table and as JSON."""

    settings: dict[str, Any]
    runs: dict[str, dict[str, list[Run]]] = field(default_factory=dict)  # case -> target -> runs
    notes: list[str] = field(default_factory=list)
    gateway_rss_idle: list[int] = field(default_factory=list)
    gateway_rss_after_1m: list[int] = field(default_factory=list)

    def median(self, case: str, target: str) -> Run | None:
        runs = self.runs.get(case, {}).get(target)
        return median_run(runs, key=lambda r: r.wrk.rps) if runs else None

    def best(self, case: str, target: str) -> Run | None:
        """The fastest run: on a shared machine, the one least disturbed by other processes."""
        runs = self.runs.get(case, {}).get(target)
        return max(runs, key=lambda r: r.wrk.rps) if runs else None


# --------------------------------------------------------------------------- servers


def _start_upstream(work: Path) -> tuple[Server, int]:
    port = free_port()
    webroot = work / "www"
    write_webroot(webroot)
    conf = render_upstream_conf(work / "upstream", port, webroot, workers=1)
    server = start_nginx("nginx upstream", work / "upstream", conf)
    wait_http(f"http://127.0.0.1:{port}/", server, size=KIB)
    return server, port


def _start_nginx_proxy(work: Path, upstream_port: int, workers: int) -> tuple[Server, int]:
    port = free_port()
    conf = render_proxy_conf(work / "proxy", port, upstream_port, workers=workers)
    server = start_nginx("nginx proxy", work / "proxy", conf)
    wait_http(f"http://127.0.0.1:{port}/", server, size=KIB)
    return server, port


POLICY_YAML = f"""\
# Written by `python -m bench proxy`: the authenticated route needs a signed-in member of staff.
policies:
  - name: {AUTH_POLICY}
    allow:
      all:
        - group: staff
"""


def gateway_config(
    port: int, metrics_port: int, upstream_port: int, state: Path | None = None, audit: bool = True
) -> str:
    """The gateway's YAML: a public route to the upstream, chosen by Host; with `state` (a work
    dir) also identity (one provider, never contacted: discovery happens only at login) and an
    authenticated route on the public URL's host; `audit=False` turns the audit trail off."""
    if state is None:
        return f"""\
# Written by `python -m bench proxy`: one public route in front of the nginx upstream.
listen: {{host: 127.0.0.1, port: {port}}}
public_url: http://127.0.0.1:{port}
trusted_proxies: []
metrics: {{listen: {{host: 127.0.0.1, port: {metrics_port}}}}}
logging: {{level: warning}}
audit: {{enabled: {str(audit).lower()}}}
routes:
  - name: bench-public
    from: http://{BENCH_HOST}:{port}
    to: http://127.0.0.1:{upstream_port}
    public: true
"""
    return f"""\
# Written by `python -m bench proxy`: a public route and an authenticated one (group staff, a
# session cookie) in front of the nginx upstream; audit {"on (batched SQLite)" if audit else "off"}.
listen: {{host: 127.0.0.1, port: {port}}}
public_url: http://{AUTH_HOST}:{port}
trusted_proxies: []
metrics: {{listen: {{host: 127.0.0.1, port: {metrics_port}}}}}
logging: {{level: warning}}
policies: {{dir: {state / "policies"}, watch: poll, poll_interval: 60s}}
identity:
  providers:
    - name: bench
      issuer: https://idp.bench.invalid
      client_id: tabiji-bench
      client_secret_file: {state / "client.secret"}
  session: {{store: "sqlite:///{state / "state.db"}"}}
assertion: {{key_dir: {state / "assertion-keys"}}}
audit:
  enabled: {str(audit).lower()}
  store: "sqlite:///{state / "audit.db"}"
  spool_dir: {state / "audit-spool"}
  key_file: {state / "audit-key.pem"}
routes:
  - name: bench-public
    from: http://{BENCH_HOST}:{port}
    to: http://127.0.0.1:{upstream_port}
    public: true
  - name: bench-auth
    from: http://{AUTH_HOST}:{port}
    to: http://127.0.0.1:{upstream_port}
    policy: {AUTH_POLICY}
"""


def _prepare_state(gw: Path) -> None:
    """The files the identity config names: policies, a client secret (never sent anywhere)."""
    (gw / "policies").mkdir()
    (gw / "policies" / "bench.yaml").write_text(POLICY_YAML)
    secret = gw / "client.secret"
    secret.write_text("bench-client-secret-never-used\n")
    secret.chmod(0o600)


def _create_session(gw: Path, port: int, env: dict[str, str]) -> str:
    """A signed-in session in the gateway's state store (through the gateway's own code, in a
    subprocess: this module never imports gateway); returns the cookie id."""
    store = f"sqlite:///{gw / 'state.db'}"
    cmd = [sys.executable, "-m", "bench._session", store, f"{AUTH_HOST}:{port}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    cookie = done.stdout.strip()
    if done.returncode or not cookie:
        raise BenchError(f"could not create the bench session: {done.stderr.strip()[-2000:]}")
    return cookie


def _gateway_cmd(
    template: str | None, config: Path, port: int, metrics: int, workers: int
) -> list[str]:
    if template is None:
        return [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(config),
            "--workers",
            str(workers),
        ]
    values = {
        "python": sys.executable,
        "config": str(config),
        "port": str(port),
        "metrics_port": str(metrics),
        "workers": str(workers),
    }
    return [part.format(**values) for part in shlex.split(template)]


def _start_gateway(
    args: argparse.Namespace,
    work: Path,
    upstream_port: int,
    stack: contextlib.ExitStack,
    *,
    name: str = "tabiji",
    audit: bool = True,
) -> tuple[list[Target], Server]:
    """Start a gateway and check it forwards; BenchError('gateway not available: …') if not.

    Its targets: the public route (`name`), and with identity (`--auth`, the default command)
    the authenticated route as `name`-auth, with a session created before the run.
    """
    if args.gateway_cmd is None and not (REPO / "gateway" / "cli.py").exists():
        raise BenchError(f"gateway not available: {REPO / 'gateway' / 'cli.py'} does not exist yet")
    gw = work / name
    gw.mkdir()
    port, metrics_port = free_port(), free_port()
    config = gw / "gateway.yaml"
    with_identity = args.auth and args.gateway_cmd is None
    if with_identity:
        _prepare_state(gw)
    config.write_text(
        gateway_config(port, metrics_port, upstream_port, gw if with_identity else None, audit)
    )
    cmd = _gateway_cmd(args.gateway_cmd, config, port, metrics_port, args.workers)
    # The repo root first on the path: the checkout under test, whether or not it is pip-installed.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "TABIJI_CONFIG": str(config)}
    log(f"starting gateway ({name}): {shlex.join(cmd)}")
    server = start_server(name, cmd, gw / "gateway.log", cwd=REPO, env=env)
    stack.callback(server.stop, args.grace)
    base = f"http://127.0.0.1:{port}"
    host = f"{BENCH_HOST}:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    targets = [Target(name, base, host, server.pid, metrics_url)]
    try:
        _check_gateway(server, base, host, args.start_timeout)
        if with_identity and f"{name}-auth" in args.targets:
            cookie = _create_session(gw, port, env)
            auth = Target(
                f"{name}-auth",
                base,
                f"{AUTH_HOST}:{port}",
                server.pid,
                metrics_url,
                headers=(f"Cookie: tabiji-session={cookie}",),
            )
            _check_route(auth)
            targets.append(auth)
    except BenchError:
        server.stop(args.grace)  # no use keeping it running through the other targets
        raise
    return targets, server


def _check_route(t: Target) -> None:
    """The authenticated route forwards the 1 KiB body for the session (never a login page)."""
    try:
        probe = http_get(t.base + "/", host=t.host, timeout=10, headers=t.headers)
    except (OSError, http.client.HTTPException) as err:
        raise BenchError(f"gateway not available: GET / ({t.name}) failed: {err}") from err
    if probe.status != 200 or len(probe.body) != KIB:
        raise BenchError(
            f"gateway not available: GET / with Host {t.host} and the session cookie answered "
            f"{probe.status} with {len(probe.body)} bytes (want 200 with {KIB}); "
            f"body starts {probe.body[:200]!r}"
        )


def _check_gateway(server: Server, base: str, host: str, timeout: float) -> None:
    """Healthy, and forwards both bodies intact (never benchmark a 403 or 404 page)."""

    def healthy() -> bool:
        # /.tabiji/ is reserved on every host; try the public URL's host and the route's host.
        return any(http_get(f"{base}/.tabiji/healthz", host=h).status == 200 for h in (None, host))

    try:
        wait_until(healthy, timeout, server, what="GET /.tabiji/healthz → 200")
    except BenchError as err:
        raise BenchError(f"gateway not available: {err}") from err
    for case in CASES.values():
        try:
            probe = http_get(base + case.path, host=host, timeout=10)
        except (OSError, http.client.HTTPException) as err:
            raise BenchError(f"gateway not available: GET {case.path} failed: {err}") from err
        if probe.status != 200 or len(probe.body) != case.size:
            raise BenchError(
                f"gateway not available: GET {case.path} with Host {host} answered "
                f"{probe.status} with {len(probe.body)} bytes (want 200 with {case.size}); "
                f"body starts {probe.body[:200]!r}"
            )


def _scrape(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        probe = http_get(url, timeout=3)
    except (OSError, http.client.HTTPException):
        return None
    return probe.body.decode(errors="replace") if probe.status == 200 else None


def _scrape_settled(url: str | None) -> str | None:
    """Scrape until the stage counters stop moving.

    The gateway copies its hot-path counters into Prometheus about once a second, so a scrape
    right after wrk ends can miss the last second; wait (up to SETTLE_MAX_S) for a stable value.
    """
    text = _scrape(url)
    if text is None or STAGE_CALLS not in text:
        return text
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_STEP_S)
        again = _scrape(url)
        if again is None:
            return text
        if parse_by_label(again, STAGE_CALLS, "stage") == parse_by_label(
            text, STAGE_CALLS, "stage"
        ):
            return again
        text = again
    return text


def _unindexed(text: str | None) -> float | None:
    """The audit backlog gauge (None: no audit trail, or no metrics)."""
    for line in (text or "").splitlines():
        if line.startswith((UNINDEXED + " ", UNINDEXED + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_indexed(
    t: Target, since: tuple[float, float] | None = None, timeout: float = 300.0
) -> tuple[float, float] | None:
    """Wait until the gateway's audit backlog is indexed (deferred work is not saved work: a
    measured run must not leave it to the next). Returns (CPU seconds, wall seconds) the
    gateway spent since `since` (its CPU seconds and monotonic time at the run's end; else
    now), or None without an audit backlog gauge."""
    if t.metrics_url is None or _unindexed(_scrape(t.metrics_url)) is None:
        return None
    cpu0, wall0 = since if since is not None else (cpu_seconds(t.cpu_root), time.monotonic())
    zeros = 0
    while time.monotonic() - wall0 < timeout:
        # The gauge is exported once a second: two zeros in a row mean every worker saw none.
        zeros = zeros + 1 if _unindexed(_scrape(t.metrics_url)) == 0 else 0
        if zeros >= 2:
            break
        time.sleep(0.25)
    else:
        raise BenchError(f"{t.name}: audit indexing did not finish within {timeout:g} s")
    return cpu_seconds(t.cpu_root) - cpu0, time.monotonic() - wall0


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# --------------------------------------------------------------------------- measuring


def _measure(
    args: argparse.Namespace,
    targets: list[Target],
    servers: dict[str, Server],
    upstream_pid: int,
    report: Report,
) -> None:
    for case_name in args.case:
        case = CASES[case_name]
        case_targets = [t for t in targets if case_name == "1k" or t.name not in ONLY_1K]
        report.runs[case_name] = {t.name: [] for t in case_targets}
        for t in case_targets:
            # Warm-up: fill keep-alive pools and caches so run 1 is not an outlier.
            run_wrk(
                t.base + case.path,
                duration=1,
                connections=args.connections,
                host=t.host,
                headers=t.headers,
            )
        for i in range(args.runs):
            # Interleave targets run by run, so drift on the machine hits all of them alike.
            for t in case_targets:
                server = servers[t.name]
                if not server.alive():
                    raise BenchError(f"{server.name} died; last log lines:\n{server.log_tail()}")
                _wait_indexed(t)  # the warm-up's or the last run's backlog
                before = _scrape_settled(t.metrics_url)
                result = run_wrk(
                    t.base + case.path,
                    duration=args.duration,
                    connections=args.connections,
                    host=t.host,
                    headers=t.headers,
                    cpu_root=t.cpu_root,
                    other_roots=[upstream_pid] if t.cpu_root != upstream_pid else [],
                )
                # The gateway starts indexing the run's records as soon as it is idle: from here.
                ended = (cpu_seconds(t.cpu_root), time.monotonic())
                after = _scrape_settled(t.metrics_url)
                run = Run(result)
                if before is not None and after is not None:
                    sec_b = parse_by_label(before, STAGE_SECONDS, "stage")
                    sec_a = parse_by_label(after, STAGE_SECONDS, "stage")
                    if sec_a:
                        run.stage_seconds = _delta(sec_a, sec_b)
                        calls_a = parse_by_label(after, STAGE_CALLS, "stage")
                        calls_b = parse_by_label(before, STAGE_CALLS, "stage")
                        run.stage_calls = _delta(calls_a, calls_b)
                drained = _wait_indexed(t, ended)
                if drained is not None and result.requests:
                    # Includes the idle gateway's own CPU over the same time: an upper bound.
                    run.index_cpu_us = drained[0] / result.requests * 1e6
                    run.index_seconds = drained[1]
                report.runs[case_name][t.name].append(run)
                log(
                    f"  {case_name} run {i + 1}/{args.runs} {t.name:<14} "
                    f"{result.rps:>10,.0f} req/s  p99 {result.p99_us / 1000:6.2f} ms  "
                    f"{result.mib_s:8,.1f} MiB/s  errors {result.errors}"
                )
        for name, runs in report.runs[case_name].items():
            busy = max(r.wrk.foreign_load for r in runs)
            if busy > NOISY_LOAD:
                report.notes.append(
                    f"{case_name}/{name}: other processes used up to {busy:.2f} CPUs during a "
                    "run: req/s and latency are noisy; CPU µs/req and the best run suffer less"
                )
            if any(r.wrk.errors for r in runs):
                report.notes.append(
                    f"{case_name}/{name}: wrk saw errors (non-2xx, timeouts or "
                    "socket errors); treat those figures with care"
                )
        if case_name == "1m" and "tabiji" in servers:
            report.gateway_rss_after_1m = rss_bytes(servers["tabiji"].pid)


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> Report:
    """Start the servers, measure, and return the report; servers are stopped by `stack`."""
    work = make_workdir("tabiji-bench-")
    if args.keep:
        log(f"work dir (kept): {work}")
    else:
        stack.callback(_rmtree, work)
    settings = {
        "duration_s": args.duration,
        "connections": args.connections,
        "threads": 1,
        "runs": args.runs,
        "gateway_workers": args.workers,
        "nginx_proxy_workers": args.nginx_workers,
        "cases": args.case,
        "machine": machine_info(),
    }
    report = Report(settings=settings)
    servers: dict[str, Server] = {}
    targets: list[Target] = []

    upstream, up_port = _start_upstream(work)
    stack.callback(upstream.stop)
    log(f"nginx upstream on 127.0.0.1:{up_port} (pid {upstream.pid})")
    if "direct" in args.targets:
        servers["direct"] = upstream
        targets.append(
            Target("direct", f"http://127.0.0.1:{up_port}", f"{BENCH_HOST}:{up_port}", upstream.pid)
        )
    if "nginx" in args.targets:
        proxy, px_port = _start_nginx_proxy(work, up_port, args.nginx_workers)
        stack.callback(proxy.stop)
        log(f"nginx proxy on 127.0.0.1:{px_port} (pid {proxy.pid}, {args.nginx_workers} workers)")
        servers["nginx"] = proxy
        targets.append(
            Target("nginx", f"http://127.0.0.1:{px_port}", f"{BENCH_HOST}:{px_port}", proxy.pid)
        )
    gateways = [("tabiji", True)] if "tabiji" in args.targets else []
    if "tabiji-noaudit" in args.targets:
        gateways.append(("tabiji-noaudit", False))
    for name, audit in gateways:
        try:
            found, gw_server = _start_gateway(args, work, up_port, stack, name=name, audit=audit)
        except BenchError as err:
            if not str(err).startswith("gateway not available"):
                raise
            log(str(err))
            report.notes.append(str(err))
            continue
        gw = found[0]
        log(f"gateway {name} on {gw.base} (pid {gw.cpu_root}, {args.workers} workers)")
        if name == "tabiji":
            report.gateway_rss_idle = rss_bytes(gw.cpu_root)
        for t in found:
            if t.name in args.targets:
                servers[t.name] = gw_server
                targets.append(t)
    if not targets:
        raise BenchError("nothing to measure: every target is disabled or unavailable")
    _measure(args, targets, servers, upstream.pid, report)
    return report


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Check:
    """One of issue 2's speed targets, measured."""

    what: str
    value: str
    target: str
    ok: bool


def _best_ratio(report: Report, case: str) -> float:
    return _best_pair(report, case, "tabiji", "nginx")


def _best_pair(report: Report, case: str, a: str, b: str) -> float:
    first, second = report.best(case, a), report.best(case, b)
    return first.wrk.rps / second.wrk.rps if first and second else float("nan")


def checks(report: Report) -> list[Check]:
    """Compare the gateway's median run with nginx's against the issue's targets (best runs too)."""
    out: list[Check] = []
    t1, n1 = report.median("1k", "tabiji"), report.median("1k", "nginx")
    if t1 and n1:
        ratio = t1.wrk.rps / n1.wrk.rps
        out.append(
            Check(
                "1 KiB req/s ratio",
                f"{ratio:.3f} (best runs: {_best_ratio(report, '1k'):.3f})",
                f">= {TARGET_1K_RATIO}",
                ratio >= TARGET_1K_RATIO,
            )
        )
    if t1:
        p99 = t1.wrk.p99_us / 1000
        out.append(
            Check(
                "1 KiB p99", f"{p99:.2f} ms", f"<= {TARGET_1K_P99_MS:g} ms", p99 <= TARGET_1K_P99_MS
            )
        )
    ta = report.median("1k", "tabiji-auth")
    if ta and n1:
        ratio = ta.wrk.rps / n1.wrk.rps
        best = _best_pair(report, "1k", "tabiji-auth", "nginx")
        out.append(
            Check(
                "1 KiB authenticated req/s ratio",
                f"{ratio:.3f} (best runs: {best:.3f})",
                f">= {TARGET_AUTH_RATIO}",
                ratio >= TARGET_AUTH_RATIO,
            )
        )
    tn = report.median("1k", "tabiji-noaudit")
    if t1 and tn:
        ratio = t1.wrk.rps / tn.wrk.rps
        best = _best_pair(report, "1k", "tabiji", "tabiji-noaudit")
        out.append(
            Check(
                "1 KiB audit on / audit off req/s",
                f"{ratio:.3f} (best runs: {best:.3f}; CPU µs/req {fmt(t1.wrk.cpu_us_per_req, 1)}"
                f" vs {fmt(tn.wrk.cpu_us_per_req, 1)}; deferred indexing after the run"
                f" {fmt(t1.index_cpu_us, 1)} µs/record, not in the ratio)",
                f">= {TARGET_AUDIT_RATIO}",
                ratio >= TARGET_AUDIT_RATIO,
            )
        )
    tm, nm = report.median("1m", "tabiji"), report.median("1m", "nginx")
    if tm and nm:
        ratio = tm.wrk.mib_s / nm.wrk.mib_s
        out.append(
            Check(
                "1 MiB MiB/s ratio",
                f"{ratio:.3f} (best runs: {_best_ratio(report, '1m'):.3f})",
                f">= {TARGET_1M_RATIO}",
                ratio >= TARGET_1M_RATIO,
            )
        )
    return out


def _render_case(report: Report, case_name: str, show_latency: bool) -> list[str]:
    case = CASES[case_name]
    nginx = report.median(case_name, "nginx")
    headers = ["target", "req/s", "p50 ms", "p99 ms"]
    if show_latency:
        headers += ["p75 ms", "p90 ms", "max ms"]
    headers += ["MiB/s", "CPU µs/req", "errors", "other load", "vs nginx", "best req/s", "best vs"]
    rows = []
    for name in report.runs[case_name]:
        r = report.median(case_name, name)
        if r is None:
            continue
        w = r.wrk
        row = [name, fmt(w.rps), fmt(w.p50_us / 1000, 2), fmt(w.p99_us / 1000, 2)]
        if show_latency:
            row += [fmt(w.p75_us / 1000, 2), fmt(w.p90_us / 1000, 2), fmt(w.max_us / 1000, 2)]
        ratio = w.rps / nginx.wrk.rps if nginx else None
        row += [fmt(w.mib_s, 1), fmt(w.cpu_us_per_req, 1), str(w.errors), fmt(w.foreign_load, 2)]
        best, nginx_best = report.best(case_name, name), report.best(case_name, "nginx")
        assert best is not None  # this target has runs
        best_ratio = best.wrk.rps / nginx_best.wrk.rps if nginx_best else None
        row += [fmt(ratio, 3), fmt(best.wrk.rps), fmt(best_ratio, 3)]
        rows.append(row)
    return ["", f"{case.label} (GET {case.path})", table(headers, rows)]


def _stage_us(run: Run) -> dict[str, float]:
    if run.stage_seconds is None:
        return {}
    return {k: v / run.wrk.requests * 1e6 for k, v in run.stage_seconds.items()}


def _render_auth_cost(report: Report) -> list[str]:
    """What signing in costs per request: the authenticated route minus the public one."""
    pub, auth = report.median("1k", "tabiji"), report.median("1k", "tabiji-auth")
    if pub is None or auth is None:
        return []
    sp, sa = _stage_us(pub), _stage_us(auth)
    rows = [
        [stage, fmt(sp.get(stage), 1), fmt(sa.get(stage), 1), fmt(sa[stage] - sp.get(stage, 0), 1)]
        for stage in sa
    ]
    cp, ca = pub.wrk.cpu_us_per_req, auth.wrk.cpu_us_per_req
    rows.append(["(process CPU)", fmt(cp, 1), fmt(ca, 1), fmt(ca - cp if ca and cp else None, 1)])
    return [
        "",
        "authenticated vs public request, 1k (median runs; µs of gateway CPU per request):",
        table(["stage", "public", "authenticated", "difference"], rows),
        "  identity = session cookie lookup (cached), decide = policy with a subject, "
        "headers = X-Tabiji-Assertion (minted once per user/route, reused) + header hygiene",
    ]


def _render_stages(report: Report, case_name: str, target: str = "tabiji") -> list[str]:
    r = report.median(case_name, target)
    if r is None:
        return []
    out = ["", f"gateway CPU by stage, {case_name}, {target} (median run):"]
    if r.stage_seconds is None:
        return [*out, f"  - no {STAGE_SECONDS} on the metrics listener; skipped"]
    reqs = r.wrk.requests
    calls = r.stage_calls or {}
    rows = [
        [stage, fmt(secs / reqs * 1e6, 1), fmt(calls[stage] / reqs if stage in calls else None, 2)]
        for stage, secs in r.stage_seconds.items()
    ]
    rows.append(["(sum of stages)", fmt(sum(r.stage_seconds.values()) / reqs * 1e6, 1), ""])
    rows.append(["(process CPU)", fmt(r.wrk.cpu_us_per_req, 1), ""])
    if r.wrk.cpu_us_per_req is not None:
        # What no stage times: the server (HTTP parsing), the event loop, and streaming I/O.
        rest = r.wrk.cpu_us_per_req - sum(r.stage_seconds.values()) / reqs * 1e6
        rows.append(["(rest: server, loop, I/O)", fmt(rest, 1), ""])
    out.append(table(["stage", "µs/req", "calls/req"], rows))
    if rows[-1][0].startswith("(rest") and rows[-1][1].startswith("-"):
        out.append(
            "  note: the stages add up to more than the process CPU: a stage is timed "
            "across an await (wall time, not CPU); time only synchronous sections"
        )
    if calls and max(calls.values()) < 0.5 * reqs:
        # With --workers N each worker has its own counters unless the gateway aggregates them.
        out.append(
            "  note: far fewer stage calls than requests; are the metrics aggregated "
            "across workers (prometheus_client multiprocess mode)?"
        )
    return out


def render(report: Report, show_latency: bool) -> str:
    """The human-readable report: one table per case, ratios to nginx, stages, RSS."""
    s = report.settings
    out = [
        f"wrk -t1 -c{s['connections']} -d{s['duration_s']:g}s, median of {s['runs']} run(s); "
        f"gateway {s['gateway_workers']} workers, nginx proxy {s['nginx_proxy_workers']} workers; "
        f"{s['machine']['cpus']} CPUs, {s['machine']['nginx']}"
    ]
    for case_name in report.runs:
        out += _render_case(report, case_name, show_latency)
    out += ["", "targets (tabiji vs nginx proxy, same run):"]
    found = checks(report)
    if not found:
        out.append("  - not measured (needs both nginx and tabiji)")
    for c in found:
        out.append(f"  {c.what}: {c.value} (target {c.target}) {'ok' if c.ok else 'MISSED'}")
    for case_name in report.runs:
        for name in report.runs[case_name]:
            if name.startswith("tabiji"):
                out += _render_stages(report, case_name, name)
    out += _render_auth_cost(report)
    if report.gateway_rss_idle:
        out += ["", f"gateway RSS idle: {_rss_text(report.gateway_rss_idle)}"]
    if report.gateway_rss_after_1m:
        out.append(f"gateway RSS after the 1 MiB runs: {_rss_text(report.gateway_rss_after_1m)}")
    if report.notes:
        out += ["", "notes:", *(f"  - {n}" for n in report.notes)]
    return "\n".join(out)


def _rss_text(sizes: list[int]) -> str:
    per = ", ".join(f"{b / MIB:.0f}" for b in sizes)
    return f"{sum(sizes) / MIB:.0f} MiB total over {len(sizes)} processes ({per} MiB)"


def to_json(report: Report) -> dict[str, Any]:
    """The machine-readable report (`--json`)."""
    results: dict[str, Any] = {}
    for case_name, per_target in report.runs.items():
        results[case_name] = {}
        for name, runs in per_target.items():
            med = report.median(case_name, name)
            assert med is not None  # runs is non-empty by construction
            entry: dict[str, Any] = {
                "median": med.wrk.to_json(),
                "runs": [r.wrk.to_json() for r in runs],
            }
            if med.index_cpu_us is not None:
                entry["audit_index_cpu_us_per_record"] = round(med.index_cpu_us, 2)
                entry["audit_index_seconds"] = round(med.index_seconds or 0.0, 2)
            if med.stage_seconds is not None:
                reqs = med.wrk.requests
                entry["stages_us_per_req"] = {
                    k: round(v / reqs * 1e6, 2) for k, v in med.stage_seconds.items()
                }
                entry["stage_calls_per_req"] = {
                    k: round(v / reqs, 3) for k, v in (med.stage_calls or {}).items()
                }
            results[case_name][name] = entry
    return {
        "bench": "proxy",
        "settings": report.settings,
        "results": results,
        "checks": [asdict(c) for c in checks(report)],
        "gateway_rss_idle_bytes": report.gateway_rss_idle,
        "gateway_rss_after_1m_bytes": report.gateway_rss_after_1m,
        "notes": report.notes,
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; `--quick` is a smoke check (2 s, 1 run)."""
    p = argparse.ArgumentParser(
        prog="python -m bench proxy",
        description="Measure direct-to-upstream, nginx proxy_pass and the Tabiji gateway with wrk "
        "on 127.0.0.1, in one run, and print req/s, p50/p99, MiB/s, ratios to nginx, the "
        "gateway's CPU µs per request (total and by pipeline stage) and its RSS.",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--runs", type=int, default=3, help="runs per target; the median run is shown")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 s runs, 1 run each")
    p.add_argument("--latency", action="store_true", help="also print p75, p90 and max latency")
    p.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES),
        help="only this case (repeatable; default: all)",
    )
    p.add_argument("--no-direct", action="store_true", help="skip wrk straight at the upstream")
    p.add_argument("--no-nginx-proxy", action="store_true", help="skip the nginx reference proxy")
    p.add_argument("--no-tabiji", action="store_true", help="skip the gateway")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="skip the authenticated case (session cookie, policy, assertion; 1 KiB only)",
    )
    p.add_argument(
        "--no-audit-off",
        action="store_true",
        help="skip the second gateway with audit off (the audit on/off ratio; 1 KiB only)",
    )
    p.add_argument("--workers", type=int, default=2, help="gateway workers (2)")
    p.add_argument("--nginx-workers", type=int, help="nginx proxy workers (default: --workers)")
    p.add_argument(
        "--gateway-cmd",
        metavar="TEMPLATE",
        help="start the gateway with this command instead; placeholders {python} "
        "{config} {port} {metrics_port} {workers}",
    )
    p.add_argument("--start-timeout", type=float, default=30.0, help="gateway start timeout (s)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to let servers stop")
    p.add_argument(
        "--json", action="store_true", help="print JSON on stdout (the table then goes to stderr)"
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 2.0, 1
    if args.runs < 1 or args.duration < 1 or args.connections < 1:
        p.error("--runs, --duration and --connections must be at least 1")
    args.case = args.case or list(CASES)
    args.nginx_workers = args.nginx_workers or args.workers
    args.auth = not (args.no_auth or args.no_tabiji)
    offs = (
        args.no_direct,
        args.no_nginx_proxy,
        args.no_tabiji,
        not args.auth,
        args.no_audit_off or args.no_tabiji,
        args.no_audit_off or not args.auth,
    )
    args.targets = [name for name, off in zip(TARGET_NAMES, offs, strict=True) if not off]
    return args


def main(argv: list[str]) -> int:
    """Entry point for `python -m bench proxy`."""
    args = parse_args(argv)
    try:
        ensure_tools({"nginx": "nginx", "wrk": "wrk"})
    except BenchError as err:
        log(f"error: {err}")
        return 2
    started = time.monotonic()
    with signals_as_interrupt():
        try:
            with contextlib.ExitStack() as stack:
                report = run(args, stack)
                log("stopping servers")
        except KeyboardInterrupt:
            log("interrupted: servers stopped")
            return 130
        except BenchError as err:
            log(f"error: {err}")
            return 1
    text = render(report, args.latency)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(to_json(report), indent=2))
    else:
        print(text)
    log(f"(bench took {time.monotonic() - started:.0f} s)")
    if args.check and not all(c.ok for c in checks(report)):
        return 1
    return 0
