"""RequestContext: the frozen facts one request has gathered, handed from stage to stage.

Imports only value types (routing, target, identity.model, policies.model); never
gateway.settings or a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.identity.model import Identity
from gateway.routing import Route
from gateway.target import Target
from policies.model import Device

DeviceChannel = Literal["proof", "certificate", "session"]


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end, as the network tells it (RFC 7239 when a trusted proxy speaks)."""

    client_ip: str  # the original client, from trusted proxy headers or the socket
    scheme: str  # "http" / "https" as the client reached the gateway
    authority: str  # canonical host[:port] the client asked for
    via_trusted_proxy: bool  # the socket peer is in `trusted_proxies`
    forwarded_for: tuple[str, ...]  # the X-Forwarded-For chain to extend (trusted proxies only)


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """The device a request was proved to come from, as the registry knew it at that moment.

    Made once per registry version of a device (gateway.devices.stage caches it), so the hot
    path hands out the same object until the device changes.
    """

    id: str
    owner: tuple[str, str]  # (issuer, subject) of the device's owner
    fact: Device  # the policy engine's view (status, tags, key storage, posture)
    key_storage: str  # "tpm" (attested), "tpm-claimed" or "software"
    posture_summary: str | None  # e.g. "linux 12 disk=on fw=on lock=300s" (audit record)
    posture_at: float | None  # when the gateway accepted the latest report (unix seconds)
    version: int  # the registry's change number of this state of the device


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Everything later stages may rely on; built once the target is routed."""

    request_id: str
    method: str
    peer: Peer
    target: Target
    route: Route
    identity: Identity | None = None  # None: nobody signed in (or a public route: not looked at)
    device: DeviceContext | None = None  # None: no device proved (or a public route)
    device_channel: DeviceChannel | None = None  # how the device was proved
