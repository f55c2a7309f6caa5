"""Posture intake against real stores (SQLite and PostgreSQL): a genuine report is stored; every
refusal has its precise code and leaves every stored row byte-for-byte as it was."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from registry_helpers import KINDS, T0, Place, make_key, new_device, place_fixture

from device_agent.report import (
    REPORT_TYPE,
    PostureFacts,
    PostureReport,
    canonical_json,
    sign_report,
)
from gateway.devices.model import DeviceError, DeviceRecord
from gateway.devices.posture import PostureIntake
from gateway.devices.registry import DeviceRegistry

pytestmark = pytest.mark.anyio
ORIGIN = "https://gw.town.example"
NOW = T0 + 1000
FACTS = PostureFacts(os="linux", os_version="12", disk_encrypted=True, firewall=True)


@dataclass
class World:
    """A registry on a real store with two users' devices: sato's (approved) and ito's."""

    place: Place
    registry: DeviceRegistry
    intake: PostureIntake
    sato: DeviceRecord
    sato_key: ec.EllipticCurvePrivateKey
    ito: DeviceRecord
    ito_key: ec.EllipticCurvePrivateKey

    def report(self, counter: int = 1, **changes: Any) -> str:
        """A genuine report from sato's laptop, signed by its key."""
        fields: dict[str, Any] = {
            "device_id": self.sato.id,
            "audience": ORIGIN,
            "counter": counter,
            "issued_at": int(NOW),
            "facts": FACTS,
            "loopback_port": 47801,
        }
        key = changes.pop("key", self.sato_key)
        fields.update(changes)
        return sign_report(PostureReport(**fields), key)

    async def refused(self, token: str, code: str, status: int, **options: Any) -> None:
        """The report is refused with `code` and `status`, and nothing stored changed at all."""
        before = self.place.snapshot()
        intake = (
            PostureIntake(self.registry, audience=ORIGIN, **options) if options else self.intake
        )
        with pytest.raises(DeviceError) as caught:
            await intake.accept(token, now=NOW)
        assert (caught.value.code, caught.value.status) == (code, status), caught.value
        assert self.place.snapshot() == before


@pytest.fixture(params=KINDS)
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    """Two users' devices in a fresh store of each kind, behind a started registry."""
    async for place in place_fixture(request.param, tmp_path):
        registry = DeviceRegistry(place.new_store())
        await registry.start()
        sato_new, sato_key = new_device(status="approved")
        ito_new, ito_key = new_device(owner_subject="u-ito", owner_email="ito@town.example")
        sato = await registry.add(sato_new)
        ito = await registry.add(ito_new)
        intake = PostureIntake(registry, audience=ORIGIN)
        yield World(place, registry, intake, sato, sato_key, ito, ito_key)
        await registry.stop()


def raw_token(
    key: ec.EllipticCurvePrivateKey, kid: str, payload: bytes, typ: str = REPORT_TYPE
) -> str:
    """A compact JWS over any payload bytes (to build malformed reports)."""
    return jwt.api_jws.encode(payload, key, algorithm="ES256", headers={"typ": typ, "kid": kid})


async def test_a_genuine_report_is_stored(world: World) -> None:
    """The device's own signed report is stored: facts, counter, times and port."""
    result = await world.intake.accept(world.report(counter=7), now=NOW)
    assert result.previous == world.sato
    assert result.report.counter == 7
    record = result.record
    assert record.posture == FACTS
    assert record.posture_counter == 7
    assert (record.posture_at, record.posture_reported_at) == (NOW, float(int(NOW)))
    assert record.loopback_port == 47801
    assert await world.registry.store.get(world.sato.id) == record
    assert world.registry.get_cached(world.sato.id) == record
    later = await world.intake.accept(world.report(counter=8), now=NOW + 1)
    assert later.record.posture_counter == 8


async def test_a_pending_device_reports_too(world: World) -> None:
    """A device waiting for IT may already report; its posture is stored."""
    token = sign_report(PostureReport(world.ito.id, ORIGIN, 1, int(NOW), FACTS), world.ito_key)
    result = await world.intake.accept(token, now=NOW)
    assert (result.record.status, result.record.posture) == ("pending", FACTS)


async def test_a_forged_signature_is_refused(world: World) -> None:
    """A report naming sato's laptop but signed by another key: report-bad-signature."""
    await world.refused(world.report(key=make_key()), "report-bad-signature", 403)


async def test_a_key_of_another_users_device_is_refused(world: World) -> None:
    """ito's enrolled key cannot speak for sato's laptop: bad signature against sato's key."""
    await world.refused(world.report(key=world.ito_key), "report-bad-signature", 403)


async def test_a_report_for_another_device_is_refused(world: World) -> None:
    """A report whose claims name another device than its header is report-wrong-device."""
    claims = PostureReport(world.ito.id, ORIGIN, 1, int(NOW), FACTS).claims()
    mixed = raw_token(world.sato_key, world.sato.id, canonical_json(claims))
    await world.refused(mixed, "report-wrong-device", 403)
    other = raw_token(world.ito_key, world.ito.id, canonical_json({**claims, "sub": world.sato.id}))
    await world.refused(other, "report-wrong-device", 403)


async def test_replays_are_refused(world: World) -> None:
    """The exact same report twice, the same counter again, or a lower one: report-replayed."""
    token = world.report(counter=5)
    await world.intake.accept(token, now=NOW)
    await world.refused(token, "report-replayed", 409)
    await world.refused(world.report(counter=5), "report-replayed", 409)
    await world.refused(world.report(counter=4), "report-replayed", 409)
    await world.refused(world.report(counter=0), "report-replayed", 409)


async def test_a_report_for_another_gateway_is_refused(world: World) -> None:
    """A report addressed to another gateway's origin: report-wrong-audience."""
    await world.refused(world.report(audience="https://evil.example"), "report-wrong-audience", 403)


async def test_clock_skew_is_refused_both_ways(world: World) -> None:
    """Issued too far in the future: report-clock-skew; too long ago: report-expired; the window
    is configurable."""
    await world.refused(world.report(issued_at=int(NOW) + 301), "report-clock-skew", 400)
    await world.refused(world.report(issued_at=int(NOW) - 301), "report-expired", 400)
    await world.refused(world.report(issued_at=int(NOW) - 60), "report-expired", 400, max_skew=30)
    accepted = await world.intake.accept(world.report(issued_at=int(NOW) - 60), now=NOW)
    assert accepted.record.posture_counter == 1


async def test_an_oversized_report_is_refused_unparsed(world: World) -> None:
    """A token over the size limit is report-too-large before any parsing."""
    await world.refused("x" * (16 * 1024 + 1), "report-too-large", 413)
    await world.refused(world.report(), "report-too-large", 413, max_bytes=100)
    await world.refused("é" * 100, "report-malformed", 400)


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda w: "not a token", "report-malformed"),
        (lambda w: raw_token(w.sato_key, w.sato.id, b"not json"), "report-malformed"),
        (lambda w: raw_token(w.sato_key, w.sato.id, b"[1, 2]"), "report-malformed"),
        (
            lambda w: raw_token(w.sato_key, w.sato.id, canonical_json(_claims(w, cnt=-1))),
            "report-malformed",
        ),
        (
            lambda w: raw_token(w.sato_key, w.sato.id, canonical_json(_claims(w, cnt="7"))),
            "report-malformed",
        ),
        (
            lambda w: raw_token(
                w.sato_key, w.sato.id, canonical_json(_claims(w, posture={"rootkit": False}))
            ),
            "report-malformed",
        ),
        (
            lambda w: raw_token(w.sato_key, w.sato.id, canonical_json(_claims(w, port=22))),
            "report-malformed",
        ),
        (
            lambda w: raw_token(w.sato_key, w.sato.id, canonical_json(_claims(w)), "dpop+jwt"),
            "report-wrong-type",
        ),
        (
            lambda w: jwt.api_jws.encode(
                canonical_json(_claims(w)),
                "secret-at-least-32-bytes-long-xxxxxxxx",
                algorithm="HS256",
                headers={"typ": REPORT_TYPE, "kid": w.sato.id},
            ),
            "report-bad-algorithm",
        ),
    ],
)
async def test_malformed_reports_are_refused(
    world: World, build: Callable[[World], str], code: str
) -> None:
    """Not a JWS, a payload that is not a claims object, wrong claim types, an unknown posture
    fact, a privileged port, another token type or algorithm: each refused precisely."""
    await world.refused(build(world), code, 400)


def _claims(world: World, **changes: object) -> dict[str, object]:
    claims = PostureReport(world.sato.id, ORIGIN, 1, int(NOW), FACTS).claims()
    claims.update(changes)
    return claims


async def test_unknown_and_revoked_devices_are_refused(world: World) -> None:
    """A report from a device the registry does not know, or one IT revoked, is refused."""
    stranger = sign_report(PostureReport("dev-stranger", ORIGIN, 1, int(NOW), FACTS), make_key())
    await world.refused(stranger, "device-unknown", 404)
    await world.registry.revoke(world.sato.id, now=NOW, actor="it")
    await world.refused(world.report(), "device-revoked", 403)


async def test_two_replicas_accept_one_report_once(world: World) -> None:
    """The same report arriving at two replicas at once is stored by exactly one; the other
    answers report-replayed."""
    other = DeviceRegistry(world.place.new_store())
    await other.start()
    try:
        intakes = (world.intake, PostureIntake(other, audience=ORIGIN))
        for counter in range(1, 6):
            token = world.report(counter=counter)
            results = await asyncio.gather(
                *(intake.accept(token, now=NOW) for intake in intakes), return_exceptions=True
            )
            accepted = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, DeviceError)]
            assert len(accepted) == 1
            assert [r.code for r in refused] == ["report-replayed"]
    finally:
        await other.stop()


async def test_keys_are_parsed_once_per_device(world: World) -> None:
    """The intake reuses the registry's parsed key instead of reading the PEM per report."""
    assert world.intake.key_of(world.sato) is world.intake.key_of(world.sato)
