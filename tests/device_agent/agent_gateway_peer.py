"""A minimal protocol peer for the agent's unit tests: the gateway side of /tmp/plan/PROTOCOL.md's
device endpoints, in a thread on 127.0.0.1, verifying with device_agent.report as the real gateway
does. NOT the gateway — just enough of its JSON answers to drive the agent; the real agent ↔ real
gateway tests live in tests/integration. Tests steer it through `PeerState` while it runs.
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent import report


@dataclass
class Device:
    device_id: str
    key: ec.EllipticCurvePublicKey
    last_counter: int = -1
    reports: list[report.PostureReport] = field(default_factory=list)


@dataclass
class PeerState:
    """What the peer answers; tests change it while the server runs."""

    origin: str = ""
    decision: str = "waiting-for-user"  # then "pending" | "approved" | "refused" | "expired"
    attestation_seen: dict[str, Any] | None = None
    credential_answers: list[str | None] = field(default_factory=list)
    enrolment_requests: list[dict[str, Any]] = field(default_factory=list)
    enrolments: dict[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    fixes: list[dict[str, Any]] = field(default_factory=list)
    next_report_in: int | None = 300
    revoked: bool = False
    fail_next: int = 0  # answer this many requests with 503 first
    rate_limit_next: int = 0  # answer this many polls with 429 first
    redirect_to: str | None = None  # answer every request with a redirect here
    oversized: bool = False  # answer with a body far beyond the agent's limit
    raw_body: bytes | None = None  # answer 200 with exactly these bytes
    confirm_origin: str | None = None  # put the confirm link on another origin
    attestation_verifier: Any = None  # gateway.devices.attestation.AttestationVerifier, if any
    expected_secrets: dict[str, bytes] = field(default_factory=dict)
    credential_confirmed: list[bool] = field(default_factory=list)
    certificate_lifetime: float = 30 * 86400
    expires_in: int = 900  # how long an enrolment code stays valid
    certificates_issued: int = 0
    proofs_seen: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DeviceCA:
    """The peer's device CA: signs device certificates for enrolled keys."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer device CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        subject: str,
        public_key: ec.EllipticCurvePublicKey,
        lifetime: float,
        names: list[str] | None = None,
    ) -> str:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=60))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
        )
        if names:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(n)) for n in names]
                ),
                critical=False,
            )
        return (
            builder.sign(self.key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )


def _handler(state: PeerState, ca: DeviceCA) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            with state.lock:
                state.requests.append(self.path)
                if state.redirect_to is not None:
                    self._send(302, {}, {"Location": state.redirect_to})
                    return
                if state.oversized:
                    self._send(200, {"padding": "x" * 200_000})
                    return
                if state.raw_body is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(state.raw_body)))
                    self.end_headers()
                    self.wfile.write(state.raw_body)
                    return
                if state.fail_next > 0:
                    state.fail_next -= 1
                    self._send(503, {"error": "gateway-unavailable"})
                    return
                route = {
                    "/.tabiji/devices/enroll": self._enrol,
                    "/.tabiji/devices/enroll/poll": self._poll,
                    "/.tabiji/devices/report": self._report,
                    "/.tabiji/devices/certificate": self._certificate,
                }.get(self.path)
                if route is None:
                    self._send(404, {"error": "not-found"})
                    return
                try:
                    route(body)
                except report.ReportInvalid as error:
                    self._send(
                        400,
                        {
                            "accepted": False,
                            "error": error.code,
                            "message": {"ja": "不正", "en": "invalid"},
                        },
                    )

        def _enrol(self, token: str) -> None:
            key, claims = report.verify_enrolment(token, audience=state.origin, now=_now())
            enrolment_id = f"enr-{len(state.enrolments) + 1}"
            state.enrolments[enrolment_id] = key
            state.enrolment_requests.append(claims)
            confirm_origin = state.confirm_origin or state.origin
            answer: dict[str, Any] = {
                "enrolment_id": enrolment_id,
                "user_code": "KXQP-7MZD",
                "confirm_url": f"{confirm_origin}/.tabiji/devices/confirm?code=KXQP-7MZD",
                "poll_interval": 1,
                "expires_in": state.expires_in,
            }
            if "attestation" in claims:
                state.attestation_seen = claims["attestation"]
                if state.attestation_verifier is not None:
                    from gateway.devices.attestation import attestation_nonce

                    challenge, secret = state.attestation_verifier.challenge(
                        claims["attestation"], key, attestation_nonce(state.origin, key)
                    )
                    state.expected_secrets[enrolment_id] = secret
                    answer["credential"] = challenge.to_json()
            self._send(201, answer)

        def _poll(self, token: str) -> None:
            key, claims = report.verify_enrolment(token, audience=state.origin, now=_now())
            if state.rate_limit_next > 0:
                state.rate_limit_next -= 1
                self._send(429, {"error": "rate-limited"}, {"Retry-After": "1"})
                return
            enrolment_id = str(claims.get("enrolment_id"))
            enrolled_key = state.enrolments.get(enrolment_id)
            if enrolled_key is None:
                self._send(410, {"error": "enrolment-expired"})
                return
            if report.key_thumbprint(enrolled_key) != report.key_thumbprint(key):
                self._send(
                    403, {"error": "enrolment-refused", "message": {"ja": "拒否", "en": "refused"}}
                )
                return
            state.credential_answers.append(claims.get("credential_answer"))
            expected = state.expected_secrets.get(enrolment_id)
            if expected is not None:
                from gateway.devices.attestation import AttestationVerifier

                state.credential_confirmed.append(
                    AttestationVerifier.confirm(expected, claims.get("credential_answer"))
                )
            if state.decision == "waiting-for-user":
                self._send(202, {"status": "waiting-for-user"})
                return
            if state.decision in ("refused", "expired"):
                code = f"enrolment-{state.decision}"
                self._send(403 if state.decision == "refused" else 410, {"error": code})
                return
            device_id = f"dev-{report.key_thumbprint(key)[:8]}"
            state.devices.setdefault(device_id, Device(device_id, key))
            if state.decision == "pending":
                self._send(200, {"status": "pending", "device_id": device_id})
                return
            certificate = ca.issue(device_id, key, state.certificate_lifetime)
            state.certificates_issued += 1
            self._send(
                200,
                {
                    "status": "approved",
                    "device_id": device_id,
                    "certificate": certificate,
                    "ca": ca.pem,
                },
            )

        def _report(self, token: str) -> None:
            device_id = report.unverified_device_id(token, report.REPORT_TYPE)
            device = state.devices.get(device_id)
            if device is None:
                self._send(404, {"accepted": False, "error": "device-unknown"})
                return
            if state.revoked:
                self._send(
                    403,
                    {
                        "accepted": False,
                        "error": "device-revoked",
                        "message": {
                            "ja": "この端末は取り消されています。",
                            "en": "This device is revoked.",
                        },
                    },
                )
                return
            posture = report.verify_report(
                token, device.key, device_id=device_id, audience=state.origin, now=_now()
            )
            if posture.counter <= device.last_counter:
                self._send(409, {"accepted": False, "error": "report-replayed"})
                return
            device.last_counter = posture.counter
            device.reports.append(posture)
            answer: dict[str, Any] = {
                "accepted": True,
                "status": state.decision
                if state.decision in ("pending", "approved")
                else "pending",
                "reasons": list(state.reasons),
                "fixes": list(state.fixes),
            }
            if state.next_report_in is not None:
                answer["next_report_in"] = state.next_report_in
            self._send(200, answer)

        def _certificate(self, _: str) -> None:
            proof = self.headers.get(report.PROOF_HEADER, "")
            device = state.devices.get(report.unverified_device_id(proof, report.PROOF_TYPE))
            if device is None or state.decision != "approved":
                self._send(403, {"error": "device-not-approved"})
                return
            verified = report.verify_proof(
                proof,
                device.key,
                device_id=device.device_id,
                method="POST",
                url=state.origin + "/.tabiji/devices/certificate",
                now=_now(),
            )
            if verified.proof_id in state.proofs_seen:
                self._send(401, {"error": "device-proof-invalid"})
                return
            state.proofs_seen.add(verified.proof_id)
            state.certificates_issued += 1
            certificate = ca.issue(device.device_id, device.key, state.certificate_lifetime)
            self._send(200, {"certificate": certificate, "ca": ca.pem})

        def _send(
            self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def _now() -> float:
    import time

    return time.time()


@dataclass
class Peer:
    state: PeerState
    origin: str
    ca: DeviceCA
    port: int


@contextmanager
def running_peer(tls_dir: Path | None = None) -> Iterator[Peer]:
    """The peer on a free 127.0.0.1 port (HTTPS with a throw-away server CA when `tls_dir` is
    given: <tls_dir>/server-ca.pem verifies it); stopped on exit."""
    state = PeerState()
    ca = DeviceCA()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, ca))
    server.daemon_threads = True
    scheme = "http"
    if tls_dir is not None:
        scheme = "https"
        server_ca = DeviceCA()
        tls_key = ec.generate_private_key(ec.SECP256R1())
        (tls_dir / "server-ca.pem").write_text(server_ca.pem)
        (tls_dir / "server.pem").write_text(
            server_ca.issue("127.0.0.1", tls_key.public_key(), 3600, ["127.0.0.1"])
        )
        (tls_dir / "server.key").write_bytes(
            tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    state.origin = f"{scheme}://127.0.0.1:{port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Peer(state, state.origin, ca, port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
