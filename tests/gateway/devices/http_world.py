"""One gateway's device endpoints over real components, for the HTTP tests of enrolment, reports,
certificates and the IT admin page: a SQLite device store behind the registry, the device CA in
a temporary directory, a SQLite state store, real sessions and CSRF, and policies from YAML.
Requests go through httpx's ASGITransport over https://."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from device_agent.report import sign_enrolment
from gateway.decide import PolicyHolder
from gateway.devices.attestation import AttestationVerifier
from gateway.devices.ca import DeviceCA
from gateway.devices.enrollment import EnrolmentEndpoints, policy_auto_approve
from gateway.devices.fixes import DeviceAdvisor, PolicyTarget
from gateway.devices.intake_http import DeviceApi
from gateway.devices.posture import PostureIntake
from gateway.devices.registry import DeviceRegistry
from gateway.devices.store_sqlite import SqliteDeviceStore
from gateway.identity.csrf import Csrf
from gateway.identity.resolve import IdentityResolver, session_cookie_name
from gateway.identity.sessions import SessionManager
from gateway.pages import Pages
from gateway.state.ratelimit import RateLimiter
from gateway.state.sqlite import SqliteStateStore
from gateway.web.catalogue import load_catalogue
from gateway.web.devices_admin import DevicesAdmin
from gateway.web.endpoints import build_internal_app
from gateway.web.guard import PolicyGuard
from policies.loader import load_policy_dir
from tests.gateway.devices.registry_helpers import Login

HOST = "gw.town.example"
ORIGIN = f"https://{HOST}"
CSRF_SECRET = b"a-test-csrf-secret-of-32-bytes!!"

# staff may use the wiki from an approved device with an encrypted disk and a firewall;
# `trusted` users' devices are approved at once; IT admins use the admin page.
POLICIES = """
policies:
  - name: staff-devices
    allow:
      - name: staff-on-good-device
        all:
          - group: staff
          - device:
              approved: true
              posture: {disk_encrypted: true, firewall: true, max_age: 1h}
  - name: auto-approve
    allow:
      group: trusted
  - name: it-admins
    allow:
      group: it-admins
"""


SATO = Login()
TRUSTED = Login(subject="u-kato", email="kato@town.example", groups=frozenset({"staff", "trusted"}))
ADMIN = Login(
    subject="u-it", email="it@town.example", name="情報 太郎", groups=frozenset({"it-admins"})
)


@dataclass
class Limits:
    """Per-test rate limits (generous unless a test is about them)."""

    enrol: RateLimiter = field(default_factory=lambda: RateLimiter(600, 100))
    poll: RateLimiter = field(default_factory=lambda: RateLimiter(600, 100))
    confirm: RateLimiter = field(default_factory=lambda: RateLimiter(600, 100))
    report_address: RateLimiter = field(default_factory=lambda: RateLimiter(600, 100))
    report_owner: RateLimiter = field(default_factory=lambda: RateLimiter(600, 100))


@dataclass
class World:
    """The device endpoints of one gateway, and what they wrote to the audit trail."""

    app: Starlette
    client: httpx.AsyncClient
    registry: DeviceRegistry
    store: SqliteDeviceStore
    state: SqliteStateStore
    sessions: SessionManager
    ca: DeviceCA
    csrf: Csrf
    holder: PolicyHolder
    origin: str = ORIGIN
    audit: list[tuple[str, dict[str, object], str | None]] = field(default_factory=list)

    @property
    def session_cookie(self) -> str:
        return session_cookie_name(self.origin.startswith("https:"))

    async def login(self, login: Login = SATO) -> dict[str, str]:
        """A browser session for `login`: the Cookie header to send."""
        return {"cookie": f"{self.session_cookie}={await self.session(login)}"}

    async def session(self, login: Login = SATO) -> str:
        """A new session of `login`: its cookie value."""
        cookie_id, _ = await self.sessions.create_main(login, "town", time.time())
        return cookie_id

    def audited(self, action: str) -> list[dict[str, object]]:
        return [detail for done, detail, _ in self.audit if done == action]

    async def enrol(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        now: float | None = None,
        **request: object,
    ) -> httpx.Response:
        """The agent's enrolment request for `key` (hostname, serial, os, key_storage set)."""
        body: dict[str, object] = {
            "hostname": "sato-laptop",
            "serial": "PF3ABC12",
            "os": "linux",
            "key_storage": "software",
        }
        body.update(request)
        token = sign_enrolment(
            key, request=body, audience=self.origin, now=time.time() if now is None else now
        )
        return await self.post_jwt("/.tabiji/devices/enroll", token)

    async def poll(
        self, key: ec.EllipticCurvePrivateKey, enrolment_id: str, **extra: object
    ) -> httpx.Response:
        """The agent's poll, signed by the enrolling key (`credential_answer=…` when it has one)."""
        token = sign_enrolment(
            key,
            request={"enrolment_id": enrolment_id, **extra},
            audience=self.origin,
            now=time.time(),
        )
        return await self.post_jwt("/.tabiji/devices/enroll/poll", token)

    async def post_jwt(self, path: str, token: str, **headers: str) -> httpx.Response:
        return await self.client.post(
            path, content=token, headers={"content-type": "application/jwt", **headers}
        )

    async def confirm_form(self, browser: dict[str, str], code: str) -> dict[str, str]:
        """GET the confirm page and read its form's hidden fields."""
        page = await self.client.get(
            "/.tabiji/devices/confirm", params={"code": code}, headers=browser
        )
        assert page.status_code == 200, page.text
        return hidden_fields(page.text)

    async def confirm(
        self, browser: dict[str, str], form: Mapping[str, str], *, origin: str | None = ""
    ) -> httpx.Response:
        headers = dict(browser)
        if origin is not None:
            headers["origin"] = origin or self.origin
        return await self.client.post("/.tabiji/devices/confirm", data=dict(form), headers=headers)

    async def enrolled(
        self,
        key: ec.EllipticCurvePrivateKey,
        login: Login = SATO,
        **request: object,
    ) -> tuple[str, str]:
        """Enrol `key` and confirm it as `login`: (enrolment id, device id)."""
        answer = (await self.enrol(key, **request)).json()
        browser = await self.login(login)
        form = await self.confirm_form(browser, answer["user_code"])
        done = await self.confirm(browser, form)
        assert done.status_code == 303, done.text
        device_id = parse_qs(urlsplit(done.headers["location"]).query)["device"][0]
        return answer["enrolment_id"], device_id


def hidden_fields(html: str) -> dict[str, str]:
    """name → value of every hidden input of a page (forms of our own templates)."""
    import re

    fields = {}
    for match in re.finditer(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html):
        fields[match.group(1)] = match.group(2).replace("&#34;", '"').replace("&amp;", "&")
    return fields


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path,
    *,
    limits: Limits | None = None,
    code_ttl: float = 900.0,
    policies: str = POLICIES,
    attestation: AttestationVerifier | None = None,
    origin: str = ORIGIN,
) -> AsyncIterator[World]:
    """The endpoints wired as gateway.app would, on fresh stores under `tmp_path`, for the
    gateway at `origin` (https://gw.town.example unless a test serves it for real)."""
    host = origin.split("://", 1)[1]
    limits = limits or Limits()
    (tmp_path / "policies").mkdir(parents=True, exist_ok=True)
    (tmp_path / "policies" / "policies.yaml").write_text(policies, encoding="utf-8")
    holder = PolicyHolder(load_policy_dir(tmp_path / "policies"))
    state = SqliteStateStore(tmp_path / "state.db")
    await state.open()
    store = SqliteDeviceStore(tmp_path / "devices.db")
    registry = DeviceRegistry(store, poll_interval=0.05, stale_after=2.0)
    await registry.start()
    ca = DeviceCA(tmp_path / "device-ca")
    ca.load()
    sessions = SessionManager(state, public_host=host, lifetime=3600.0, idle_timeout=3600.0)
    resolver = IdentityResolver(sessions, None)
    catalogue = load_catalogue()
    pages = Pages(catalogue)
    csrf = Csrf(CSRF_SECRET)
    advisor = DeviceAdvisor(
        holder=holder,
        targets=[PolicyTarget("wiki", "wiki.town.example", "staff-devices")],
        catalogue=catalogue,
    )
    audit: list[tuple[str, dict[str, object], str | None]] = []

    def record(action: str, detail: Mapping[str, object], *, actor: str | None = None) -> None:
        audit.append((action, dict(detail), actor))

    guard = PolicyGuard(
        holder=holder, policy="it-admins", resource="tabiji-devices", resolver=resolver, pages=pages
    )
    routes: list[BaseRoute] = [
        *EnrolmentEndpoints(
            registry=registry,
            store=store,
            ca=ca,
            attestation=attestation,
            state=state,
            resolver=resolver,
            pages=pages,
            csrf=csrf,
            origin=origin,
            auto_approve=policy_auto_approve(holder=holder, policy="auto-approve"),
            auto_approve_name="auto-approve",
            audit=record,
            enrol_limiter=limits.enrol,
            poll_limiter=limits.poll,
            confirm_limiter=limits.confirm,
            code_ttl=code_ttl,
        ).routes(),
        *DeviceApi(
            intake=PostureIntake(registry, audience=origin),
            registry=registry,
            ca=ca,
            advisor=advisor,
            state=state,
            pages=pages,
            origin=origin,
            audit=record,
            address_limiter=limits.report_address,
            owner_limiter=limits.report_owner,
        ).routes(),
        *DevicesAdmin(
            guard=guard,
            resolver=resolver,
            registry=registry,
            advisor=advisor,
            pages=pages,
            csrf=csrf,
            audit=record,
            public_origin=origin,
        ).routes(),
    ]

    async def readiness() -> dict[str, Any]:
        return {"ready": True, "checks": {}}

    app = build_internal_app(pages=pages, readiness=readiness, extra_routes=routes)
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 50000))
    client = httpx.AsyncClient(transport=transport, base_url=origin)
    try:
        yield World(app, client, registry, store, state, sessions, ca, csrf, holder, origin, audit)
    finally:
        await client.aclose()
        await registry.stop()
        await state.close()
