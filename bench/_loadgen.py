"""`python -m bench._loadgen`: the soak's traffic generator, a separate process driven by a JSON
plan on stdin, reporting JSON lines on stdout. Imports nothing from gateway/ (it is the client).

HTTP goes over a minimal keep-alive HTTP/1.1 client on asyncio streams (about 11 µs of client CPU
per request here, against 54 µs for aiohttp's client: see bench/README.md, "soak"), so that the
generator stays far from being the bottleneck on a small machine; WebSockets use aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import resource
import sys
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

# Latency histograms: bucket b holds latencies in [exp(b/RES), exp((b+1)/RES)) µs, so a
# percentile read back from the bucket's middle is within 1% of the exact value. Histograms
# merge by adding counts: exact across processes and intervals, and small on the wire.
RES = 50
TIMEOUT_S = 10.0
ERROR_SAMPLES = 20  # the first unexpected answers are kept whole enough to diagnose them
MAX_HEAD = 64 * 1024


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TrafficClass:
    """One kind of request in the mix, and the answer it must get.

    `kind` is "http" or "ws". `cookies` are whole Cookie header values: each connection picks one
    (so the load is spread over several signed-in users). An HTTP class expects one status of
    `expect`; with `location` the Location header must contain it. A WebSocket class expects the
    handshake (101), `messages` echoes of what it sent, and a clean close (1000).
    """

    name: str
    weight: int
    path: str
    kind: str = "http"
    expect: tuple[int, ...] = (200,)
    headers: tuple[tuple[str, str], ...] = ()
    cookies: tuple[str, ...] = ()
    location: str | None = None
    messages: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrafficClass:
        return cls(
            name=data["name"],
            weight=int(data["weight"]),
            path=data["path"],
            kind=data.get("kind", "http"),
            expect=tuple(data.get("expect", (200,))),
            headers=tuple((str(k), str(v)) for k, v in data.get("headers", ())),
            cookies=tuple(data.get("cookies", ())),
            location=data.get("location"),
            messages=int(data.get("messages", 0)),
        )


@dataclass(frozen=True)
class Plan:
    """What the generator does.

    mode "mix": `connections` closed-loop clients, each picking a class by weight for every
    request, for `duration` seconds, reporting every `interval` seconds. mode "idle-ws": open
    `count` WebSockets to `path` on `base`, hold them until told on stdin, prove each alive with
    one echo, close them all cleanly.
    """

    mode: str
    base: str  # http://127.0.0.1:PORT: where the TCP connections go
    host: str  # the Host header (a route's host), may differ from `base`
    classes: tuple[TrafficClass, ...] = ()
    connections: int = 64
    duration: float = 60.0
    interval: float = 60.0
    seed: int = 7
    count: int = 0  # idle-ws: how many
    path: str = "/"  # idle-ws: the WebSocket path
    cookie: str = ""  # idle-ws: the Cookie header value

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            mode=data["mode"],
            base=data["base"],
            host=data["host"],
            classes=tuple(TrafficClass.from_json(c) for c in data.get("classes", ())),
            connections=int(data.get("connections", 64)),
            duration=float(data.get("duration", 60.0)),
            interval=float(data.get("interval", 60.0)),
            seed=int(data.get("seed", 7)),
            count=int(data.get("count", 0)),
            path=data.get("path", "/"),
            cookie=data.get("cookie", ""),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- statistics


def bucket(seconds: float) -> int:
    """The histogram bucket of a latency."""
    return int(math.log(max(seconds * 1e6, 1.0)) * RES)


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The q-th percentile (0–100) of a histogram, in milliseconds; None when empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(total * q / 100))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return math.exp((b + 0.5) / RES) / 1000
    raise AssertionError("unreachable: the ranks add up to the total")


def merge(into: dict[int, int], other: dict[int, int]) -> None:
    """Add `other`'s counts to `into`."""
    for b, n in other.items():
        into[b] = into.get(b, 0) + n


@dataclass
class ClassStats:
    """One class over one interval: expected answers (with latencies) and errors by kind."""

    ok: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def record(self, seconds: float) -> None:
        self.ok += 1
        b = bucket(seconds)
        self.hist[b] = self.hist.get(b, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Recorder:
    """Statistics of the current interval, swapped out at each interval's end."""

    def __init__(self) -> None:
        self.current: dict[str, ClassStats] = {}
        self.samples: list[dict[str, Any]] = []

    def of(self, name: str) -> ClassStats:
        stats = self.current.get(name)
        if stats is None:
            stats = self.current[name] = ClassStats()
        return stats

    def unexpected(self, name: str, kind: str, detail: str) -> None:
        self.of(name).error(kind)
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append({"class": name, "kind": kind, "detail": detail[:300]})

    def take(self) -> dict[str, ClassStats]:
        out, self.current = self.current, {}
        return out


def emit(obj: dict[str, Any]) -> None:
    """One JSON line to the soak (stdout is the channel; progress never goes there)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- the HTTP client


class Unexpected(Exception):
    """An answer that is not what the class expects; `kind` names it for the error table."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Answer:
    """What the minimal client read: the status, the headers that matter, the body's size."""

    status: int
    location: str
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened after an error or `Connection: close`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes) -> Answer:
        """Send a complete request head (no body) and read one response."""
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_HEAD
                )
            except OSError as err:
                raise Unexpected("connect", str(err)) from err
        assert self.reader is not None
        try:
            self.writer.write(head)
            return await self._read(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            self.close()
            raise Unexpected("reset", repr(err)) from err
        except (asyncio.LimitOverrunError, ValueError) as err:
            self.close()
            raise Unexpected("protocol", repr(err)) from err

    async def _read(self, reader: asyncio.StreamReader) -> Answer:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = close = False
        location = ""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
            elif name == b"location":
                location = value.strip().decode("latin-1")
        if status in (204, 304) or 100 <= status < 200:
            body = b""
        elif chunked:
            body = await _read_chunked(reader)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body = await reader.read()  # until the server closes: RFC 9112 §6.3 (7)
            close = True
        if close:
            self.close()
        return Answer(status, location, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size + 2))


def request_head(host: str, path: str, headers: tuple[tuple[str, str], ...], cookie: str) -> bytes:
    """A GET request head, built once per class and cookie (never per request)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: tabiji-soak"]
    lines += [f"{k}: {v}" for k, v in headers]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------------- the mix


class Mix:
    """`connections` closed-loop clients over the plan's classes."""

    def __init__(self, plan: Plan, session: Any) -> None:
        self.plan = plan
        self.session = session  # aiohttp.ClientSession, for the WebSocket classes
        split = urlsplit(plan.base)
        self.tcp_host = split.hostname or "127.0.0.1"
        self.tcp_port = split.port or 80
        self.recorder = Recorder()
        self.ws_messages = 0
        self.index = 0  # the interval being recorded
        self.cpu_mark = _cpu()
        self.heads: dict[tuple[str, str], bytes] = {}
        for c in plan.classes:
            for cookie in c.cookies or ("",):
                self.heads[(c.name, cookie)] = request_head(plan.host, c.path, c.headers, cookie)

    async def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.plan.seed * 100_003 + index)
        classes = self.plan.classes
        weights = [c.weight for c in classes]
        conn = Connection(self.tcp_host, self.tcp_port)
        try:
            while time.monotonic() < deadline:
                c = rng.choices(classes, weights)[0]
                # Each client stays one "user" per class, as a browser tab would.
                cookie = c.cookies[index % len(c.cookies)] if c.cookies else ""
                if c.kind == "ws":
                    await self._ws(c, cookie)
                else:
                    await self._http(conn, c, cookie)
        finally:
            conn.close()

    async def _http(self, conn: Connection, c: TrafficClass, cookie: str) -> None:
        head = self.heads[(c.name, cookie)]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                answer = await conn.request(head)
        except TimeoutError:
            conn.close()
            self.recorder.unexpected(c.name, "timeout", f"no answer in {TIMEOUT_S:g} s")
            return
        except Unexpected as err:
            self.recorder.unexpected(c.name, err.kind, err.detail)
            await asyncio.sleep(0.05)  # a refused connection must not spin the loop
            return
        elapsed = time.perf_counter() - started
        if answer.status not in c.expect:
            self.recorder.unexpected(
                c.name, f"status-{answer.status}", answer.body[:200].decode("utf-8", "replace")
            )
        elif c.location is not None and c.location not in answer.location:
            self.recorder.unexpected(c.name, "location", answer.location)
        else:
            self.recorder.of(c.name).record(elapsed)

    async def _ws(self, c: TrafficClass, cookie: str) -> None:
        import aiohttp

        url = self.plan.base + c.path
        headers = {"Host": self.plan.host, "User-Agent": "tabiji-soak"}
        if cookie:
            headers["Cookie"] = cookie
        started = time.perf_counter()
        name_open, name_msg = c.name + ":open", c.name + ":msg"
        try:
            async with asyncio.timeout(TIMEOUT_S):
                ws = await self.session.ws_connect(url, headers=headers, autoclose=False)
        except TimeoutError:
            self.recorder.unexpected(name_open, "timeout", f"no handshake in {TIMEOUT_S:g} s")
            return
        except aiohttp.WSServerHandshakeError as err:
            self.recorder.unexpected(name_open, f"status-{err.status}", err.message)
            return
        except (aiohttp.ClientError, OSError) as err:
            self.recorder.unexpected(name_open, "connect", repr(err))
            await asyncio.sleep(0.05)
            return
        self.recorder.of(name_open).record(time.perf_counter() - started)
        try:
            async with asyncio.timeout(TIMEOUT_S * max(1, c.messages)):
                for i in range(c.messages):
                    payload = f"soak-{i}-{'x' * 64}"
                    sent = time.perf_counter()
                    await ws.send_str(payload)
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT or msg.data != payload:
                        self.recorder.unexpected(name_msg, "ws-echo", f"{msg.type!r} {msg.data!r}")
                        return
                    self.recorder.of(name_msg).record(time.perf_counter() - sent)
                    self.ws_messages += 1
                await ws.close(code=1000)
            # The server's close frame, relayed by the gateway: what a clean end looks like.
            if ws.close_code != 1000:
                self.recorder.unexpected(name_msg, "ws-close", f"close code {ws.close_code}")
        except TimeoutError:
            self.recorder.unexpected(name_msg, "timeout", "the WebSocket exchange stalled")
        except (aiohttp.ClientError, OSError) as err:
            self.recorder.unexpected(name_msg, "reset", repr(err))
        finally:
            if not ws.closed:
                await ws.close()

    async def ticker(self, started: float, deadline: float) -> None:
        """Report each full interval's statistics; `finish` reports the last one."""
        self.cpu_mark = _cpu()
        while started + (self.index + 1) * self.plan.interval < deadline:
            end = started + (self.index + 1) * self.plan.interval
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            self._report(self.plan.interval)

    def finish(self, started: float, deadline: float) -> None:
        """The last interval (it may be short), once every client has stopped: requests still
        in flight at the deadline are counted in it, never lost between reports."""
        self._report(deadline - (started + self.index * self.plan.interval))

    def _report(self, seconds: float) -> None:
        stats = self.recorder.take()
        cpu, self.cpu_mark = self.cpu_mark, _cpu()
        emit(
            {
                "type": "interval",
                "index": self.index,
                "seconds": seconds,
                "loadgen_cpu_s": self.cpu_mark - cpu,
                "ws_messages": self.ws_messages,
                "classes": {
                    name: {
                        "ok": s.ok,
                        "hist": {str(b): n for b, n in s.hist.items()},
                        "errors": s.errors,
                    }
                    for name, s in stats.items()
                },
            }
        )
        self.ws_messages = 0
        self.index += 1


async def run_mix(plan: Plan) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        mix = Mix(plan, session)
        started = time.monotonic()
        deadline = started + plan.duration
        emit({"type": "start", "wall": time.time()})
        ticker = asyncio.create_task(mix.ticker(started, deadline))
        clients = [asyncio.create_task(mix.client(i, deadline)) for i in range(plan.connections)]
        await asyncio.gather(*clients)
        await ticker  # it has reported every full interval before the deadline
        mix.finish(started, deadline)
    emit({"type": "done", "error_samples": mix.recorder.samples})


# --------------------------------------------------------------------------- idle WebSockets


async def _wait_for(word: str) -> None:
    """Block until the soak writes `word` on our stdin (it samples RSS in between)."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise SystemExit("stdin closed before '" + word + "'")
        if line.strip() == word:
            return


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class IdleSockets:
    """`count` WebSockets to one place, opened, proved alive and closed in bulk."""

    def __init__(self, plan: Plan, session: Any) -> None:
        self.plan = plan
        self.session = session
        self.url = plan.base + plan.path
        self.headers = {"Host": plan.host, "User-Agent": "tabiji-soak"}
        if plan.cookie:
            self.headers["Cookie"] = plan.cookie
        self.opened: list[Any] = []
        # A bounded number of handshakes at once: a burst of 1,000 would measure the accept queue.
        self.gate = asyncio.Semaphore(32)

    async def open_one(self, errors: dict[str, int]) -> None:
        import aiohttp

        async with self.gate:
            try:
                async with asyncio.timeout(30):
                    ws = await self.session.ws_connect(
                        self.url, headers=self.headers, autoclose=False, heartbeat=None
                    )
                self.opened.append(ws)
            except aiohttp.WSServerHandshakeError as err:
                _count(errors, f"status-{err.status}")
            except TimeoutError:
                _count(errors, "timeout")
            except (aiohttp.ClientError, OSError) as err:
                _count(errors, type(err).__name__)

    async def echo(self, i: int, ws: Any, errors: dict[str, int]) -> None:
        import aiohttp

        payload = f"idle-{i}"
        try:
            async with asyncio.timeout(30):
                await ws.send_str(payload)
                msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT or msg.data != payload:
                _count(errors, f"echo-{msg.type.name.lower()}")
        except TimeoutError:
            _count(errors, "timeout")
        except (aiohttp.ClientError, OSError) as err:
            _count(errors, type(err).__name__)

    async def close(self, ws: Any, codes: dict[str, int]) -> None:
        """A clean close: our close frame, the server's answer relayed by the gateway."""
        async with self.gate:
            try:
                async with asyncio.timeout(30):
                    await ws.close(code=1000)
                _count(codes, str(ws.close_code))
            except TimeoutError:
                _count(codes, "timeout")


async def run_idle_ws(plan: Plan) -> None:
    """Open `count` WebSockets, hold them until told, prove each alive, close them cleanly."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        idle = IdleSockets(plan, session)
        errors: dict[str, int] = {}
        started = time.monotonic()
        await asyncio.gather(*(idle.open_one(errors) for _ in range(plan.count)))
        seconds = time.monotonic() - started
        emit({"type": "opened", "ok": len(idle.opened), "errors": errors, "seconds": seconds})
        await _wait_for("check")
        errors = {}
        await asyncio.gather(*(idle.echo(i, ws, errors) for i, ws in enumerate(idle.opened)))
        ok = len(idle.opened) - sum(errors.values())
        emit({"type": "checked", "ok": ok, "errors": errors})
        await _wait_for("close")
        codes: dict[str, int] = {}
        started = time.monotonic()
        await asyncio.gather(*(idle.close(ws, codes) for ws in idle.opened))
        emit({"type": "closed", "codes": codes, "seconds": time.monotonic() - started})


# --------------------------------------------------------------------------- entry point


def _raise_nofile() -> None:
    """Up to the hard limit: 1,000 WebSockets and 64 clients need more than 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when available: the client's own overhead stays small and steady."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m bench._loadgen < PLAN.json", file=sys.stderr)
        return 2
    plan = Plan.from_json(json.loads(sys.stdin.readline()))
    _raise_nofile()
    if plan.mode == "mix":
        _run(run_mix(plan))
    elif plan.mode == "idle-ws":
        _run(run_idle_ws(plan))
    else:
        print(f"unknown mode {plan.mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
