"""The agent's HTTP client for the gateway's device endpoints (/tmp/plan/PROTOCOL.md, agent side).

One origin per client; TLS verified against the system store or a private CA bundle; redirects are
never followed (the device endpoints do not redirect, and a signed report must not travel to
wherever a Location header points); answers are size-capped and parsed strictly into values.
Must not import the gateway.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from device_agent.report import PROOF_HEADER
from device_agent.state import Fix

ENROL_PATH: Final = "/.tabiji/devices/enroll"
POLL_PATH: Final = "/.tabiji/devices/enroll/poll"
REPORT_PATH: Final = "/.tabiji/devices/report"
CERTIFICATE_PATH: Final = "/.tabiji/devices/certificate"
ATTESTED_PATH: Final = "/.tabiji/device/attested"
JWT_TYPE: Final = "application/jwt"
MAX_ANSWER_BYTES: Final = 64 * 1024  # a certificate + CA + fixes is a few KiB
DEFAULT_TIMEOUT: Final = 15.0
_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
_LOOPBACK_NAMES: Final = {"localhost"}


class GatewayError(Exception):
    """The gateway refused, or could not be reached: `code` is stable kebab-case.

    `retryable` says whether trying again later may help (network trouble, 5xx, 429); a refusal
    such as report-bad-signature or device-revoked is not.
    """

    def __init__(
        self,
        code: str,
        detail: str = "",
        *,
        status: int | None = None,
        message: Mapping[str, str] | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.status = status
        self.message = dict(message or {})
        self.retryable = retryable
        self.retry_after = retry_after


def gateway_origin(url: str) -> str:
    """The gateway's origin from what the user typed: scheme://host[:port], lower-case, default
    port dropped. https only, except plain http to this machine (tests, a local demo)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise GatewayError("gateway-url-invalid", str(error)) from error
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        raise GatewayError("gateway-url-invalid", "expected https://host")
    if parts.username is not None or parts.password is not None:
        raise GatewayError("gateway-url-invalid", "no user name or password in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise GatewayError("gateway-url-invalid", "the gateway's address has no path or query")
    if scheme == "http" and not _is_loopback(host):
        raise GatewayError("gateway-url-insecure", "http is only allowed to this machine")
    authority = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        authority = f"{authority}:{port}"
    return f"{scheme}://{authority}"


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- answers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrolmentTicket:
    """201 from /enroll: what to show the user and how to poll."""

    enrolment_id: str
    user_code: str
    confirm_url: str
    poll_interval: float
    expires_in: float
    credential: dict[str, str] | None  # TPM2 MakeCredential blob, only when attestation was sent


@dataclass(frozen=True, slots=True)
class PollAnswer:
    status: str  # "waiting-for-user" | "pending" | "approved"
    device_id: str | None = None
    certificate: str | None = None
    ca: str | None = None


@dataclass(frozen=True, slots=True)
class ReportAnswer:
    accepted: bool
    status: str | None
    reasons: tuple[str, ...]
    fixes: tuple[Fix, ...]
    next_report_in: float | None


@dataclass(frozen=True, slots=True)
class CertificateAnswer:
    certificate: str
    ca: str | None


def _text(data: Mapping[str, Any], name: str, limit: int = 256) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise GatewayError("gateway-answer-malformed", f"{name} missing or not text")
    return value


def _optional_text(data: Mapping[str, Any], name: str, limit: int = 256) -> str | None:
    return None if data.get(name) is None else _text(data, name, limit)


def _pem(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise GatewayError("gateway-answer-malformed", f"{name} is not a PEM certificate")
    return value


def _number(data: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise GatewayError("gateway-answer-malformed", f"{name} is not a number")
    return float(min(max(value, low), high))  # a gateway cannot make the agent spin or sleep a week


def _texts(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {
        str(language): text[:2000]
        for language, text in value.items()
        if language in ("ja", "en") and isinstance(text, str)
    }


def _fixes(value: object) -> tuple[Fix, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise GatewayError("gateway-answer-malformed", "fixes is not a list")
    fixes = []
    for item in value[:64]:
        if not isinstance(item, Mapping):
            raise GatewayError("gateway-answer-malformed", "a fix is not an object")
        fixes.append(
            Fix(_text(item, "code", 100), _texts(item.get("title")), _texts(item.get("fix")))
        )
    return tuple(fixes)


def _reasons(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, str) and len(r) <= 100 for r in value):
        raise GatewayError("gateway-answer-malformed", "reasons is not a list of codes")
    return tuple(value[:64])


# -- the client -----------------------------------------------------------------------------


class GatewayClient:
    """Talks to one gateway origin. Synchronous: the agent does one thing at a time."""

    def __init__(
        self,
        origin: str,
        *,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        user_agent: str = "tabiji-agent",
    ) -> None:
        self.origin = gateway_origin(origin)
        self.max_answer_bytes = max_answer_bytes
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                # Only the private CA: a gateway with a town-internal CA is not vouched for by the
                # public web's CAs, and they should not vouch for it either.
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as error:
                raise GatewayError("gateway-ca-file-unreadable", f"{ca_file}: {error}") from error
        self._http = httpx.Client(
            base_url=self.origin,
            verify=verify,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": user_agent, "Accept": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- protocol calls --

    def enrol(self, token: str) -> EnrolmentTicket:
        """Send the signed enrolment request (PROTOCOL.md step 1)."""
        _, data = self._post(ENROL_PATH, content=token)
        confirm_url = _text(data, "confirm_url", 1024)
        if not confirm_url.startswith(self.origin + "/"):
            # The link the user is sent to must be on the gateway they named, nowhere else.
            raise GatewayError("gateway-answer-malformed", "confirm_url is on another origin")
        credential = data.get("credential")
        if credential is not None and (
            not isinstance(credential, Mapping)
            or not all(isinstance(v, str) and len(v) <= 8192 for v in credential.values())
        ):
            raise GatewayError("gateway-answer-malformed", "credential is not an object of texts")
        return EnrolmentTicket(
            enrolment_id=_text(data, "enrolment_id"),
            user_code=_text(data, "user_code", 32),
            confirm_url=confirm_url,
            poll_interval=_number(data, "poll_interval", 2, 1, 60),
            expires_in=_number(data, "expires_in", 900, 10, 24 * 3600),
            credential=None if credential is None else {str(k): v for k, v in credential.items()},
        )

    def poll(self, token: str) -> PollAnswer:
        """Ask whether the user (and IT) have confirmed the enrolment (PROTOCOL.md step 3)."""
        _, data = self._post(POLL_PATH, content=token)
        status = data.get("status")
        if status == "waiting-for-user":
            return PollAnswer(status)
        if status == "pending":
            return PollAnswer(status, device_id=_text(data, "device_id", 64))
        if status == "approved":
            return PollAnswer(
                status,
                device_id=_text(data, "device_id", 64),
                certificate=_pem(data, "certificate"),
                ca=_pem(data, "ca") if data.get("ca") is not None else None,
            )
        raise GatewayError("gateway-answer-malformed", f"unknown status {str(status)[:40]!r}")

    def report(self, token: str) -> ReportAnswer:
        """Send one signed posture report; refusals raise GatewayError with the gateway's code."""
        _, data = self._post(REPORT_PATH, content=token)
        if data.get("accepted") is not True:
            raise GatewayError(
                str(data.get("error") or "report-refused")[:100],
                message=_texts(data.get("message")),
            )
        next_in = data.get("next_report_in")
        return ReportAnswer(
            accepted=True,
            status=_optional_text(data, "status", 40),
            reasons=_reasons(data.get("reasons")),
            fixes=_fixes(data.get("fixes")),
            next_report_in=None
            if next_in is None
            else _number(data, "next_report_in", 300, 30, 86400),
        )

    def renew_certificate(self, proof: str) -> CertificateAnswer:
        """A fresh device certificate for an approved device, authorised by a device proof."""
        _, data = self._post(CERTIFICATE_PATH, content=b"", headers={PROOF_HEADER: proof})
        ca = data.get("ca")
        return CertificateAnswer(
            _pem(data, "certificate"), None if ca is None else _pem(data, "ca")
        )

    # -- transport --

    def _post(
        self, path: str, *, content: str | bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        request_headers = {"Content-Type": JWT_TYPE} if content else {}
        request_headers.update(headers or {})
        try:
            with self._http.stream(
                "POST", path, content=content, headers=request_headers
            ) as answer:
                body = self._read_capped(answer)
                return self._interpret(answer, body)
        except httpx.TransportError as error:
            raise GatewayError(_transport_code(error), str(error), retryable=True) from error

    def _read_capped(self, answer: httpx.Response) -> bytes:
        declared = answer.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_answer_bytes:
            raise GatewayError("gateway-answer-too-large", declared, status=answer.status_code)
        chunks, size = [], 0
        for chunk in answer.iter_bytes():
            size += len(chunk)
            if size > self.max_answer_bytes:
                raise GatewayError("gateway-answer-too-large", f"> {self.max_answer_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _interpret(self, answer: httpx.Response, body: bytes) -> tuple[int, dict[str, Any]]:
        status = answer.status_code
        if 300 <= status < 400:
            raise GatewayError(
                "gateway-redirected", answer.headers.get("Location", "")[:200], status=status
            )
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = None
        if status >= 500 or status == 429:
            info = data if isinstance(data, dict) else {}
            raise GatewayError(
                str(
                    info.get("error")
                    or ("rate-limited" if status == 429 else "gateway-unavailable")
                )[:100],
                f"HTTP {status}",
                status=status,
                message=_texts(info.get("message")),
                retryable=True,
                retry_after=_retry_after(answer.headers.get("Retry-After")),
            )
        if not isinstance(data, dict):
            raise GatewayError(
                "gateway-answer-malformed", f"HTTP {status}: not a JSON object", status=status
            )
        if status >= 400:
            raise GatewayError(
                str(data.get("error") or f"http-{status}")[:100],
                f"HTTP {status}",
                status=status,
                message=_texts(data.get("message")),
            )
        return status, data


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), 3600.0)


def _transport_code(error: httpx.TransportError) -> str:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "gateway-tls-untrusted"
        cause = cause.__cause__ or cause.__context__
    if "CERTIFICATE_VERIFY_FAILED" in str(error):
        return "gateway-tls-untrusted"
    if isinstance(error, httpx.TimeoutException):
        return "gateway-timeout"
    return "gateway-unreachable"
