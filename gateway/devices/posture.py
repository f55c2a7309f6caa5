"""Posture intake: a signed report from a device's agent, checked and stored — or refused with a
precise code, leaving everything already stored exactly as it was.

The order matters: size before parsing, the registry's key before trusting any claim, the
counter last (only a genuine report may advance it), the store's conditional update as the one
arbiter between replicas. Rate limits per user and address are the HTTP layer's.
Must not import gateway.settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import (
    DEFAULT_MAX_SKEW,
    MAX_TOKEN_BYTES,
    REPORT_TYPE,
    PostureReport,
    ReportInvalid,
    unverified_device_id,
    verify_report,
)
from gateway.devices.model import DeviceError, DeviceRecord
from gateway.devices.registry import DeviceRegistry


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: str
    status: int


# Every refusal a report can get, with its HTTP status; the catalogue has a text for each.
_REFUSALS: Final = {
    r.code: r
    for r in (
        _Refusal(code="report-too-large", status=413),
        _Refusal(code="report-malformed", status=400),
        _Refusal(code="report-wrong-type", status=400),
        _Refusal(code="report-bad-algorithm", status=400),
        _Refusal(code="report-clock-skew", status=400),
        _Refusal(code="report-expired", status=400),
        _Refusal(code="report-bad-signature", status=403),
        _Refusal(code="report-wrong-device", status=403),
        _Refusal(code="report-wrong-audience", status=403),
        _Refusal(code="report-replayed", status=409),
        _Refusal(code="device-unknown", status=404),
        _Refusal(code="device-revoked", status=403),
    )
}


def refusal(code: str, detail: str = "") -> DeviceError:
    """The DeviceError for a refusal code (unknown codes: 400 report-malformed's status)."""
    known = _REFUSALS.get(code)
    return DeviceError(code, detail, known.status if known else 400)


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """An accepted report: the device as now stored, the report, and the device before it."""

    record: DeviceRecord
    report: PostureReport
    previous: DeviceRecord


class PostureIntake:
    """Checks and stores posture reports for one gateway origin (the reports' audience)."""

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        audience: str,
        max_skew: int = DEFAULT_MAX_SKEW,
        max_bytes: int = MAX_TOKEN_BYTES,
    ) -> None:
        self._registry = registry
        self._audience = audience
        self._max_skew = int(max_skew)
        self._max_bytes = min(int(max_bytes), MAX_TOKEN_BYTES)

    def key_of(self, record: DeviceRecord) -> ec.EllipticCurvePublicKey:
        """The device's enrolled public key (parsed once, cached by the registry)."""
        return self._registry.key_of(record)

    async def accept(self, token: str, *, now: float) -> IntakeResult:
        """Verify and store one report; DeviceError(code, status) when refused (nothing stored)."""
        # Length before anything is parsed; a JWS is ASCII, so characters are bytes.
        if len(token) > self._max_bytes:
            raise refusal("report-too-large", f"{len(token)} bytes")
        if not token.isascii():
            raise refusal("report-malformed", "not ASCII")
        try:
            device_id = unverified_device_id(token, REPORT_TYPE)
        except ReportInvalid as exc:
            raise refusal(exc.code, exc.detail) from exc
        # The store's copy, not the cache: the counter must be the latest any replica accepted.
        record = await self._registry.get(device_id)
        if record is None:
            raise refusal("device-unknown", device_id)
        if record.status == "revoked":
            raise refusal("device-revoked", device_id)
        try:
            report = verify_report(
                token,
                self.key_of(record),
                device_id=record.id,
                audience=self._audience,
                now=now,
                max_skew=self._max_skew,
            )
        except ReportInvalid as exc:
            raise refusal(exc.code, exc.detail) from exc
        if report.counter <= record.posture_counter:
            raise refusal(
                "report-replayed", f"counter {report.counter} <= {record.posture_counter}"
            )
        stored = await self._registry.accept_posture(
            record.id,
            counter=report.counter,
            facts=report.facts,
            reported_at=float(report.issued_at),
            received_at=now,
            loopback_port=report.loopback_port,
        )
        if stored is None:
            # Another replica stored this (or a later) report first, or IT revoked the device
            # in between: the conditional update left the row alone.
            current = await self._registry.get(record.id)
            if current is None:
                raise refusal("device-unknown", device_id)
            if current.status == "revoked":
                raise refusal("device-revoked", device_id)
            raise refusal("report-replayed", "another report with this counter won")
        return IntakeResult(record=stored, report=report, previous=record)
