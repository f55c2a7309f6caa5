"""Composition root, device part: settings → device store, registry (with its follower), device
CA, posture intake, TPM attestation verifier, the pipeline's device stage, the browser binding
endpoints, enrolment, the device API and the IT admin pages, and the services that run them.

Part of gateway.app (it reads settings; no stage imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from starlette.routing import BaseRoute

from gateway.app_services import Service, periodic
from gateway.decide import PolicyHolder
from gateway.devices.attestation import AttestationVerifier
from gateway.devices.binding import DeviceBindingEndpoints
from gateway.devices.ca import DeviceCA
from gateway.devices.enrollment import EnrolmentEndpoints, expire_pending, policy_auto_approve
from gateway.devices.fixes import DeviceAdvisor, PolicyTarget
from gateway.devices.intake_http import DeviceApi
from gateway.devices.model import DeviceRecord
from gateway.devices.posture import PostureIntake
from gateway.devices.registry import DeviceRegistry
from gateway.devices.stage import DeviceStage
from gateway.devices.store_factory import open_device_store
from gateway.forward import LiveWebSocket, WebSocketRegistry
from gateway.identity.csrf import Csrf
from gateway.pages import Pages
from gateway.routing import RouteTable
from gateway.settings import GatewaySettings
from gateway.state.base import StateStore
from gateway.state.factory import open_state_store
from gateway.state.ratelimit import RateLimiter
from gateway.web.devices_admin import DevicesAdmin
from gateway.web.guard import PolicyGuard
from gateway.wire_identity import CSRF_SECRET_FILE, IdentityParts, load_or_create_secret
from policies.geoip import GeoIP

log = logging.getLogger("tabiji.devices")
EXPIRE_PENDING_EVERY: Final = 3600.0  # seconds between sweeps of enrolments IT left pending
POLL_PER_MINUTE: Final = (60, 20)  # the agent polls its enrolment every 2 s (H5: ≥ 30/min)
DEVICE_CHANGED_CLOSE: Final = 4403  # WebSocket close code: the device changed, decide again


class AdminAudit:
    """IT actions go to the audit trail when there is one, else to the structured log."""

    def __init__(self, trail_admin: Callable[..., None] | None) -> None:
        self._admin = trail_admin

    def __call__(
        self, action: str, detail: Mapping[str, object], *, actor: str | None = None
    ) -> None:
        if self._admin is not None:
            self._admin(action, detail, actor=actor)
        else:
            log.info("device action %s", action, extra={"actor": actor, "detail": dict(detail)})

    def hook(self, action: str, detail: Mapping[str, object]) -> None:
        """The two-argument form the binding endpoints call."""
        self(action, detail)


@dataclass
class DeviceParts:
    """What gateway.app needs from the device side."""

    registry: DeviceRegistry
    stage: DeviceStage
    ca: DeviceCA
    routes: list[BaseRoute]
    services: list[Service] = field(default_factory=list)

    def readiness(self) -> tuple[bool, str]:
        """Ready while the registry's copy is fresh (a stale copy refuses every device)."""
        age = self.registry.age
        if not self.registry.fresh:
            return False, f"device registry not refreshed for {age:.1f} s: devices unknown"
        return True, f"device registry fresh ({age:.1f} s)"


def device_changed(new: DeviceRecord, old: DeviceRecord | None) -> bool:
    """A change that can alter a decision: status, posture facts, tags or key storage (a mere
    new report with the same facts, or a last-seen time, is not one)."""
    if old is None:
        return new.status == "revoked"
    return (
        new.status != old.status
        or new.posture != old.posture
        or new.tags != old.tags
        or new.key_storage != old.key_storage
    )


def websocket_closer(
    sockets: WebSocketRegistry,
) -> Callable[[DeviceRecord, DeviceRecord | None], None]:
    """A registry listener closing the open WebSockets of a device that changed, so their next
    handshake is decided on the new facts (like a revoked session's, which close with 4401)."""

    def close(new: DeviceRecord, old: DeviceRecord | None) -> None:
        if not device_changed(new, old):
            return

        def of_device(live: LiveWebSocket) -> bool:
            device = live.ctx.device
            return device is not None and device.id == new.id

        reason = "device-revoked" if new.status == "revoked" else "device-changed"
        closed = sockets.close_where(of_device, code=DEVICE_CHANGED_CLOSE, reason=reason)
        if closed:
            log.info("closed %d WebSocket(s) of changed device %s", closed, new.id)

    return close


def _targets(routes: RouteTable) -> list[PolicyTarget]:
    return [
        PolicyTarget(route.name, route.host, route.policy)
        for route in routes.routes
        if not route.public and route.policy is not None
    ]


def build_devices(
    settings: GatewaySettings,
    *,
    routes: RouteTable,
    pages: Pages,
    holder: PolicyHolder,
    geoip: GeoIP | None,
    sockets: WebSocketRegistry,
    identity: IdentityParts | None,
    admin_audit: Callable[..., None] | None,
    dry_run: bool,
) -> DeviceParts:
    """Every device object, unstarted; `dry_run` (check-config) writes no file."""
    config = settings.devices
    origin = settings.public_url
    config_dir = settings.assertion.key_dir.parent
    registry = DeviceRegistry(
        open_device_store(config.store, base_dir=config_dir),
        poll_interval=config.registry_poll_interval,
        stale_after=config.registry_stale_after,
    )
    ca = DeviceCA(config.ca_dir, lifetime=config.certificate_lifetime)
    if not dry_run:
        ca.load()  # the first start makes the CA (0700 directory, 0600 key), locked across workers
    audit = AdminAudit(admin_audit)
    # The DPoP replay cache and the attestation challenges live in the shared state store.
    own_state: StateStore | None = None
    if identity is not None:
        state = identity.store
    else:
        # The same store sessions would use, so replicas still share one replay cache.
        state = own_state = open_state_store(settings.identity.session.store, base_dir=config_dir)
    stage = DeviceStage(
        registry=registry,
        replay=state,
        sessions=identity.sessions if identity is not None else None,
        certificates=ca,
        client_cert_header=config.client_cert_header,
        binding_max_age=config.binding_max_age,
        proof_max_age=config.proof_max_age,
        proof_max_skew=config.proof_max_skew,
    )
    registry.on_change(websocket_closer(sockets))
    advisor = DeviceAdvisor(holder=holder, targets=_targets(routes), catalogue=pages.catalogue)
    limits = config.rate_limit
    endpoints: list[BaseRoute] = list(
        DeviceApi(
            intake=PostureIntake(registry, audience=origin, max_skew=int(config.max_clock_skew)),
            registry=registry,
            ca=ca,
            advisor=advisor,
            state=state,
            pages=pages,
            origin=origin,
            audit=audit,
            address_limiter=RateLimiter(
                limits.report_per_address.per_minute, limits.report_per_address.burst
            ),
            owner_limiter=RateLimiter(
                limits.report_per_user.per_minute, limits.report_per_user.burst
            ),
            report_interval=int(config.report_interval),
            proof_max_age=int(config.proof_max_age),
            proof_max_skew=int(config.proof_max_skew),
        ).routes()
    )
    if identity is not None:
        endpoints += _identity_endpoints(
            settings,
            registry=registry,
            ca=ca,
            state=state,
            identity=identity,
            pages=pages,
            holder=holder,
            geoip=geoip,
            advisor=advisor,
            audit=audit,
            dry_run=dry_run,
        )
    else:
        log.warning("devices: no identity configured, so no enrolment, binding or admin pages")
    parts = DeviceParts(registry=registry, stage=stage, ca=ca, routes=endpoints)
    parts.services = _services(registry, own_state, audit, config.pending_ttl)
    return parts


def _identity_endpoints(
    settings: GatewaySettings,
    *,
    registry: DeviceRegistry,
    ca: DeviceCA,
    state: StateStore,
    identity: IdentityParts,
    pages: Pages,
    holder: PolicyHolder,
    geoip: GeoIP | None,
    advisor: DeviceAdvisor,
    audit: AdminAudit,
    dry_run: bool,
) -> list[BaseRoute]:
    """Enrolment (the user confirms in a browser), browser binding and the IT admin pages."""
    config = settings.devices
    limits = config.rate_limit
    # The same secret as the login endpoints' CSRF tokens (one file shared by every worker).
    csrf = Csrf(
        load_or_create_secret(settings.assertion.key_dir / CSRF_SECRET_FILE, create=not dry_run)
    )
    attestation = (
        AttestationVerifier.from_pem_files(list(config.attestation_ca_files))
        if config.attestation_ca_files
        else None
    )
    auto = config.auto_approve_policy
    endpoints: list[BaseRoute] = list(
        EnrolmentEndpoints(
            registry=registry,
            store=registry.store,
            ca=ca,
            attestation=attestation,
            state=state,
            resolver=identity.resolver,
            pages=pages,
            csrf=csrf,
            origin=settings.public_url,
            auto_approve=(
                policy_auto_approve(holder=holder, policy=auto, geoip=geoip) if auto else None
            ),
            auto_approve_name=auto or "auto-approve",
            audit=audit,
            enrol_limiter=RateLimiter(
                limits.enrol_per_address.per_minute, limits.enrol_per_address.burst
            ),
            poll_limiter=RateLimiter(*POLL_PER_MINUTE),
            confirm_limiter=RateLimiter(
                limits.enrol_per_user.per_minute, limits.enrol_per_user.burst
            ),
            code_ttl=config.enrolment_code_ttl,
            pending_ttl=config.pending_ttl,
            max_skew=int(config.max_clock_skew),
        ).routes()
    )
    endpoints += DeviceBindingEndpoints(
        sessions=identity.sessions,
        store=state,
        registry=registry,
        pages=pages,
        public_origin=settings.public_url,
        loopback_ports=config.loopback_ports,
        challenge_ttl=config.challenge_ttl,
        max_skew=config.max_clock_skew,
        audit=audit.hook,
    ).routes()
    if config.admin_policy is not None:
        guard = PolicyGuard(
            holder=holder,
            policy=config.admin_policy,
            resource="tabiji-devices",
            resolver=identity.resolver,
            pages=pages,
            geoip=geoip,
        )
        endpoints += DevicesAdmin(
            guard=guard,
            resolver=identity.resolver,
            registry=registry,
            advisor=advisor,
            pages=pages,
            csrf=csrf,
            audit=audit,
            public_origin=settings.public_url,
            posture_max_age=config.posture_max_age,
        ).routes()
    return endpoints


def _services(
    registry: DeviceRegistry,
    own_state: StateStore | None,
    audit: AdminAudit,
    pending_ttl: float,
) -> list[Service]:
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def sweep() -> None:
        await expire_pending(registry, time.time(), pending_ttl=pending_ttl, audit=audit)

    async def start() -> None:
        if own_state is not None:
            await own_state.open()
        # Loads every device and follows the store; a store that is down now is not fatal
        # (every device is unknown until it answers: readiness says so).
        await registry.start()
        stop.clear()
        tasks.append(asyncio.create_task(periodic(stop, EXPIRE_PENDING_EVERY, sweep)))

    async def halt() -> None:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        tasks.clear()
        try:
            await registry.stop()
        finally:
            if own_state is not None:
                await own_state.close()

    return [Service("device registry", start, halt)]
