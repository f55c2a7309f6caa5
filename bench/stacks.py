"""`python -m bench stacks`: which Python stack should carry the gateway's hot forwarding path?

Evidence, kept runnable: tiny self-contained ASGI proxies (written to a temp dir, served by uvicorn)
against nginx `proxy_pass`, all in front of the same nginx upstream. Imports nothing from gateway/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    KIB,
    NOISY_LOAD,
    BenchError,
    Server,
    WrkResult,
    ensure_tools,
    fmt,
    free_port,
    log,
    machine_info,
    make_workdir,
    median_run,
    render_proxy_conf,
    render_upstream_conf,
    run_wrk,
    signals_as_interrupt,
    start_nginx,
    start_server,
    table,
    wait_http,
    write_webroot,
)

# Shared by every app: the same header hygiene, so only the stack differs.
_PRELUDE = """\
import os

UPSTREAM = os.environ["BENCH_UPSTREAM"]
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
       b"transfer-encoding", b"upgrade", b"host", b"content-length"}


def target(scope):
    path = scope["raw_path"].decode("latin-1") or "/"
    query = scope["query_string"].decode("latin-1")
    return UPSTREAM + path + ("?" + query if query else "")


def request_headers(scope):
    return [(k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"] if k not in HOP]


async def read_body(receive):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def lifespan(receive, send, startup, shutdown):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
"""

RAW_AIOHTTP = (
    _PRELUDE
    + """
import aiohttp

session = None


async def startup():
    global session
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
    )


async def shutdown():
    await session.close()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    async with session.request(scope["method"], target(scope), headers=request_headers(scope),
                               data=body or None, allow_redirects=False) as resp:
        headers = [(k, v) for k, v in resp.raw_headers
                   if k.lower() not in HOP or k.lower() == b"content-length"]
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
"""
)

RAW_HTTPX = (
    _PRELUDE
    + """
import httpx

# Pool at least as large as wrk's connections, so the comparison is not about reconnect churn.
client = httpx.AsyncClient(
    limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
    timeout=httpx.Timeout(30.0, connect=5.0),
)


async def startup():
    pass


async def shutdown():
    await client.aclose()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    request = client.build_request(scope["method"], target(scope),
                                   headers=request_headers(scope), content=body or None)
    resp = await client.send(request, stream=True, follow_redirects=False)
    try:
        headers = [(k, v) for k, v in resp.headers.raw
                   if k.lower() not in HOP or k.lower() == b"content-length"]
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": headers})
        async for chunk in resp.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await resp.aclose()
"""
)

STARLETTE_AIOHTTP = (
    _PRELUDE
    + """
import contextlib

import aiohttp
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.routing import Route

STR_HOP = {h.decode() for h in HOP} - {"content-length"}


@contextlib.asynccontextmanager
async def lifespan_cm(app):
    app.state.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=60),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
    )
    yield
    await app.state.session.close()


async def proxy(request):
    body = await request.body()
    resp = await request.app.state.session.request(
        request.method, target(request.scope), headers=request_headers(request.scope),
        data=body or None, allow_redirects=False)
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in STR_HOP}
    return StreamingResponse(resp.content.iter_any(), status_code=resp.status, headers=headers,
                             background=BackgroundTask(resp.release))


METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
app = Starlette(routes=[Route("/{path:path}", proxy, methods=METHODS)], lifespan=lifespan_cm)
"""
)

# The gateway's own client (gateway/upstream.py); the bench puts the checkout on PYTHONPATH.
RAW_TABIJI_CLIENT = (
    _PRELUDE
    + """
from urllib.parse import urlsplit

from gateway.upstream import UpstreamPool, request_head

_up = urlsplit(UPSTREAM)
pool = UpstreamPool(_up.hostname, _up.port, None)
HOST = _up.netloc


async def startup():
    pass


async def shutdown():
    await pool.close()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send, startup, shutdown)
    body = await read_body(receive)
    path = scope["raw_path"].decode("latin-1") or "/"
    query = scope["query_string"].decode("latin-1")
    headers = [("host", HOST), *request_headers(scope)]
    if body:
        headers.append(("content-length", str(len(body))))
    connection = await pool.acquire(5.0)
    connection.start(request_head(scope["method"], path + ("?" + query if query else ""), headers),
                     expect_body=scope["method"] != "HEAD")
    if body:
        await connection.write(body)
    await connection.read_head(30.0)
    headers = [(k.lower(), v) for k, v in connection.headers
               if k.lower() not in HOP or k.lower() == b"content-length"]
    await send({"type": "http.response.start", "status": connection.status, "headers": headers})
    while chunk := await connection.read_chunk(30.0):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    pool.release(connection)
"""
)

APPS = {
    "raw_tabiji": RAW_TABIJI_CLIENT,
    "raw_aiohttp": RAW_AIOHTTP,
    "raw_httpx": RAW_HTTPX,
    "starlette_aiohttp": STARLETTE_AIOHTTP,
}


@dataclass(frozen=True)
class Stack:
    """One configuration to measure."""

    name: str
    label: str
    app: str | None  # None: nginx proxy_pass
    loop: str = "uvloop"
    workers: int = 1


STACKS = (
    Stack("nginx-1w", "nginx proxy_pass, keep-alive upstream", None, "-", 1),
    Stack("nginx-2w", "nginx proxy_pass, keep-alive upstream", None, "-", 2),
    Stack("raw-tabiji-1w", "raw ASGI + gateway/upstream.py client", "raw_tabiji"),
    Stack("raw-aiohttp-1w", "raw ASGI + aiohttp client", "raw_aiohttp"),
    Stack("raw-httpx-1w", "raw ASGI + httpx", "raw_httpx"),
    Stack("starlette-aiohttp-1w", "Starlette route + aiohttp client", "starlette_aiohttp"),
    Stack("raw-aiohttp-2w", "raw ASGI + aiohttp client", "raw_aiohttp", "uvloop", 2),
    Stack("raw-tabiji-2w", "raw ASGI + gateway/upstream.py client", "raw_tabiji", "uvloop", 2),
    # The TCP_NODELAY trap (uvicorn issue #3149): --workers N on the plain asyncio loop.
    Stack("raw-aiohttp-asyncio-1w", "raw ASGI + aiohttp client", "raw_aiohttp", "asyncio", 1),
    Stack("raw-aiohttp-asyncio-2w", "raw ASGI + aiohttp client", "raw_aiohttp", "asyncio", 2),
)


def _uvicorn_cmd(stack: Stack, appdir: Path, port: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        f"{stack.app}:app",
        "--app-dir",
        str(appdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        stack.loop,
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if stack.workers > 1:
        cmd += ["--workers", str(stack.workers)]
    return cmd


def _start(stack: Stack, work: Path, upstream_port: int) -> tuple[Server, int]:
    port = free_port()
    if stack.app is None:
        conf = render_proxy_conf(work / stack.name, port, upstream_port, workers=stack.workers)
        server = start_nginx(stack.name, work / stack.name, conf)
    else:
        env = {
            **os.environ,
            "BENCH_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
            # The checkout first, for the stack that uses the gateway's own client.
            "PYTHONPATH": os.pathsep.join(
                p
                for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))
                if p
            ),
        }
        cmd = _uvicorn_cmd(stack, work / "apps", port)
        server = start_server(stack.name, cmd, work / f"{stack.name}.log", env=env)
    wait_http(f"http://127.0.0.1:{port}/", server, size=KIB, timeout=30)
    return server, port


def measure(args: argparse.Namespace, stack_list: Sequence[Stack]) -> dict[str, list[WrkResult]]:
    """Start every stack, warm each up, then measure them in interleaved rounds."""
    work = make_workdir("tabiji-stacks-")
    results: dict[str, list[WrkResult]] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        write_webroot(work / "www")
        (work / "apps").mkdir()
        for name, source in APPS.items():
            (work / "apps" / f"{name}.py").write_text(source)
        up_port = free_port()
        conf = render_upstream_conf(work / "upstream", up_port, work / "www", workers=1)
        upstream = start_nginx("nginx upstream", work / "upstream", conf)
        cleanup.callback(upstream.stop)
        wait_http(f"http://127.0.0.1:{up_port}/", upstream, size=KIB)
        # All servers up at once (idle ones cost nothing), runs interleaved round by round, so
        # drift and other processes' load on this shared machine hit every stack alike.
        urls: dict[str, tuple[str, int]] = {}
        for stack in stack_list:
            server, port = _start(stack, work, up_port)
            cleanup.callback(server.stop)
            urls[stack.name] = (f"http://127.0.0.1:{port}/", server.pid)
            run_wrk(urls[stack.name][0], duration=1, connections=args.connections)  # warm-up
        for i in range(args.runs):
            for stack in stack_list:
                url, pid = urls[stack.name]
                r = run_wrk(
                    url,
                    duration=args.duration,
                    connections=args.connections,
                    cpu_root=pid,
                    other_roots=[upstream.pid],
                )
                log(
                    f"  run {i + 1}/{args.runs} {stack.name:<24} {r.rps:>9,.0f} req/s  "
                    f"p50 {r.p50_us / 1000:6.2f} ms  p99 {r.p99_us / 1000:6.2f} ms  "
                    f"errors {r.errors}  other load {r.foreign_load:.2f}"
                )
                results.setdefault(stack.name, []).append(r)
    return results


def render(
    args: argparse.Namespace, stack_list: Sequence[Stack], res: dict[str, list[WrkResult]]
) -> str:
    """One row per stack: median run (req/s, p50/p99, CPU µs/req, ratio) and best run (req/s)."""
    base = res.get("nginx-2w") or res.get("nginx-1w")
    base_med = median_run(base, key=lambda r: r.rps).rps if base else None
    base_best = max(r.rps for r in base) if base else None
    rows = []
    for stack in stack_list:
        runs = res.get(stack.name)
        if not runs:
            continue
        m = median_run(runs, key=lambda r: r.rps)
        best = max(r.rps for r in runs)
        rows.append(
            [
                stack.name,
                stack.label,
                stack.loop,
                str(stack.workers),
                fmt(m.rps),
                fmt(m.p50_us / 1000, 2),
                fmt(m.p99_us / 1000, 2),
                fmt(m.cpu_us_per_req, 0),
                fmt(m.rps / base_med if base_med else None, 3),
                fmt(best),
                fmt(best / base_best if base_best else None, 3),
                str(m.errors),
                fmt(m.foreign_load, 2),
                fmt(max(r.foreign_load for r in runs), 2),
            ]
        )
    base_name = "nginx-2w" if res.get("nginx-2w") else "nginx-1w"
    head = (
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s, 1 KiB body, median of {args.runs} "
        f"run(s); uvicorn --http httptools; ratios vs {base_name} (median/median, best/best)"
    )
    headers = [
        "stack",
        "what",
        "loop",
        "workers",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "vs nginx",
        "best req/s",
        "best vs",
        "errors",
        "other load",
        "max other",
    ]
    out = head + "\n" + table(headers, rows, left=3)
    if any(r.foreign_load > NOISY_LOAD for runs in res.values() for r in runs):
        out += (
            f"\nnote: other processes took more than {NOISY_LOAD} CPUs during some runs (see "
            "'max other'): req/s and latency are noisy; CPU µs/req and best runs suffer less"
        )
    return out


def main(argv: list[str]) -> int:
    """Entry point for `python -m bench stacks`."""
    p = argparse.ArgumentParser(
        prog="python -m bench stacks",
        description="Measure candidate hot-path stacks (uvicorn + ASGI app + upstream client) "
        "against nginx proxy_pass, 1 KiB responses, on 127.0.0.1.",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--runs", type=int, default=3, help="runs per stack; the median is shown (3)")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 s runs, 1 run each")
    p.add_argument(
        "--stack",
        action="append",
        choices=[s.name for s in STACKS],
        help="only this stack (repeatable; default: all)",
    )
    p.add_argument("--json", action="store_true", help="print JSON on stdout, table on stderr")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 2.0, 1
    chosen = [s for s in STACKS if not args.stack or s.name in args.stack]
    try:
        ensure_tools({"nginx": "nginx", "wrk": "wrk"})
    except BenchError as err:
        log(f"error: {err}")
        return 2
    started = time.monotonic()
    with signals_as_interrupt():
        try:
            results = measure(args, chosen)
        except KeyboardInterrupt:
            log("interrupted: servers stopped")
            return 130
        except BenchError as err:
            log(f"error: {err}")
            return 1
    text = render(args, chosen, results)
    if args.json:
        print(text, file=sys.stderr)
        data: dict[str, Any] = {
            "bench": "stacks",
            "machine": machine_info(),
            "results": {k: [r.to_json() for r in v] for k, v in results.items()},
        }
        print(json.dumps(data, indent=2))
    else:
        print(text)
    log(f"(bench took {time.monotonic() - started:.0f} s)")
    return 0
