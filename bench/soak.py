"""`python -m bench soak`: mixed traffic at c=64 against 2 gateway replicas behind nginx on the
shared Redis and PostgreSQL; per-minute latency, errors and RSS; then 1,000 idle WebSockets.

The cluster comes from bench/cluster.py; the traffic from bench/_loadgen.py, in its own process.
Imports nothing from gateway/ (the gateway runs as subprocesses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bench._loadgen import Plan, TrafficClass, merge, percentile
from bench.common import (
    MIB,
    NOISY_LOAD,
    REPO,
    BenchError,
    cpu_seconds,
    fmt,
    log,
    machine_busy_seconds,
    machine_info,
    process_tree,
    rss_bytes,
    signals_as_interrupt,
    table,
)

# --------------------------------------------------------------------------- limits

# "RSS flat": each replica's RSS in the last interval may exceed its RSS in the second interval
# by at most this fraction. The first interval is warm-up (pools, caches and allocator arenas fill
# up) and is left out. A replica holds ~115-125 MiB here, so 10% is ~12 MiB: a leak of 100 bytes
# per request grows ~160 MiB in 10 minutes at a quiet run's ~2,800 req/s (~43 MiB at a busy
# machine's ~750), far beyond it, while the drift measured here (+4-5 MiB from minute 2 to 10,
# slowing) stays inside. bench/README.md, "soak", has the figures.
RSS_GROWTH_LIMIT = 0.10
# Below this absolute growth a replica counts as flat whatever the ratio says: the allocator grows
# in steps of a few MiB, and one step must not fail a short CI soak.
RSS_GROWTH_FLOOR = 8 * MIB
IDLE_WS_TARGET = 200 * MIB  # issue 7, point 3
CONNECTIONS = 64
RSS_SAMPLE_S = 2.0

# The mix, in percent of client iterations (a WebSocket session is one iteration).
MIX = (
    ("authorised", 70),
    ("denied", 10),
    ("unauth-page", 5),
    ("unauth-api", 5),
    ("websocket", 10),
)
WS_MESSAGES = 5


# --------------------------------------------------------------------------- options


def parse_duration(text: str) -> float:
    """'600', '600s', '10m', '1.5m' → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: use e.g. 600, 600s or 10m")
    value = float(match.group(1))
    return value * 60 if match.group(2) in ("m", "min") else value


@dataclass(frozen=True)
class Options:
    """What to run; the defaults are the 10-minute soak of issue 7, point 3."""

    duration: float = 600.0
    interval: float | None = None  # None: 60 s, or duration / 6 for soaks under 3 minutes
    connections: int = CONNECTIONS
    baseline: float = 15.0  # seconds of direct-to-upstream load before the soak
    websockets_idle: int = 1000
    idle_hold: float = 5.0  # seconds the idle WebSockets stay open before their RSS is read
    rss_growth_limit: float = RSS_GROWTH_LIMIT
    workers: int = 1  # gateway workers per replica
    keep: bool = False

    @property
    def step(self) -> float:
        if self.interval is not None:
            return self.interval
        return 60.0 if self.duration >= 180 else max(1.0, self.duration / 6)


# --------------------------------------------------------------------------- the generator


class Loadgen:
    """`python -m bench._loadgen` as a subprocess: the plan on stdin, JSON lines on stdout."""

    def __init__(self, plan: Plan) -> None:
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the soak, which then ends this by PID
        )
        self.send(json.dumps(plan.to_json()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def lines(self) -> Iterator[dict[str, Any]]:
        """Each JSON line, until the generator exits; its exit code is checked."""
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        for raw in out:
            yield json.loads(raw)
        if self.proc.wait() != 0:
            raise BenchError(f"the load generator exited with {self.proc.returncode}")

    def next(self, kind: str) -> dict[str, Any]:
        for msg in self.lines():
            if msg["type"] == kind:
                return msg
        raise BenchError(f"the load generator ended before '{kind}'")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


@contextlib.contextmanager
def loadgen(plan: Plan) -> Iterator[Loadgen]:
    gen = Loadgen(plan)
    try:
        yield gen
    finally:
        gen.stop()


# --------------------------------------------------------------------------- RSS


@dataclass(frozen=True)
class Sample:
    """One reading: wall time, each replica's RSS per process and CPU seconds (whole tree), the
    CPU seconds of our other servers (nginx, the upstream) and of the whole machine."""

    wall: float
    rss: tuple[tuple[int, ...], ...]  # per replica, per process (supervisor and workers)
    cpu: tuple[float, ...]  # per replica, utime+stime of the whole tree
    helpers_cpu: float  # nginx + the upstream (the load generator reports its own CPU)
    machine_cpu: float  # all CPUs' busy time (common.machine_busy_seconds)


class Sampler:
    """Reads each replica's RSS and CPU every `every` seconds in a thread."""

    def __init__(
        self, pids: Sequence[int], helpers: Sequence[int] = (), every: float = RSS_SAMPLE_S
    ) -> None:
        self.pids = tuple(pids)
        self.helpers = tuple(helpers)
        self.every = every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def read(self) -> Sample:
        return Sample(
            wall=time.time(),
            rss=tuple(tuple(rss_bytes(pid)) for pid in self.pids),
            cpu=tuple(cpu_seconds(pid) for pid in self.pids),
            helpers_cpu=sum(cpu_seconds(pid) for pid in self.helpers),
            machine_cpu=machine_busy_seconds(),
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.read())


# --------------------------------------------------------------------------- results


@dataclass
class ClassResult:
    """One traffic class over one interval (or the whole run)."""

    ok: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, data: dict[str, Any]) -> None:
        self.ok += int(data["ok"])
        merge(self.hist, {int(b): int(n) for b, n in data["hist"].items()})
        for kind, n in data["errors"].items():
            self.errors[kind] = self.errors.get(kind, 0) + int(n)

    def absorb(self, other: ClassResult) -> None:
        self.ok += other.ok
        merge(self.hist, other.hist)
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def p(self, q: float) -> float | None:
        return percentile(self.hist, q)


@dataclass
class Interval:
    """One reporting interval of a run: its classes, the replicas' RSS and CPU, the generator."""

    index: int
    seconds: float
    loadgen_cpu_s: float
    ws_messages: int
    classes: dict[str, ClassResult]
    rss: list[int] = field(default_factory=list)  # per replica: median of the interval's samples
    rss_max: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)  # per replica
    cpu_s: list[float] = field(default_factory=list)  # per replica
    helpers_cpu_s: float = 0.0  # nginx and the upstream
    machine_cpu_s: float = 0.0  # every process on the machine (other sessions too)

    @property
    def other_cpus(self) -> float:
        """CPUs used by processes that are not ours: Redis and PostgreSQL (partly our load),
        and anything else running on a shared machine."""
        ours = sum(self.cpu_s) + self.helpers_cpu_s + self.loadgen_cpu_s
        return max(0.0, self.machine_cpu_s - ours) / self.seconds if self.seconds else 0.0

    @property
    def requests(self) -> int:
        """Completed HTTP requests and WebSocket handshakes (messages are counted apart)."""
        return sum(
            c.ok + c.error_count for name, c in self.classes.items() if not name.endswith(":msg")
        )

    @property
    def errors(self) -> int:
        return sum(c.error_count for c in self.classes.values())

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class RunResult:
    """A whole load run: its intervals, the classes over all of it, the errors seen."""

    intervals: list[Interval]
    error_samples: list[dict[str, Any]]
    started_wall: float

    def total(self, name: str) -> ClassResult:
        out = ClassResult()
        for iv in self.intervals:
            if name in iv.classes:
                out.absorb(iv.classes[name])
        return out

    @property
    def class_names(self) -> list[str]:
        """The classes seen, in the mix's order (a WebSocket class as its :open and :msg)."""
        order = [n + part for n, _ in MIX for part in ("", ":open", ":msg")]
        seen = {n for iv in self.intervals for n in iv.classes}
        rank = {n: i for i, n in enumerate(order)}
        return sorted(seen, key=lambda n: (rank.get(n, len(order)), n))

    @property
    def errors(self) -> int:
        return sum(iv.errors for iv in self.intervals)

    @property
    def seconds(self) -> float:
        return sum(iv.seconds for iv in self.intervals)

    @property
    def requests(self) -> int:
        return sum(iv.requests for iv in self.intervals)


def run_load(plan: Plan, pids: Sequence[int] = (), helpers: Sequence[int] = ()) -> RunResult:
    """Run the generator with `plan`; sample the replicas `pids` (and the CPU of our `helpers`
    processes and of the machine) meanwhile."""
    intervals: list[Interval] = []
    samples: list[dict[str, Any]] = []
    started = time.time()
    with loadgen(plan) as gen, Sampler(pids, helpers) as sampler:
        for msg in gen.lines():
            if msg["type"] == "start":
                started = float(msg["wall"])
            elif msg["type"] == "interval":
                classes: dict[str, ClassResult] = {}
                for name, data in msg["classes"].items():
                    classes.setdefault(name, ClassResult()).add(data)
                iv = Interval(
                    index=int(msg["index"]),
                    seconds=float(msg["seconds"]),
                    loadgen_cpu_s=float(msg["loadgen_cpu_s"]),
                    ws_messages=int(msg["ws_messages"]),
                    classes=classes,
                )
                intervals.append(iv)
                ws = iv.classes.get("websocket:msg")
                log(
                    f"  {plan.mode} interval {iv.index + 1}: {iv.rps:,.0f} req/s, "
                    f"{iv.errors} errors"
                    + (f", {ws.ok / iv.seconds:,.0f} WebSocket msg/s" if ws else "")
                )
            elif msg["type"] == "done":
                samples = msg["error_samples"]
    _attach_samples(intervals, sampler.samples, started, plan.interval)
    return RunResult(intervals=intervals, error_samples=samples, started_wall=started)


def _attach_samples(
    intervals: list[Interval], samples: list[Sample], started: float, step: float
) -> None:
    """Each interval gets the median RSS (and the peak) of the samples taken in it, and the CPU
    used between the samples nearest its start and its end, scaled to the interval's length."""
    if not samples or not samples[0].rss:
        return
    for iv in intervals:
        lo = started + iv.index * step
        hi = lo + iv.seconds
        inside = [s for s in samples if lo <= s.wall <= hi] or [
            min(samples, key=lambda s: abs(s.wall - hi))
        ]
        first = min(samples, key=lambda s: abs(s.wall - lo))
        last = min(samples, key=lambda s: abs(s.wall - hi))
        span = last.wall - first.wall
        scale = iv.seconds / span if span > 0 else 0.0
        for r in range(len(inside[0].rss)):
            totals = sorted(sum(s.rss[r]) for s in inside)
            iv.rss.append(totals[(len(totals) - 1) // 2])
            iv.rss_max.append(totals[-1])
            iv.processes.append(len(inside[-1].rss[r]))
            iv.cpu_s.append((last.cpu[r] - first.cpu[r]) * scale)
        iv.helpers_cpu_s = (last.helpers_cpu - first.helpers_cpu) * scale
        iv.machine_cpu_s = (last.machine_cpu - first.machine_cpu) * scale


# --------------------------------------------------------------------------- RSS verdict


@dataclass(frozen=True)
class Flatness:
    """One replica's RSS trend: second interval vs last one, and the least-squares slope."""

    replica: int
    reference: int  # bytes, interval 2
    last: int  # bytes, last full interval
    slope_mib_per_min: float  # intervals 2…N
    late_slope_mib_per_min: float  # the second half only: ~0 once caches are warm, not for a leak
    limit: float

    @property
    def growth(self) -> float:
        return (self.last - self.reference) / self.reference if self.reference else 0.0

    @property
    def flat(self) -> bool:
        if self.reference <= 0 or self.last <= 0:
            return False  # a replica that was not there cannot be judged flat
        return self.growth <= self.limit or self.last - self.reference <= RSS_GROWTH_FLOOR


def flatness(result: RunResult, step: float, limit: float) -> list[Flatness] | None:
    """Per replica; None when the run has fewer than 3 full intervals (nothing to judge)."""
    full = [iv for iv in result.intervals if iv.rss and iv.seconds >= step * 0.9]
    if len(full) < 3:
        return None
    ref, last = full[1], full[-1]
    out = []
    for r in range(len(ref.rss)):
        points = [(iv.index * step / 60, iv.rss[r] / MIB) for iv in full[1:]]
        late = points[len(points) // 2 :] if len(points) >= 4 else points
        out.append(Flatness(r, ref.rss[r], last.rss[r], _slope(points), _slope(late), limit))
    return out


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


# --------------------------------------------------------------------------- idle WebSockets


@dataclass
class IdleResult:
    """1,000 idle WebSockets on one replica: how many opened, answered, closed; its RSS."""

    count: int
    opened: int = 0
    open_errors: dict[str, int] = field(default_factory=dict)
    open_seconds: float = 0.0
    echoed: int = 0
    echo_errors: dict[str, int] = field(default_factory=dict)
    close_codes: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_open: int = 0  # the peak while all are open
    rss_after: int = 0
    processes: int = 0

    @property
    def closed_clean(self) -> int:
        return self.close_codes.get("1000", 0)

    @property
    def ok(self) -> bool:
        return (
            self.opened == self.count
            and self.echoed == self.count
            and self.closed_clean == self.count
            and self.rss_open < IDLE_WS_TARGET
        )


def idle_websockets(plan: Plan, pid: int, hold: float) -> IdleResult:
    """Open `plan.count` WebSockets on the replica at `plan.base` (PID `pid`), read its RSS
    while they are open and idle, prove each alive with one echo, close them, read it again."""
    result = IdleResult(count=plan.count)
    result.rss_before = sum(rss_bytes(pid))
    with loadgen(plan) as gen:
        opened = gen.next("opened")
        result.opened, result.open_errors = int(opened["ok"]), opened["errors"]
        result.open_seconds = float(opened["seconds"])
        log(
            f"  {result.opened} WebSockets open on one replica in {result.open_seconds:.1f} s; "
            f"holding them idle for {hold:g} s"
        )
        peak = 0
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            peak = max(peak, sum(rss_bytes(pid)))
            time.sleep(0.25)
        gen.send("check")
        checked = gen.next("checked")
        result.echoed, result.echo_errors = int(checked["ok"]), checked["errors"]
        result.rss_open = max(peak, sum(rss_bytes(pid)))
        result.processes = len(rss_bytes(pid))
        gen.send("close")
        closed = gen.next("closed")
        result.close_codes = closed["codes"]
        for _ in gen.lines():  # let it exit cleanly
            pass
    time.sleep(1.0)  # the replica releases the relays' buffers after the close handshakes
    result.rss_after = sum(rss_bytes(pid))
    return result


# --------------------------------------------------------------------------- the cluster


# Who does what in the mix: staff (group `staff`) may use /staff; a contractor may not.
STAFF_USERS = ("suzuki", "tanaka")
OUTSIDER = "sato"
AUTHORISED_PATH = "/staff/soak?page=1"
WS_PATH = "/app/_up/ws"
UNAUTH_PATH = "/app/soak"


def cookie_header(client: Any) -> str:
    """The Cookie header a browser would send to the public origin's `/` paths."""
    return "; ".join(
        f"{c.name}={c.value}" for c in client.cookies.jar if c.path == "/" and c.value is not None
    )


def mix_classes(staff: Sequence[str], outsider: str) -> tuple[TrafficClass, ...]:
    """The traffic classes with their expected answers (MIX gives the weights)."""
    weights = dict(MIX)
    navigate = (("Accept", "text/html,application/xhtml+xml"), ("Sec-Fetch-Mode", "navigate"))
    return (
        TrafficClass("authorised", weights["authorised"], AUTHORISED_PATH, cookies=tuple(staff)),
        TrafficClass(
            "denied", weights["denied"], AUTHORISED_PATH, expect=(403,), cookies=(outsider,)
        ),
        TrafficClass(
            "unauth-page",
            weights["unauth-page"],
            UNAUTH_PATH,
            expect=(302,),
            headers=navigate,
            location="/.tabiji/login?rd=",
        ),
        TrafficClass(
            "unauth-api",
            weights["unauth-api"],
            UNAUTH_PATH,
            expect=(401,),
            headers=(("Accept", "application/json"), ("Sec-Fetch-Mode", "cors")),
        ),
        TrafficClass(
            "websocket",
            weights["websocket"],
            WS_PATH,
            kind="ws",
            cookies=tuple(staff),
            messages=WS_MESSAGES,
        ),
    )


MIX_TEXT = (
    "authorised 70% (GET /staff/… as staff, signed in: 200), denied 10% (the same as a signed-in "
    "contractor without group staff: 403), unauthenticated 10% (no cookie: 5% a page navigation "
    "→ 302 to /.tabiji/login, 5% an API call → 401 JSON), WebSocket 10% (signed in: handshake "
    f"101 through nginx, {WS_MESSAGES} echoed messages, close 1000)"
)


@dataclass
class SoakReport:
    """Everything `python -m bench soak` measured."""

    options: dict[str, Any]
    machine: dict[str, Any]
    cluster: dict[str, Any] = field(default_factory=dict)
    baseline: RunResult | None = None
    soak: RunResult | None = None
    flat: list[Flatness] | None = None
    idle: IdleResult | None = None
    rss_start: list[int] = field(default_factory=list)
    died: list[int] = field(default_factory=list)  # replicas that exited during the run
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.soak.errors if self.soak else 0

    @property
    def rss_flat(self) -> bool:
        return self.flat is None or all(f.flat for f in self.flat)

    @property
    def ok(self) -> bool:
        idle_ok = self.idle is None or self.idle.ok
        return self.errors == 0 and self.rss_flat and idle_ok and not self.died


def _preflight(classes: Sequence[TrafficClass], base: str, host: str) -> None:
    """One request per HTTP class through nginx: a wrong expectation fails in a second, not
    after ten minutes of errors."""
    import httpx

    for c in classes:
        if c.kind != "http":
            continue
        headers = {"Host": host, **dict(c.headers)}
        if c.cookies:
            headers["Cookie"] = c.cookies[0]
        response = httpx.get(base + c.path, headers=headers, timeout=10)
        if response.status_code not in c.expect:
            raise BenchError(
                f"preflight: {c.name} GET {c.path} answered {response.status_code}, want "
                f"{c.expect}: {response.text[:300]}"
            )


def _helper_pids(cluster: Any) -> list[int]:
    """nginx, and the test upstream (a child of this process: found by its script's name)."""
    pids = [cluster.nginx_pid]
    for st in process_tree(os.getpid()):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{st.pid}/cmdline").read_bytes()
            if b"upstream_app.py" in cmdline:
                pids.append(st.pid)
    return pids


def run(options: Options) -> SoakReport:
    """Start the cluster, sign in, measure the baseline, soak, hold idle WebSockets; return it
    all. Raises ClusterUnavailable (bench.cluster) when Redis/PostgreSQL/nginx/node are missing."""
    from bench.cluster import Cluster, ClusterSpec

    report = SoakReport(
        options={**asdict(options), "interval": options.step}, machine=machine_info()
    )
    spec = ClusterSpec(
        replicas=2,
        workers=options.workers,
        log_level="warning",  # info would log every refused request: disk I/O, not the gateway
        keep_workdir=options.keep,
    )
    log("starting the cluster: 2 replicas, nginx, Redis, PostgreSQL, the IdP, the upstream")
    with Cluster(spec) as cluster:
        report.cluster = cluster.summary()
        host = cluster.public_host
        cookies: dict[str, str] = {}
        for user in (*STAFF_USERS, OUTSIDER):
            client = cluster.login(user)  # through nginx and the real provider, as a browser
            cookies[user] = cookie_header(client)
            client.close()
        classes = mix_classes([cookies[u] for u in STAFF_USERS], cookies[OUTSIDER])
        _preflight(classes, cluster.lb_url, host)
        pids = [r.pid for r in cluster.replicas]
        report.rss_start = [sum(rss_bytes(pid)) for pid in pids]
        if options.baseline > 0:
            log(f"baseline: authorised GETs straight to the upstream, {options.baseline:g} s")
            direct = Plan(
                mode="mix",
                base=cluster.upstream_url,
                host=cluster.upstream_url.removeprefix("http://"),
                classes=(classes[0],),
                connections=options.connections,
                duration=options.baseline,
                interval=options.baseline,
            )
            report.baseline = run_load(direct)
        if options.duration > 0:
            log(
                f"soak: {options.duration:g} s at c={options.connections} through nginx; mix: "
                + MIX_TEXT
            )
            plan = Plan(
                mode="mix",
                base=cluster.lb_url,
                host=host,
                classes=classes,
                connections=options.connections,
                duration=options.duration,
                interval=options.step,
            )
            report.soak = run_load(plan, pids, _helper_pids(cluster))
            report.flat = flatness(report.soak, options.step, options.rss_growth_limit)
            for r in cluster.replicas:
                if not r.alive():
                    report.died.append(r.index)
                    report.notes.append(f"replica {r.index} died during the soak:\n{r.log()}")
        if options.websockets_idle > 0:
            replica = cluster.replicas[0]
            log(f"{options.websockets_idle} idle WebSockets on replica 0 ({replica.url})")
            idle = Plan(
                mode="idle-ws",
                base=replica.url,
                host=host,
                count=options.websockets_idle,
                path=WS_PATH,
                cookie=cookies[STAFF_USERS[0]],
            )
            report.idle = idle_websockets(idle, replica.pid, options.idle_hold)
    return report


# --------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return fmt(value, 1)


def _latency_table(result: RunResult) -> str:
    names = result.class_names
    headers = ["min" if result.intervals and result.intervals[0].seconds >= 60 else "interval"]
    for n in names:
        headers += [f"{n} p50", "p99"]
    rows = []
    for iv in result.intervals:
        row = [str(iv.index + 1)]
        for n in names:
            c = iv.classes.get(n, ClassResult())
            row += [_ms(c.p(50)), _ms(c.p(99))]
        rows.append(row)
    total = ["all"]
    for n in names:
        c = result.total(n)
        total += [_ms(c.p(50)), _ms(c.p(99))]
    rows.append(total)
    return table(headers, rows)


def _load_table(result: RunResult) -> str:
    replicas = max((len(iv.rss) for iv in result.intervals), default=0)
    headers = ["interval", "req/s", "ws msg/s", "errors"]
    for r in range(replicas):
        headers += [f"RSS r{r} MiB", f"CPU r{r}"]
    headers += ["loadgen CPU", "other CPU"]
    rows = []
    for iv in result.intervals:
        ws = iv.classes.get("websocket:msg", ClassResult()).ok
        row = [str(iv.index + 1), fmt(iv.rps), fmt(ws / iv.seconds if iv.seconds else 0)]
        row.append(str(iv.errors))
        for r in range(replicas):
            if r < len(iv.rss):
                procs = f" ({iv.processes[r]}p)" if iv.processes[r] > 1 else ""
                cpu = iv.cpu_s[r] / iv.seconds if iv.seconds else 0.0
                row += [fmt(iv.rss[r] / MIB, 1) + procs, fmt(cpu, 2)]
            else:
                row += ["-", "-"]
        row.append(fmt(iv.loadgen_cpu_s / iv.seconds if iv.seconds else 0.0, 2))
        row.append(fmt(iv.other_cpus, 2))
        rows.append(row)
    return table(headers, rows)


def _errors_text(result: RunResult) -> list[str]:
    out = []
    for name in result.class_names:
        c = result.total(name)
        if c.errors:
            kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(c.errors.items()))
            out.append(f"  {name}: {kinds}")
    if result.error_samples:
        out.append("  first unexpected answers:")
        out += [f"    {s['class']} {s['kind']}: {s['detail'][:200]}" for s in result.error_samples]
    return out


def render(report: SoakReport) -> str:
    """The human-readable report."""
    o = report.options
    m = report.machine
    out = [
        f"soak: 2 replicas × {o['workers']} worker(s) behind nginx round-robin, Redis + "
        f"PostgreSQL shared; c={o['connections']}, {o['duration']:g} s, "
        f"interval {o['interval']:g} s; {m['cpus']} CPUs, load average at start {m['load_avg']}",
        f"mix: {MIX_TEXT}",
    ]
    base = report.baseline
    if base is not None and base.intervals:
        b = base.total("authorised")
        out += [
            "",
            f"baseline (the same authorised GET straight to the upstream, c={o['connections']}, "
            f"{base.seconds:g} s): {base.requests / base.seconds:,.0f} req/s, p50 "
            f"{_ms(b.p(50))} ms, p99 {_ms(b.p(99))} ms, errors {base.errors}, load generator "
            f"{_cpu_per_req(base):.0f} µs CPU per request",
        ]
    soak = report.soak
    if soak is not None and soak.intervals:
        out += [
            "",
            "latency per interval and traffic class, ms (websocket:open = the handshake, "
            "websocket:msg = one echo round trip):",
            _latency_table(soak),
            "",
            "load, errors, each replica's RSS (median of 2 s samples; (Np) = N processes) and "
            "CPU (in CPUs), the load generator's CPU, and other CPU (Redis, PostgreSQL and "
            f"whatever else runs on the machine; above {NOISY_LOAD * 2:g} CPUs the latencies "
            "are noisy):",
            _load_table(soak),
            "",
            f"total: {soak.requests:,} requests + WebSocket handshakes in {soak.seconds:g} s "
            f"({soak.requests / soak.seconds:,.0f}/s), "
            f"{soak.total('websocket:msg').ok:,} WebSocket messages, "
            f"{soak.errors} unexpected answers; the replicas spent "
            f"{_replica_cpu_per_req(soak):.0f} µs of CPU per request (WebSocket messages included)",
        ]
        out += _errors_text(soak)
        if base is not None and base.intervals:
            a, b = soak.total("authorised"), base.total("authorised")
            ratio = [
                (x / y if x is not None and y else None)
                for x, y in ((a.p(50), b.p(50)), (a.p(99), b.p(99)))
            ]
            out.append(
                f"authorised through nginx + gateway vs direct: p50 ×{fmt(ratio[0], 1)}, "
                f"p99 ×{fmt(ratio[1], 1)}; req/s (all classes) "
                f"×{soak.requests / soak.seconds / (base.requests / base.seconds):.2f} of direct"
            )
        out += ["", *_flat_text(report)]
    if report.idle is not None:
        out += ["", *_idle_text(report.idle)]
    out += ["", f"verdict: {'ok' if report.ok else 'FAILED'}" + _why(report)]
    if report.notes:
        out += ["", "notes:", *(f"  - {n}" for n in report.notes)]
    return "\n".join(out)


def _replica_cpu_per_req(result: RunResult) -> float:
    """The replicas' CPU over the run per request: on a busy machine the steadiest figure."""
    cpu = sum(sum(iv.cpu_s) for iv in result.intervals)
    return cpu / result.requests * 1e6 if result.requests else 0.0


def _cpu_per_req(result: RunResult) -> float:
    cpu = sum(iv.loadgen_cpu_s for iv in result.intervals)
    return cpu / result.requests * 1e6 if result.requests else 0.0


def _flat_text(report: SoakReport) -> list[str]:
    limit = report.options["rss_growth_limit"]
    rule = (
        f"RSS flat: each replica's RSS in the last interval ≤ its RSS in the second interval "
        f"+{limit:.0%} (or + {RSS_GROWTH_FLOOR // MIB} MiB); the first interval is warm-up"
    )
    if report.flat is None:
        return [rule, "  not judged: fewer than 3 full intervals"]
    out = [rule]
    for f in report.flat:
        out.append(
            f"  replica {f.replica}: {f.reference / MIB:.1f} → {f.last / MIB:.1f} MiB "
            f"({f.growth:+.1%}), slope {f.slope_mib_per_min:+.2f} MiB/min "
            f"(second half {f.late_slope_mib_per_min:+.2f}): " + ("flat" if f.flat else "GROWING")
        )
    return out


def _idle_text(idle: IdleResult) -> list[str]:
    per = (idle.rss_open - idle.rss_before) / idle.opened / 1024 if idle.opened else 0.0
    return [
        f"idle WebSockets on one replica: {idle.opened}/{idle.count} opened in "
        f"{idle.open_seconds:.1f} s (errors {idle.open_errors or 'none'}), "
        f"{idle.echoed} answered an echo (errors {idle.echo_errors or 'none'}), "
        f"closed {idle.close_codes}",
        f"  replica RSS: {idle.rss_before / MIB:.1f} MiB before, {idle.rss_open / MIB:.1f} MiB "
        f"with them open (≈{per:.0f} KiB each), {idle.rss_after / MIB:.1f} MiB after closing; "
        f"target < {IDLE_WS_TARGET // MIB} MiB: "
        + ("ok" if idle.rss_open < IDLE_WS_TARGET else "MISSED"),
    ]


def _why(report: SoakReport) -> str:
    reasons = []
    if report.errors:
        reasons.append(f"{report.errors} unexpected answers")
    if not report.rss_flat:
        reasons.append("RSS grew beyond the limit")
    if report.died:
        reasons.append(f"replica(s) {report.died} died")
    if report.idle is not None and not report.idle.ok:
        reasons.append("the idle WebSockets missed their target")
    return f" ({'; '.join(reasons)})" if reasons else ""


def _class_json(c: ClassResult) -> dict[str, Any]:
    return {"ok": c.ok, "p50_ms": c.p(50), "p99_ms": c.p(99), "errors": c.errors}


def _run_json(result: RunResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "seconds": result.seconds,
        "requests": result.requests,
        "errors": result.errors,
        "error_samples": result.error_samples,
        "classes": {n: _class_json(result.total(n)) for n in result.class_names},
        "intervals": [
            {
                "index": iv.index,
                "seconds": iv.seconds,
                "rps": iv.rps,
                "errors": iv.errors,
                "rss_bytes": iv.rss,
                "rss_max_bytes": iv.rss_max,
                "processes": iv.processes,
                "cpu_s": iv.cpu_s,
                "loadgen_cpu_s": iv.loadgen_cpu_s,
                "helpers_cpu_s": iv.helpers_cpu_s,
                "machine_cpu_s": iv.machine_cpu_s,
                "other_cpus": iv.other_cpus,
                "classes": {n: _class_json(c) for n, c in iv.classes.items()},
            }
            for iv in result.intervals
        ],
    }


def to_json(report: SoakReport) -> dict[str, Any]:
    """The machine-readable report (`--json`)."""
    return {
        "bench": "soak",
        "options": report.options,
        "machine": report.machine,
        "cluster": report.cluster,
        "mix": MIX_TEXT,
        "baseline": _run_json(report.baseline),
        "soak": _run_json(report.soak),
        "replica_cpu_us_per_request": _replica_cpu_per_req(report.soak) if report.soak else None,
        "rss_start_bytes": report.rss_start,
        "rss_flat": None
        if report.flat is None
        else [{**asdict(f), "growth": f.growth, "flat": f.flat} for f in report.flat],
        "idle_websockets": None if report.idle is None else asdict(report.idle),
        "ok": report.ok,
        "notes": report.notes,
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="Mixed traffic (authorised, denied, unauthenticated, WebSocket) at c=64 "
        "against 2 gateway replicas behind nginx on the shared Redis and PostgreSQL: latency "
        "per class, errors and each replica's RSS per interval, a direct-to-upstream baseline, "
        "then 1,000 idle WebSockets on one replica. Exit 1 on any unexpected answer, RSS growth "
        "beyond the limit, or idle WebSockets over 200 MiB.",
    )
    p.add_argument(
        "--duration",
        type=parse_duration,
        default=600.0,
        help="soak length: seconds, or with a unit (600, 600s, 10m; default 10m; 0 = no soak)",
    )
    p.add_argument(
        "--interval",
        type=parse_duration,
        help="reporting interval (default 60 s; duration/6 for soaks under 3 minutes)",
    )
    p.add_argument("--connections", type=int, default=CONNECTIONS, help="concurrency (64)")
    p.add_argument(
        "--baseline",
        type=parse_duration,
        default=15.0,
        help="seconds of authorised GETs straight to the upstream first (15; 0 = none)",
    )
    p.add_argument(
        "--websockets-idle",
        type=int,
        default=1000,
        metavar="N",
        help="then hold N idle WebSockets on one replica and read its RSS (1000; 0 = skip)",
    )
    p.add_argument(
        "--rss-growth",
        type=float,
        default=RSS_GROWTH_LIMIT * 100,
        metavar="PERCENT",
        help="RSS flatness limit in percent, last interval vs the second "
        f"({RSS_GROWTH_LIMIT * 100:.0f})",
    )
    p.add_argument("--workers", type=int, default=1, help="gateway workers per replica (1)")
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table to stderr)")
    p.add_argument("--keep", action="store_true", help="keep the cluster's work dir (logs)")
    args = p.parse_args(argv)
    if args.connections < 1 or args.websockets_idle < 0 or args.workers < 1:
        p.error("--connections and --workers must be at least 1, --websockets-idle at least 0")
    options = Options(
        duration=args.duration,
        interval=args.interval,
        connections=args.connections,
        baseline=args.baseline,
        websockets_idle=args.websockets_idle,
        rss_growth_limit=args.rss_growth / 100,
        workers=args.workers,
        keep=args.keep,
    )
    return options, args


def main(argv: list[str]) -> int:
    """Entry point for `python -m bench soak`: 0 ok, 1 a limit missed, 2 cannot run here."""
    from bench.cluster import ClusterError, ClusterUnavailable

    options, args = parse_args(argv)
    started = time.monotonic()
    with signals_as_interrupt():
        try:
            report = run(options)
        except KeyboardInterrupt:
            log("interrupted: servers stopped")
            return 130
        except ClusterUnavailable as err:
            log(f"cannot run here: {err}")
            return 2
        except (BenchError, ClusterError) as err:
            log(f"error: {err}")
            return 1
    text = render(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(to_json(report), indent=2))
    else:
        print(text)
    log(f"(soak took {time.monotonic() - started:.0f} s)")
    return 0 if report.ok else 1
