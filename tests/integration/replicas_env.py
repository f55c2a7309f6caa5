"""Helpers for the multi-replica tests (test_replicas.py): a bench.cluster.Cluster that skips (or
fails when CI=true) without its real components, devices written to the shared PostgreSQL store,
signed posture reports and DPoP proofs, polling every replica at once, traffic with timestamps,
the audit rows, and the measured numbers (printed, and written as JSON for deploy/replicas).

Test helper only (no tests here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives.asymmetric import ec

from bench.cluster import BEARER_ISSUER, Cluster, ClusterSpec, ClusterUnavailable
from device_agent.report import (
    PostureFacts,
    PostureReport,
    key_thumbprint,
    make_proof,
    public_key_pem,
    sign_report,
)
from gateway.devices.model import NewDevice
from gateway.devices.store_postgres import PostgresDeviceStore

from .audit_env import must_have

API_SUBJECT = "u-api-0001"  # the bearer identity that owns the test devices
REPORT_ENV = "TABIJI_REPLICAS_REPORT"  # a file to write the measured numbers to (JSON)
GOOD = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=True)
BAD = PostureFacts(os="linux", os_version="12", disk_encrypted=False, firewall=True)

MEASURED: dict[str, Any] = {}


def measured(name: str, value: Any) -> None:
    """Keep one measured figure: printed at once (pytest -s) and written out at the end."""
    MEASURED[name] = value
    print(f"[replicas] {name}: {value}", flush=True)
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(MEASURED, indent=2, sort_keys=True), "utf-8")


@contextlib.contextmanager
def cluster_or_skip(spec: ClusterSpec) -> Iterator[Cluster]:
    """The cluster; a missing real component skips the module (fails it when CI=true)."""
    try:
        cluster = Cluster(spec)
        cluster.__enter__()
    except ClusterUnavailable as missing:
        must_have(False, str(missing))
        raise  # unreachable: must_have skips or fails
    try:
        yield cluster
    finally:
        for key in [k for k in _CLIENTS if k[0] == id(cluster)]:
            _CLIENTS.pop(key).close()
        cluster.close()


# -- devices -------------------------------------------------------------------------------------


@dataclass
class Device:
    """A laptop of the bearer identity API_SUBJECT: its id, key and report counter."""

    id: str
    key: ec.EllipticCurvePrivateKey
    counter: int = 1


def put_device(cluster: Cluster, name: str, facts: PostureFacts) -> Device:
    """An approved device with one posture report, written straight into the shared store (as
    an enrolment on some replica would leave it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    device_id = f"dev-{name}-{os.urandom(3).hex()}"

    async def write() -> None:
        store = PostgresDeviceStore(cluster.postgres_url)
        await store.open()
        try:
            await store.add(
                NewDevice(
                    id=device_id,
                    owner_issuer=BEARER_ISSUER,
                    owner_subject=API_SUBJECT,
                    owner_email="api@town.example.jp",
                    key_thumbprint=key_thumbprint(public),
                    public_key_pem=public_key_pem(public),
                    key_storage="software",
                    status="approved",
                    hostname=f"{name}-laptop",
                    serial=os.urandom(4).hex().upper(),
                    created_at=time.time(),
                )
            )
            now = time.time()
            await store.accept_posture(
                device_id,
                counter=1,
                facts=facts,
                reported_at=now,
                received_at=now,
                loopback_port=None,
            )
        finally:
            await store.close()

    asyncio.run(write())
    return Device(device_id, key)


def device_get(cluster: Cluster, device: Device, path: str, replica: int | None) -> httpx.Response:
    """GET `path` as API_SUBJECT with a fresh DPoP proof of `device` (to one replica, or nginx)."""
    proof = make_proof(
        device.key, device_id=device.id, method="GET", url=cluster.url(path), now=time.time()
    )
    headers = {
        "Authorization": f"Bearer {cluster.bearer_token(API_SUBJECT)}",
        "DPoP": proof,
        "Accept": "application/json",
    }
    return kept_client(cluster, replica).get(cluster.url(path), headers=headers)


_CLIENTS: dict[tuple[int, int | None], httpx.Client] = {}


def kept_client(cluster: Cluster, replica: int | None) -> httpx.Client:
    """One kept-alive cookie-less client per replica (a poll measures the gateway, not TCP
    handshakes); closed with the cluster."""
    key = (id(cluster), replica)
    if key not in _CLIENTS:
        _CLIENTS[key] = cluster.client(replica)
    return _CLIENTS[key]


def send_report(
    cluster: Cluster, device: Device, facts: PostureFacts, replica: int
) -> httpx.Response:
    """The agent's next signed posture report, POSTed to one replica."""
    device.counter += 1
    report = PostureReport(
        device_id=device.id,
        audience=cluster.public_url,
        counter=device.counter,
        issued_at=int(time.time()),
        facts=facts,
    )
    with cluster.client(replica) as client:
        return client.post(
            cluster.url("/.tabiji/devices/report"),
            content=sign_report(report, device.key),
            headers={"Content-Type": "application/jwt", "Accept": "application/json"},
        )


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Took:
    """How long until each replica showed the change, from the start of polling: `done` when
    the first showing answer arrived (an upper bound, what the tests assert), `sent` when that
    request left (a lower bound). None: never within the timeout."""

    done: list[float | None]
    sent: list[float | None]

    def all(self) -> bool:
        return all(t is not None for t in self.done)

    def worst(self) -> float:
        return max(t for t in self.done if t is not None)

    def summary(self) -> dict[str, Any]:
        def ms(values: list[float | None]) -> list[int | None]:
            return [None if v is None else round(v * 1000) for v in values]

        return {"ms_answered": ms(self.done), "ms_sent": ms(self.sent)}


def while_polling(
    count: int, request: Callable[[int], bool], action: Callable[[], None], timeout: float = 15.0
) -> list[tuple[float, float] | None]:
    """Poll every replica (a thread each) while `action()` runs, until `request(i)` holds; for
    each replica the wall-clock (time.time()) span of the first request for which it held:
    (sent, answered). The caller compares them with when the change was written."""
    stop_at = time.monotonic() + timeout
    spans: list[tuple[float, float] | None] = [None] * count

    def poll(index: int) -> None:
        while time.monotonic() < stop_at:
            sent = time.time()
            with contextlib.suppress(httpx.HTTPError):
                if request(index):
                    spans[index] = (sent, time.time())
                    return
            time.sleep(0.02)  # resolution enough for a 1 s bound, little load added

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        action()
    finally:
        for thread in threads:
            thread.join(timeout + 5)
    return spans


def since(written: float, spans: list[tuple[float, float] | None]) -> Took:
    """The spans of `while_polling` as seconds after the change was `written` (wall clock)."""
    return Took(
        [None if s is None else s[1] - written for s in spans],
        [None if s is None else max(0.0, s[0] - written) for s in spans],
    )


def feed_written_at(cluster: Cluster, channel: str) -> float:
    """When the newest message of a state-store feed was written: a Redis stream entry id is
    the server's clock in milliseconds (the same machine's clock as ours)."""
    import redis

    client = redis.Redis.from_url(cluster.redis_url)
    try:
        entries = client.xrevrange(f"tabiji:feed:{channel}", count=1)
    finally:
        client.close()
    assert entries, f"nothing was written to the {channel} feed"
    raw = entries[0][0]
    entry_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(entry_id.split("-", 1)[0]) / 1000


def device_revoked_at(cluster: Cluster, device_id: str) -> float:
    """The revocation time the command stored (taken just before its write)."""
    with psycopg.connect(cluster.postgres_url) as conn:
        row = conn.execute("SELECT revoked_at FROM devices WHERE id = %s", (device_id,)).fetchone()
    assert row is not None
    assert row[0] is not None
    return float(row[0])


def until_each(
    count: int,
    request: Callable[[int], bool],
    timeout: float = 10.0,
    started: float | None = None,
) -> Took:
    """Poll every replica at once (a thread each) until `request(i)` holds; times count from
    `started` (a time.monotonic() value; default now)."""
    started = time.monotonic() if started is None else started
    took = Took([None] * count, [None] * count)

    def poll(index: int) -> None:
        while time.monotonic() - started < timeout:
            sent = time.monotonic() - started
            with contextlib.suppress(httpx.HTTPError):
                if request(index):
                    took.done[index] = time.monotonic() - started
                    took.sent[index] = sent
                    return
            time.sleep(0.02)  # resolution enough for a 1 s bound, little load added

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return took


@dataclass
class Seen:
    """One response a client received: its request id, status and when (monotonic)."""

    request_id: str | None
    status: int
    at: float


@dataclass
class Traffic:
    """What the clients of `traffic()` received, and the transport errors they saw."""

    seen: list[Seen] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)

    def ids(self) -> set[str]:
        return {s.request_id for s in self.seen if s.request_id}

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.seen:
            out[s.status] = out.get(s.status, 0) + 1
        return out


@contextlib.contextmanager
def traffic(cluster: Cluster, path: str, threads: int = 6) -> Iterator[Traffic]:
    """Keep `threads` clients sending GET `path` through nginx until the block ends."""
    result = Traffic()
    stop = threading.Event()
    lock = threading.Lock()

    def run(n: int) -> None:
        with cluster.client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    response = client.get(cluster.url(f"{path}/{n}-{i}"))
                except httpx.HTTPError as error:
                    with lock:
                        result.errors.append((time.monotonic(), type(error).__name__))
                    continue
                with lock:
                    result.seen.append(
                        Seen(
                            response.headers.get("x-request-id"),
                            response.status_code,
                            time.monotonic(),
                        )
                    )

    workers = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield result
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)


# -- the audit store -------------------------------------------------------------------------------


def audit_rows(cluster: Cluster, *columns: str) -> list[tuple[Any, ...]]:
    """Every audit record in the shared PostgreSQL store (the columns asked for)."""
    names = ", ".join(columns)
    with psycopg.connect(cluster.postgres_url) as conn:
        return list(conn.execute(f"SELECT {names} FROM audit_records"))  # noqa: S608 -- test-chosen columns


def stored_request_ids(cluster: Cluster) -> set[str]:
    return {str(row[0]) for row in audit_rows(cluster, "request_id") if row[0]}
