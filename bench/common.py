"""Shared bench helpers: servers started/stopped by PID, free ports, nginx configs, wrk, /proc CPU.

Standard library only, and nothing from the project: the bench must run before the gateway exists.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

T = TypeVar("T")


class BenchError(Exception):
    """A setup step failed; the message says what and how to fix it."""


# --------------------------------------------------------------------------- output


def log(msg: str) -> None:
    """Progress goes to stderr so that `--json` output on stdout stays machine-readable."""
    print(msg, file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Render a plain fixed-width table: the first `left` columns left-aligned, the rest right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 0) -> str:
    """Format a number for a table cell; `-` when not measured."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


# --------------------------------------------------------------------------- tools


def ensure_tools(tools: dict[str, str]) -> None:
    """Make sure each executable exists; install the Debian packages when root, else ask.

    `tools` maps executable name to Debian package name.
    """
    missing = {exe: pkg for exe, pkg in tools.items() if shutil.which(exe) is None}
    if not missing:
        return
    pkgs = sorted(set(missing.values()))
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"missing {', '.join(sorted(missing))}: install them with "
            f"`sudo apt-get install -y {' '.join(pkgs)}` and run the bench again"
        )
    log(f"installing {' '.join(pkgs)} with apt-get (policy-rc.d keeps the services stopped)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", *pkgs], env=env, check=False).returncode:
        # A fresh container often has no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", *pkgs], env=env, check=True)
    still = [exe for exe in missing if shutil.which(exe) is None]
    if still:
        raise BenchError(f"apt-get ran but {', '.join(still)} is still missing")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_workdir(prefix: str) -> Path:
    """A temp dir that nginx workers (running as nobody) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    """The few fields of /proc/PID/stat the bench needs."""

    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime
    start_ticks: int  # distinguishes a live process from a reused PID


def _read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state), so field N is rest[N - 3].
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        cpu_ticks=int(rest[11]) + int(rest[12]),
        start_ticks=int(rest[19]),
    )


def _all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _read_stat(int(entry.name))
            if st is not None:
                stats[st.pid] = st
    return stats


def process_tree(root: int) -> list[ProcStat]:
    """`root` and all its live descendants (a supervisor and its workers)."""
    stats = _all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[ProcStat] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        out.append(stats[pid])
        todo.extend(c for c in children.get(pid, []) if c in stats)
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of the process tree under `root`, in seconds (10 ms resolution)."""
    return sum(st.cpu_ticks for st in process_tree(root)) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent in processes since boot (user, nice, system), plus steal.

    irq/softirq time is left out: loopback packet processing lands there, belongs to no process,
    and would otherwise pass for other processes' load. Steal (the hypervisor running someone
    else) is kept: it is noise to flag.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / _CLK_TCK


def rss_bytes(root: int) -> list[int]:
    """Resident set size of each process in the tree under `root`."""
    out: list[int] = []
    for st in process_tree(root):
        with contextlib.suppress(OSError):
            resident = int(Path(f"/proc/{st.pid}/statm").read_text().split()[1])
            out.append(resident * _PAGE)
    return out


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    """A server the bench started; stop() ends it (and any descendants) by PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 8.0) -> None:
        """Signal the root PID, wait, then SIGKILL it and any descendant left behind."""
        # Remember the tree first: once the root is gone its orphans are re-parented.
        tree = [st for st in process_tree(self.pid) if st.pid != self.pid]
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        deadline = time.monotonic() + 3
        for st in tree:
            while _same_process(st) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _same_process(st):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.pid, signal.SIGKILL)


def _same_process(st: ProcStat) -> bool:
    """True while `st.pid` is still the process we saw (not a PID reused by someone else)."""
    now = _read_stat(st.pid)
    return now is not None and now.start_ticks == st.start_ticks


def start_server(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Server:
    """Start `cmd` in its own session: Ctrl-C reaches only the bench, which then stops servers."""
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    return Server(name=name, popen=popen, log_path=log_path, stop_signal=stop_signal)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so the `finally` that stops servers runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- HTTP probing


@dataclass(frozen=True)
class Probe:
    """One plain HTTP GET's outcome."""

    status: int
    body: bytes


def http_get(
    url: str, host: str | None = None, timeout: float = 3.0, headers: Sequence[str] = ()
) -> Probe:
    """GET `url` (optionally with another Host header and "Name: value" headers) without
    following redirects."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url)  # noqa: S310 -- the bench builds only http://127.0.0.1 URLs
    if host:
        req.add_header("Host", host)
    for header in headers:
        name, _, value = header.partition(":")
        req.add_header(name.strip(), value.strip())
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Probe(status=resp.status, body=resp.read())
    except urllib.error.HTTPError as err:
        return Probe(status=err.code, body=err.read())


def wait_until(
    check: Callable[[], bool], timeout: float, server: Server | None = None, what: str = ""
) -> None:
    """Poll `check` until true; fail early if `server` died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise BenchError(
                f"{server.name} exited with code {server.popen.returncode} before {what}; "
                f"last log lines:\n{server.log_tail()}"
            )
        # Refused connections and half-started servers answering garbage both mean "not yet".
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.1)
    tail = f"; last log lines:\n{server.log_tail()}" if server else ""
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def wait_http(
    url: str,
    server: Server,
    *,
    host: str | None = None,
    size: int | None = None,
    timeout: float = 15,
) -> None:
    """Wait until `url` answers 200 (with a body of `size` bytes, when given)."""

    def ok() -> bool:
        probe = http_get(url, host=host, timeout=2)
        return probe.status == 200 and (size is None or len(probe.body) == size)

    wait_until(ok, timeout, server, what=f"{url} to answer 200")


# --------------------------------------------------------------------------- nginx


_NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # Temp paths inside the work dir: the Debian defaults may not exist or be writable.
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
{body}
}}
"""


def render_upstream_conf(workdir: Path, port: int, webroot: Path, workers: int = 1) -> str:
    """nginx serving a fixed 1 KiB body on `/` and 1 MiB on `/1m` from `webroot`."""
    body = f"""\
    open_file_cache max=16;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {webroot};
        default_type application/octet-stream;
        location = / {{ try_files /1k =404; }}
        location = /1m {{ }}
    }}"""
    return _NGINX_COMMON.format(workers=workers, dir=workdir, body=body)


def render_proxy_conf(workdir: Path, port: int, upstream_port: int, workers: int = 2) -> str:
    """nginx as the reference reverse proxy: keep-alive upstream pool, HTTP/1.1 to the upstream."""
    body = f"""\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream like the gateway does: never spill a 1 MiB body to a temp file on disk.
            # 64k body buffers instead of the 4k/8k default: the stronger reference for 1 MiB
            # (about +30% MiB/s here), so the ratio is not flattered by a weak nginx.
            proxy_max_temp_file_size 0;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
        }}
    }}"""
    return _NGINX_COMMON.format(workers=workers, dir=workdir, body=body)


def write_webroot(root: Path) -> None:
    """The upstream's bodies: 1 KiB and 1 MiB of printable bytes, world-readable for nobody."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    root.chmod(0o755)
    pattern = b"tabiji-bench-0123456789abcdef-\n"
    for name, size in (("1k", KIB), ("1m", MIB)):
        path = root / name
        path.write_bytes((pattern * (size // len(pattern) + 1))[:size])
        path.chmod(0o644)


def start_nginx(name: str, workdir: Path, conf: str) -> Server:
    """Start nginx in the foreground (`daemon off;`) with its own prefix dir."""
    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    workdir.chmod(0o755)
    (workdir / "tmp").mkdir(exist_ok=True)
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cmd = [nginx, "-p", str(workdir), "-c", str(conf_path), "-e", str(workdir / "error.log")]
    # SIGQUIT is nginx's graceful stop; the Server falls back to SIGKILL if it hangs.
    return start_server(name, cmd, workdir / "stdout.log", stop_signal=signal.SIGQUIT)


# --------------------------------------------------------------------------- wrk

# wrk's done() hook prints an exact summary (latency in µs) so nothing is parsed from prose.
_WRK_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"errors_connect":%d,' ..
    '"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_us":%d,"p75_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, plus the server-side CPU spent during it."""

    requests: int
    bytes: int
    duration_us: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_status: int
    errors_timeout: int
    p50_us: int
    p75_us: int
    p90_us: int
    p99_us: int
    max_us: int
    mean_us: float
    server_cpu_s: float = 0.0  # the measured server's process tree
    foreign_cpu_s: float = 0.0  # everyone else on the machine: neither wrk nor our servers

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / (self.duration_us / 1e6)

    @property
    def errors(self) -> int:
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
        )

    @property
    def foreign_load(self) -> float:
        """Other processes' CPU during the run, in CPUs (0.5 = half a core): noise to watch."""
        return self.foreign_cpu_s / (self.duration_us / 1e6)

    @property
    def cpu_us_per_req(self) -> float | None:
        return (
            self.server_cpu_s / self.requests * 1e6 if self.requests and self.server_cpu_s else None
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {
            "rps": round(self.rps, 1),
            "mib_s": round(self.mib_s, 1),
            "errors": self.errors,
            "foreign_load_cpus": round(self.foreign_load, 2),
            "cpu_us_per_req": None
            if self.cpu_us_per_req is None
            else round(self.cpu_us_per_req, 1),
        }
        return out


def _lua_script() -> Path:
    path = Path(tempfile.gettempdir()) / f"tabiji-bench-wrk-{os.getpid()}.lua"
    if not path.exists():
        path.write_text(_WRK_LUA)
        atexit.register(path.unlink, missing_ok=True)
    return path


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    host: str | None = None,
    headers: Sequence[str] = (),
    cpu_root: int | None = None,
    other_roots: Sequence[int] = (),
    timeout_s: float = 5.0,
) -> WrkResult:
    """Run wrk once against `url`, measuring CPU around it.

    `cpu_root`'s tree is the server under test; `other_roots` are our other servers (the upstream),
    so that what remains of the machine's busy time is foreign load from other processes.
    """
    cmd = [
        shutil.which("wrk") or "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(_lua_script()),
    ]
    if host:
        cmd += ["-H", f"Host: {host}"]
    for header in headers:  # e.g. "Cookie: tabiji-session=…" for the authenticated case
        cmd += ["-H", header]
    cmd.append(url)
    roots = [r for r in (cpu_root, *other_roots) if r]
    server_before = cpu_seconds(cpu_root) if cpu_root else 0.0
    ours_before = sum(cpu_seconds(r) for r in roots)
    children_before = _children_cpu()
    busy_before = machine_busy_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    except BaseException:
        # Ctrl-C or a hang: end this wrk by its PID, then let the caller clean up the servers.
        proc.kill()
        proc.wait()
        raise
    busy = machine_busy_seconds() - busy_before
    wrk_cpu = _children_cpu() - children_before  # wrk was reaped by communicate()
    server = (cpu_seconds(cpu_root) if cpu_root else 0.0) - server_before
    ours = sum(cpu_seconds(r) for r in roots) - ours_before
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            # Tick granularity (10 ms per process) can make the remainder slightly negative.
            foreign = max(0.0, busy - wrk_cpu - ours)
            return WrkResult(**data, server_cpu_s=server, foreign_cpu_s=foreign)
    raise BenchError(f"wrk failed (exit {proc.returncode}): {err.strip() or out.strip()}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median_run(runs: Sequence[T], key: Callable[[T], float]) -> T:
    """The run whose `key` is the median (lower middle if even): a real run, not a blend of runs."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


# Other processes' CPU (in CPUs) above which a run is flagged as noisy: this machine is shared.
NOISY_LOAD = 0.15


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(values)


# --------------------------------------------------------------------------- Prometheus


def parse_by_label(text: str, metric: str, label: str) -> dict[str, float]:
    """Sum samples of `metric` in Prometheus text format, grouped by the value of `label`."""
    out: dict[str, float] = {}
    needle = f'{label}="'
    for line in text.splitlines():
        if not line.startswith(metric + "{"):
            continue
        labels, _, rest = line[len(metric) + 1 :].partition("}")
        start = labels.find(needle)
        if start < 0:
            continue
        start += len(needle)
        value = labels[start : labels.index('"', start)]
        with contextlib.suppress(ValueError, IndexError):
            out[value] = out.get(value, 0.0) + float(rest.split()[0])
    return out


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare figures across machines."""
    nginx = shutil.which("nginx")
    version = ""
    if nginx:
        done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        version = done.stderr.strip()
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "nginx": version,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
