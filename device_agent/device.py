"""The enrolled device at work: its key, its record and its gateway — signs and sends.

One object shared by `report`, `renew`, `proof`, `curl`, the run loop and the loopback server.
Every use of the key goes through one lock: a TPM key's handles live for one `signing_key()`
block, and the loopback thread and the run loop must not interleave commands to the chip.
Must not import the gateway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent import report
from device_agent.client import CERTIFICATE_PATH, GatewayClient, GatewayError
from device_agent.keys import DeviceKey
from device_agent.report import PostureFacts, PostureReport
from device_agent.state import AgentState, Enrolment, EnrolmentStatus, LastReport

RENEW_WHEN_LEFT = 1 / 3  # renew once less than a third of the certificate's lifetime is left


class NotEnrolled(Exception):
    """There is no (usable) enrolment: `code` says which step is missing."""

    def __init__(self, code: str, gateway: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.gateway = gateway


@dataclass
class EnrolledDevice:
    """The device key plus the enrolment record, bound to one gateway client."""

    state: AgentState
    enrolment: Enrolment
    key: DeviceKey
    client: GatewayClient
    clock: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_report_in: float | None = None  # the gateway's wish from the latest accepted report

    @property
    def device_id(self) -> str:
        if self.enrolment.device_id is None:
            raise NotEnrolled("enrolment-unconfirmed", self.enrolment.gateway)
        return self.enrolment.device_id

    @property
    def origin(self) -> str:
        return self.enrolment.gateway

    # -- signatures --

    def attest(self, challenge: str) -> str:
        """The loopback server's answer to a gateway challenge (browser binding)."""
        with self.lock, self.key.signing_key() as signing_key:
            return report.sign_attestation(
                signing_key,
                device_id=self.device_id,
                challenge=challenge,
                origin=self.origin,
                now=self.clock(),
            )

    def proof(self, method: str, url: str) -> str:
        """A DPoP-shaped proof for one request (RFC 9449 §4.2 members)."""
        with self.lock, self.key.signing_key() as signing_key:
            return report.make_proof(
                signing_key, device_id=self.device_id, method=method, url=url, now=self.clock()
            )

    # -- reports --

    def send_report(self, facts: PostureFacts, loopback_port: int | None = None) -> LastReport:
        """Sign and send one report; the answer (or refusal) is saved for `status` and returned.

        Raises GatewayError only when the gateway could not be reached or asked us to come back
        later (retryable); a refusal is an answer, recorded like an acceptance.
        """
        counter = self.state.counter(self.clock).next()  # durable before anything is signed
        posture = PostureReport(
            device_id=self.device_id,
            audience=self.origin,
            counter=counter,
            issued_at=int(self.clock()),
            facts=facts,
            loopback_port=loopback_port,
        )
        with self.lock, self.key.signing_key() as signing_key:
            token = report.sign_report(posture, signing_key)
        try:
            answer = self.client.report(token)
        except GatewayError as error:
            if error.retryable:
                raise
            last = LastReport(
                at=int(self.clock()), accepted=False, error=error.code, message=error.message
            )
            self.state.save_last_report(last)
            if error.code == "device-revoked":
                self._set_status("revoked")
            return last
        last = LastReport(
            at=int(self.clock()),
            accepted=True,
            status=answer.status,
            reasons=answer.reasons,
            fixes=answer.fixes,
        )
        self.state.save_last_report(last)
        if answer.status == "approved" and self.enrolment.status != "approved":
            self._set_status("approved")  # IT approved the device since the last report
        self.next_report_in = answer.next_report_in
        return last

    def _set_status(self, status: EnrolmentStatus) -> None:
        self.enrolment = replace(self.enrolment, status=status)
        self.state.save_enrolment(self.enrolment)

    # -- the device certificate --

    def certificate_window(self) -> tuple[float, float] | None:
        """(not_before, not_after) of the stored certificate, None when there is none."""
        path = self.enrolment.certificate
        if path is None:
            return None
        try:
            certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError):
            return None  # unreadable counts as absent: renewal fetches a fresh one
        return (
            certificate.not_valid_before_utc.timestamp(),
            certificate.not_valid_after_utc.timestamp(),
        )

    def certificate_due(self) -> bool:
        """An approved device renews when less than a third of the lifetime is left, or when it
        has no certificate yet (approved by IT after enrolment)."""
        if self.enrolment.status != "approved":
            return False
        window = self.certificate_window()
        if window is None:
            return True
        not_before, not_after = window
        return not_after - self.clock() < (not_after - not_before) * RENEW_WHEN_LEFT

    def renew_certificate(self) -> Path:
        """Fetch a new device certificate (authorised by a device proof) and store it."""
        proof = self.proof("POST", self.origin + CERTIFICATE_PATH)
        answer = self.client.renew_certificate(proof)
        check_certificate_key(answer.certificate, self.key)
        path = self.state.save_certificate(answer.certificate, answer.ca)
        self.enrolment = replace(self.enrolment, certificate=str(path))
        self.state.save_enrolment(self.enrolment)
        return path


def check_certificate_key(certificate_pem: str, key: DeviceKey) -> None:
    """Refuse a certificate that is not for this device's key (it could never be used for mTLS)."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    except ValueError as error:
        raise GatewayError("gateway-answer-malformed", "certificate unreadable") from error
    if report.public_key_pem(key.public_key()) != _public_pem_of(certificate):
        raise GatewayError("gateway-answer-malformed", "certificate is for another key")


def _public_pem_of(certificate: x509.Certificate) -> str:
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return ""
    return report.public_key_pem(public)
