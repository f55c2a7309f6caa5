"""Browser binding end to end in-process: the device check page, the agent's signed answer
(made here exactly as the agent makes it) and the attested endpoint, on a real SQLite device
registry, state store and session manager.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette

from device_agent.report import PostureFacts, sign_attestation
from gateway import observability
from gateway.decide import PolicyDecider, PolicyHolder
from gateway.devices.binding import ATTEST_NS, DeviceBindingEndpoints, choose_port
from gateway.devices.model import DeviceRecord
from gateway.devices.registry import DeviceRegistry
from gateway.devices.stage import DeviceStage, device_context
from gateway.devices.store_sqlite import SqliteDeviceStore
from gateway.forward import Forwarder, LiveWebSocket, WebSocketRegistry
from gateway.identity.resolve import IdentityResolver
from gateway.identity.sessions import SessionManager
from gateway.pages import Pages
from gateway.peer import TrustedProxies
from gateway.pipeline import Pipeline
from gateway.routing import RouteTable
from gateway.state.sqlite import SqliteStateStore
from gateway.web.catalogue import load_catalogue
from gateway.wire_devices import websocket_closer
from policies.loader import load_policy_dir
from tests.gateway.devices.registry_helpers import Login, new_device
from tests.gateway.factories import make_ctx, make_route, make_upstream

PUBLIC = "gw.example.test"
ORIGIN = f"https://{PUBLIC}"
APP = "app.example.test"
COOKIE = "__Host-tabiji-session"
PORTS = (47801, 47802, 47803)


class Clock:
    """The registry's freshness clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    clock: Clock
    registry: DeviceRegistry
    state: SqliteStateStore
    sessions: SessionManager
    endpoints: DeviceBindingEndpoints
    audit: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def client(
        self, host: str = PUBLIC, cookie: str | None = None, accept: str = "text/html"
    ) -> httpx.AsyncClient:
        app = Starlette(routes=self.endpoints.routes())
        headers = {"accept": accept}
        if cookie is not None:
            headers["cookie"] = f"{COOKIE}={cookie}"
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=f"https://{host}",
            headers=headers,
            follow_redirects=False,
        )

    async def enrol(
        self, *, subject: str = "u-sato", status: str = "approved", port: int | None = 47802
    ) -> tuple[DeviceRecord, ec.EllipticCurvePrivateKey]:
        device, key = new_device(owner_subject=subject, status=status)
        record = await self.registry.add(device)
        if port is not None:
            updated = await self.registry.accept_posture(
                record.id,
                counter=1,
                facts=PostureFacts(os="linux"),
                reported_at=time.time(),
                received_at=time.time(),
                loopback_port=port,
            )
            assert updated is not None
            record = updated
        return record, key

    async def login(self, subject: str = "u-sato") -> tuple[str, str]:
        """A signed-in browser: its main session cookie and the session's hash."""
        cookie, main_hash = await self.sessions.create_main(
            Login(subject=subject), "town", time.time()
        )
        return cookie, main_hash


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    registry = DeviceRegistry(SqliteDeviceStore(tmp_path / "devices.db"), clock=clock)
    await registry.store.open()
    assert await registry.refresh()
    state = SqliteStateStore(tmp_path / "state.db")
    await state.open()
    sessions = SessionManager(state, public_host=PUBLIC, lifetime=3600, idle_timeout=3600)
    audit: list[tuple[str, dict[str, object]]] = []

    def record(action: str, detail: Mapping[str, object]) -> None:
        audit.append((action, dict(detail)))

    endpoints = DeviceBindingEndpoints(
        sessions=sessions,
        store=state,
        registry=registry,
        pages=Pages(load_catalogue()),
        public_origin=ORIGIN,
        loopback_ports=PORTS,
        challenge_ttl=120,
        audit=record,
    )
    yield World(clock, registry, state, sessions, endpoints, audit)
    await sessions.drain()
    await state.close()
    await registry.store.close()


def agent_url(page: str) -> str:
    """The loopback URL the device check page sends the browser on to (its meta refresh)."""
    found = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', page)
    assert found is not None, page
    return html.unescape(found.group(1))


async def start_check(world: World, cookie: str, rd: str = "/reports?year=2024") -> str:
    """Open the device check; returns the challenge the agent is handed."""
    async with world.client(cookie=cookie) as client:
        response = await client.get("/.tabiji/device/check", params={"rd": rd})
    assert response.status_code == 200, response.text
    query = parse_qs(urlsplit(agent_url(response.text)).query)
    assert query["return"] == [f"{ORIGIN}/.tabiji/device/attested"]
    return query["challenge"][0]


def answer(
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    challenge: str,
    *,
    origin: str = ORIGIN,
) -> str:
    """What the agent redirects the browser to: the attested endpoint with its signature."""
    token = sign_attestation(
        key, device_id=device_id, challenge=challenge, origin=origin, now=time.time()
    )
    query = urlencode({"challenge": challenge, "device": device_id, "attestation": token})
    return f"/.tabiji/device/attested?{query}"


async def attest(world: World, cookie: str | None, url: str) -> httpx.Response:
    """The browser following the agent's redirect (refusals read as JSON here)."""
    async with world.client(cookie=cookie, accept="application/json") as client:
        return await client.get(url)


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"])


async def bound_device(world: World, cookie: str) -> str | None:
    identity = await world.sessions.lookup(cookie, PUBLIC, time.time())
    assert identity is not None
    return identity.device_id


# --- the happy path --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_agents_answer_binds_the_device_and_goes_back(world: World) -> None:
    """Check → agent signs → attested: the session is bound and the browser goes back to rd."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    challenge = await start_check(world, cookie)
    response = await attest(world, cookie, answer(key, record.id, challenge))
    assert response.status_code == 302, response.text
    assert response.headers["location"] == f"{ORIGIN}/reports?year=2024"
    assert await bound_device(world, cookie) == record.id
    action, detail = world.audit[-1]
    assert (action, detail["device"]) == ("device.bind", record.id)


@pytest.mark.anyio
async def test_the_page_sends_the_browser_to_the_port_the_agent_reported(world: World) -> None:
    """The agent's last reported loopback port is used; without one, the first configured."""
    cookie, _ = await world.login()
    async with world.client(cookie=cookie) as client:
        page = (await client.get("/.tabiji/device/check")).text
    assert agent_url(page).startswith("http://127.0.0.1:47801/tabiji/attest?")
    await world.enrol(port=47803)
    async with world.client(cookie=cookie) as client:
        page = (await client.get("/.tabiji/device/check")).text
    assert agent_url(page).startswith("http://127.0.0.1:47803/tabiji/attest?")


def test_choose_port_prefers_the_latest_approved_device_on_a_configured_port() -> None:
    """Pending devices and ports outside the configured range are never used."""
    base, _ = new_device()
    made = DeviceRecord(
        id=base.id,
        owner_issuer=base.owner_issuer,
        owner_subject=base.owner_subject,
        key_thumbprint=base.key_thumbprint,
        public_key_pem=base.public_key_pem,
        key_storage="software",
        status="approved",
        created_at=0.0,
    )
    old = made.with_changes(loopback_port=47802, posture_at=10.0)
    new = made.with_changes(loopback_port=47803, posture_at=20.0)
    pending = made.with_changes(loopback_port=47801, posture_at=30.0, status="pending")
    outside = made.with_changes(loopback_port=9999, posture_at=40.0)
    assert choose_port([old, new, pending, outside], PORTS) == 47803
    assert choose_port([pending, outside], PORTS) == 47801


@pytest.mark.anyio
async def test_a_host_session_binds_its_main_session_and_returns_to_its_host(
    world: World,
) -> None:
    """Started on a route host, answered on the public URL: bound for both, back to the host."""
    record, key = await world.enrol()
    cookie, main_hash = await world.login()
    host_cookie = await world.sessions.create_host(main_hash, APP, time.time())
    assert host_cookie is not None
    async with world.client(host=APP, cookie=host_cookie) as client:
        page = (await client.get("/.tabiji/device/check", params={"rd": "/inbox"})).text
    challenge = parse_qs(urlsplit(agent_url(page)).query)["challenge"][0]
    response = await attest(world, cookie, answer(key, record.id, challenge))
    assert response.status_code == 302, response.text
    assert response.headers["location"] == f"https://{APP}/inbox"
    identity = await world.sessions.lookup(host_cookie, APP, time.time())
    assert identity is not None
    assert identity.device_id == record.id


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_without_a_session_the_check_sends_the_browser_to_log_in(world: World) -> None:
    """No session: a relative redirect to this host's login, coming back to rd."""
    async with world.client() as client:
        response = await client.get("/.tabiji/device/check", params={"rd": "/reports"})
    assert response.status_code == 302
    assert response.headers["location"] == "/.tabiji/login?rd=%2Freports"


@pytest.mark.anyio
async def test_a_session_may_make_only_so_many_challenges(world: World) -> None:
    """Each check stores a challenge: past the burst a session gets 429, another session not."""
    looping, _ = await world.login()
    calm, _ = await world.login()
    async with world.client(cookie=looping) as client:
        statuses = [
            (await client.get("/.tabiji/device/check", params={"rd": "/"})).status_code
            for _ in range(12)
        ]
    assert statuses[:10] == [200] * 10
    assert statuses[-1] == 429
    assert await start_check(world, calm)


@pytest.mark.anyio
async def test_a_challenge_is_single_use(world: World) -> None:
    """The same answer a second time is refused: the challenge was taken by the first."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    url = answer(key, record.id, await start_check(world, cookie))
    assert (await attest(world, cookie, url)).status_code == 302
    again = await attest(world, cookie, url)
    assert again.status_code == 400
    assert error_code(again) == "attest-challenge-unknown"


@pytest.mark.anyio
async def test_a_challenge_of_another_session_is_refused(world: World) -> None:
    """A challenge made for one browser's session cannot bind another browser's session."""
    record, key = await world.enrol()
    victim, _ = await world.login()
    attacker, _ = await world.login()
    url = answer(key, record.id, await start_check(world, victim))
    response = await attest(world, attacker, url)
    assert response.status_code == 403
    assert error_code(response) == "attest-wrong-session"
    assert await bound_device(world, attacker) is None


@pytest.mark.anyio
async def test_an_answer_without_a_session_is_refused(world: World) -> None:
    """The answer arriving without the session cookie binds nothing."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    response = await attest(world, None, answer(key, record.id, await start_check(world, cookie)))
    assert response.status_code == 401
    assert error_code(response) == "attest-no-session"


@pytest.mark.anyio
async def test_an_answer_signed_for_another_origin_is_refused(world: World) -> None:
    """The agent signs the gateway origin it enrolled with; another origin's answer is refused."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    challenge = await start_check(world, cookie)
    url = answer(key, record.id, challenge, origin="https://evil.example")
    response = await attest(world, cookie, url)
    assert response.status_code == 403
    assert error_code(response) == "attest-invalid"
    assert world.audit[-1][1]["detail"] == "attest-wrong-origin"
    assert await bound_device(world, cookie) is None


@pytest.mark.anyio
async def test_an_answer_signed_by_another_devices_key_is_refused(world: World) -> None:
    """Naming my device but signing with another device's key fails the signature check."""
    mine, _ = await world.enrol()
    _, other_key = await world.enrol()
    cookie, _ = await world.login()
    response = await attest(
        world, cookie, answer(other_key, mine.id, await start_check(world, cookie))
    )
    assert response.status_code == 403
    assert error_code(response) == "attest-invalid"
    assert world.audit[-1][1]["detail"] == "report-bad-signature"


@pytest.mark.anyio
async def test_an_expired_challenge_is_refused(world: World, tmp_path: Path) -> None:
    """A challenge past its lifetime is gone from the store: refused as unknown."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    world.endpoints.challenge_ttl = 0.2
    challenge = await start_check(world, cookie)
    await asyncio.sleep(0.4)
    assert await world.state.get(ATTEST_NS, challenge) is None
    response = await attest(world, cookie, answer(key, record.id, challenge))
    assert response.status_code == 400
    assert error_code(response) == "attest-challenge-unknown"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "subject", "code"),
    [
        ("approved", "u-suzuki", "device-not-owned"),
        ("pending", "u-sato", "device-not-approved"),
        ("revoked", "u-sato", "device-revoked"),
    ],
)
async def test_only_an_approved_device_of_the_user_is_bound(
    world: World, status: str, subject: str, code: str
) -> None:
    """Another user's device, a pending one or a revoked one is never bound to the session."""
    record, key = await world.enrol(
        subject=subject, status="approved" if status == "revoked" else status
    )
    if status == "revoked":
        await world.registry.revoke(record.id, now=time.time(), actor="it")
    cookie, _ = await world.login()
    response = await attest(world, cookie, answer(key, record.id, await start_check(world, cookie)))
    assert response.status_code == 403
    assert error_code(response) == code
    assert await bound_device(world, cookie) is None


@pytest.mark.anyio
async def test_an_unknown_device_is_refused(world: World) -> None:
    """An answer naming a device the registry does not know binds nothing."""
    _, key = await world.enrol()
    cookie, _ = await world.login()
    response = await attest(
        world, cookie, answer(key, "dev-nobody", await start_check(world, cookie))
    )
    assert response.status_code == 403
    assert error_code(response) == "attest-device-unknown"


@pytest.mark.anyio
async def test_a_malformed_answer_is_refused(world: World) -> None:
    """Missing parameters are refused before anything is looked up."""
    cookie, _ = await world.login()
    response = await attest(world, cookie, "/.tabiji/device/attested?challenge=abc")
    assert response.status_code == 400
    assert error_code(response) == "attest-malformed"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example/x",
        "https://evil.example/x",
        "/\\evil.example",
        "/%2F%2Fevil.example",
        "javascript:alert(1)",
        "/%09/evil.example",
    ],
)
async def test_rd_never_leads_off_the_gateway(world: World, rd: str) -> None:
    """Whatever rd says, the way back is a path on the host the check was opened on."""
    record, key = await world.enrol()
    cookie, _ = await world.login()
    challenge = await start_check(world, cookie, rd=rd)
    response = await attest(world, cookie, answer(key, record.id, challenge))
    assert response.status_code == 302
    assert response.headers["location"] == f"{ORIGIN}/"


@pytest.mark.anyio
async def test_a_forged_host_header_finds_no_session_and_no_way_back(world: World) -> None:
    """Opened under a Host the session does not belong to: no challenge, a relative login."""
    cookie, _ = await world.login()
    async with world.client(host="evil.example", cookie=cookie) as client:
        response = await client.get("/.tabiji/device/check", params={"rd": "/x"})
    assert response.status_code == 302
    assert response.headers["location"] == "/.tabiji/login?rd=%2Fx"
    assert [key async for key, _ in world.state.scan(ATTEST_NS)] == []


# --- the pipeline sends a browser without a binding to the check -------------------------------

DEVICE_POLICY = """\
policies:
  - name: own-device
    allow:
      all:
        - authenticated: true
        - device: {approved: true}
"""


def closed_port() -> int:
    """A port nothing listens on: an allowed request shows as 502 (it was forwarded)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def pipeline(world: World, tmp_path: Path) -> Pipeline:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(DEVICE_POLICY, encoding="utf-8")
    route = make_route(
        make_upstream(port=closed_port()), public=False, policy="own-device", host=APP
    )
    pages = Pages(load_catalogue())
    return Pipeline(
        routes=RouteTable([route]),
        trusted_proxies=TrustedProxies([]),
        decider=PolicyDecider(PolicyHolder(load_policy_dir(policy_dir))),
        forwarder=Forwarder(),
        pages=pages,
        internal_app=Starlette(routes=world.endpoints.routes()),
        stages=observability.Stages(),
        metrics=observability.Metrics(),
        access_log=None,
        identity=IdentityResolver(world.sessions, None),
        devices=DeviceStage(registry=world.registry, replay=world.state, sessions=world.sessions),
    )


async def through(
    pipeline: Pipeline, cookie: str, *, fetch: bool = False, target: bytes = b"/reports?y=1"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request for https://app.example.test through the pipeline, as a browser sends it."""
    path, _, query = target.partition(b"?")
    headers = [(b"host", APP.encode()), (b"cookie", f"{COOKIE}={cookie}".encode())]
    if fetch:
        headers += [(b"sec-fetch-mode", b"cors"), (b"accept", b"application/json")]
    else:
        headers += [(b"sec-fetch-mode", b"navigate"), (b"accept", b"text/html")]
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "path": path.decode(),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "client": ("198.51.100.9", 50000),
        "server": ("127.0.0.1", 443),
        "extensions": {"tabiji.raw_target": target},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await pipeline.forwarder.start()
    try:
        await pipeline.handle_http(scope, receive, send)
    finally:
        await pipeline.forwarder.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def host_cookie(world: World) -> tuple[str, str, str]:
    """A browser signed in at the public URL and handed to the route host: (main cookie, main
    hash, host cookie)."""
    cookie, main_hash = await world.login()
    host = await world.sessions.create_host(main_hash, APP, time.time())
    assert host is not None
    return cookie, main_hash, host


@pytest.mark.anyio
async def test_a_navigation_without_a_binding_goes_to_the_device_check(
    world: World, pipeline: Pipeline
) -> None:
    """A page load refused for device-unenrolled is sent (relative, same host) to the check."""
    _, _, host = await host_cookie(world)
    status, headers, _ = await through(pipeline, host)
    assert status == 302
    assert headers[b"location"] == b"/.tabiji/device/check?rd=%2Freports%3Fy%3D1"


@pytest.mark.anyio
async def test_a_fetch_without_a_binding_gets_the_refusal_not_a_redirect(
    world: World, pipeline: Pipeline
) -> None:
    """A single-page app's fetch gets 403 device-unenrolled in JSON, never a redirect."""
    _, _, host = await host_cookie(world)
    status, _, body = await through(pipeline, host, fetch=True)
    assert status == 403
    assert json.loads(body)["reasons"][0] == "device-unenrolled"


@pytest.mark.anyio
async def test_after_the_check_the_same_navigation_is_allowed(
    world: World, pipeline: Pipeline
) -> None:
    """Once the check bound the device to the session, the page is forwarded (here: 502)."""
    record, key = await world.enrol()
    cookie, _, host = await host_cookie(world)
    async with world.client(host=APP, cookie=host) as client:
        page = (await client.get("/.tabiji/device/check", params={"rd": "/reports?y=1"})).text
    challenge = parse_qs(urlsplit(agent_url(page)).query)["challenge"][0]
    answered = await attest(world, cookie, answer(key, record.id, challenge))
    assert answered.headers["location"] == f"https://{APP}/reports?y=1"
    status, _, body = await through(pipeline, host)
    assert status == 502, body


@pytest.mark.anyio
async def test_a_stale_registry_explains_itself_and_sends_nobody_to_attest(
    world: World, pipeline: Pipeline
) -> None:
    """While the registry cannot refresh, the refusal says so (no pointless device check)."""
    record, _ = await world.enrol()
    _, main_hash, host = await host_cookie(world)
    await world.sessions.bind_device(main_hash, record.id, time.time())
    world.clock.now += 3600  # the follower's last success: an hour ago
    status, _, body = await through(pipeline, host, fetch=True)
    assert status == 403
    assert json.loads(body)["reasons"][0] == "device-registry-stale"
    status, _, _ = await through(pipeline, host)
    assert status == 403


# --- open WebSockets of a changed device are closed ------------------------------------------


def live_socket(device_id: str | None) -> LiveWebSocket:
    ctx = make_ctx()
    if device_id is not None:
        record, _ = new_device(id=device_id)
        ctx = replace(
            ctx,
            device=device_context(
                DeviceRecord(
                    id=record.id,
                    owner_issuer=record.owner_issuer,
                    owner_subject=record.owner_subject,
                    key_thumbprint=record.key_thumbprint,
                    public_key_pem=record.public_key_pem,
                    key_storage="software",
                    status="approved",
                    created_at=0.0,
                )
            ),
        )
    return LiveWebSocket(ctx, None, asyncio.get_running_loop().create_future())


@pytest.mark.anyio
async def test_a_posture_change_closes_that_devices_websockets_only(world: World) -> None:
    """A new posture (or a revocation) closes the device's relays with 4403; a report that
    changes nothing, and other devices' relays, are left alone."""
    record, _ = await world.enrol()
    sockets = WebSocketRegistry()
    mine, other, anonymous = live_socket(record.id), live_socket("dev-other"), live_socket(None)
    for live in (mine, other, anonymous):
        sockets.add(live)
    world.registry.on_change(websocket_closer(sockets))
    same = await world.registry.accept_posture(
        record.id,
        counter=5,
        facts=PostureFacts(os="linux"),
        reported_at=time.time(),
        received_at=time.time(),
        loopback_port=47802,
    )
    assert same is not None
    assert not mine.closing.done()
    await world.registry.accept_posture(
        record.id,
        counter=6,
        facts=PostureFacts(os="linux", disk_encrypted=False),
        reported_at=time.time(),
        received_at=time.time(),
        loopback_port=47802,
    )
    assert mine.closing.result() == (4403, "device-changed")
    assert not other.closing.done()
    assert not anonymous.closing.done()


@pytest.mark.anyio
async def test_a_revocation_closes_the_devices_websockets(world: World) -> None:
    """Revoking a device closes its relays with the reason device-revoked."""
    record, _ = await world.enrol()
    sockets = WebSocketRegistry()
    mine = live_socket(record.id)
    sockets.add(mine)
    world.registry.on_change(websocket_closer(sockets))
    await world.registry.revoke(record.id, now=time.time(), actor="it")
    assert mine.closing.result() == (4403, "device-revoked")
