"""`tabiji-agent enroll`: create (or reuse) the device key, send the signed enrolment, let the user
confirm in the browser, poll until the gateway answers, keep the result (PROTOCOL.md "Enrolment").

The flow talks to the user only through `tell(message_id, **values)`, so the CLI prints it in the
chosen language and tests read it as ids. Must not import the gateway.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from device_agent import report
from device_agent.client import EnrolmentTicket, GatewayClient, GatewayError
from device_agent.device import check_certificate_key
from device_agent.keys import DeviceKey, KeyStore, KeyStoreError, attestation_nonce
from device_agent.state import AgentState, Enrolment

log = logging.getLogger("tabiji_agent.enrolment")

Tell = Callable[..., None]  # tell(message_id, **values)
_SERIAL_TIMEOUT: Final = 5.0
_SERIAL_PATTERN: Final = re.compile(r'"IOPlatformSerialNumber"\s*=\s*"([^"]+)"')
_MACOS_SERIAL: Final = ("/usr/sbin/ioreg", "-c", "IOPlatformExpertDevice", "-d", "2")
_WINDOWS_SERIAL: Final = ("-NoProfile", "-Command", "(Get-CimInstance Win32_BIOS).SerialNumber")


class EnrolmentFailed(Exception):
    """The enrolment ended without a device id: `code` says why (stable kebab-case)."""

    def __init__(self, code: str, **values: object) -> None:
        super().__init__(code)
        self.code = code
        self.values = values


@dataclass(frozen=True, slots=True)
class Machine:
    """What the confirm page shows the user about this computer (self-reported, never trusted)."""

    hostname: str
    serial: str
    os: str  # "linux" | "macos" | "windows"


def this_machine() -> Machine:
    os_name = {"darwin": "macos", "win32": "windows"}.get(sys.platform, "linux")
    hostname = socket.gethostname().strip()[:100] or "unknown"  # the gateway takes ≤ 100 chars
    return Machine(hostname=hostname, serial=machine_serial(os_name), os=os_name)


def machine_serial(os_name: str) -> str:
    """The hardware serial number where an ordinary user may read it; "" otherwise (Linux keeps
    it root-only on most machines — the confirm page then shows the host name alone)."""
    try:
        if os_name == "linux":
            return (
                Path("/sys/class/dmi/id/product_serial").read_text(encoding="ascii").strip()[:100]
            )
        if os_name == "macos":
            found = _SERIAL_PATTERN.search(_run_quietly(_MACOS_SERIAL))
            return found.group(1)[:100] if found else ""
        if os_name == "windows":
            system_root = os.environ.get("SYSTEMROOT", r"C:\Windows")  # case-insensitive on Windows
            powershell = rf"{system_root}\System32\WindowsPowerShell\v1.0\powershell.exe"
            return _run_quietly((powershell, *_WINDOWS_SERIAL)).strip()[:100]
    except (OSError, UnicodeDecodeError, subprocess.SubprocessError):
        return ""
    return ""


def _run_quietly(argv: tuple[str, ...]) -> str:
    # Fixed argv with absolute paths, no shell; a slow or missing tool just means "no serial".
    result = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=_SERIAL_TIMEOUT, check=False
    )
    return result.stdout


class Enroller:
    """One enrolment, start to finish. Clock and sleep are injected for tests."""

    def __init__(
        self,
        *,
        state: AgentState,
        key_store: KeyStore,
        client: GatewayClient,
        tell: Tell,
        open_browser: Callable[[str], bool] | None,
        machine: Machine | None = None,
        ca_file: Path | None = None,
        replace: bool = False,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.replace = replace
        self.state = state
        self.key_store = key_store
        self.client = client
        self.origin = client.origin
        self.tell = tell
        self.open_browser = open_browser
        self.machine = machine or this_machine()
        self.ca_file = ca_file
        self.clock = clock
        self.sleep = sleep

    def run(self) -> Enrolment:
        """Enrol and return the saved record (status "pending" or "approved"), or raise
        EnrolmentFailed / GatewayError / KeyStoreError."""
        existing = self.state.load_enrolment()
        if existing is not None and existing.device_id is not None:
            # A revoked device never comes back with its old key (revocation is terminal on
            # the gateway): starting over with a new key is the only way, so it needs no flag.
            if not (self.replace or existing.status == "revoked"):
                raise EnrolmentFailed(
                    "already-enrolled", gateway=existing.gateway, device_id=existing.device_id
                )
            self.tell("enrol-replacing", gateway=existing.gateway, device_id=existing.device_id)
            self.state.discard_device()
            existing = None
        key = self._key()
        if existing is not None and self._resumable(existing):
            try:
                return self._resume(key, existing)
            except EnrolmentFailed as failure:
                if failure.code != "enrolment-expired":
                    raise  # an expired code just means: start again below
        ticket = self._send(key)
        answer = self._activate(key, ticket)
        record = Enrolment(
            gateway=self.origin,
            status="waiting-for-user",
            key_storage=key.storage,
            enrolled_at=int(self.clock()),
            enrolment_id=ticket.enrolment_id,
            expires_at=int(self.clock() + ticket.expires_in),
            confirm_url=ticket.confirm_url,
            ca_file=None if self.ca_file is None else str(self.ca_file.resolve()),
        )
        self.state.save_enrolment(record)
        self.tell("enrol-open-link")
        self.tell("raw", text=f"  {ticket.confirm_url}")
        self.tell("enrol-user-code", code=ticket.user_code)
        if self.open_browser is not None and not self.open_browser(ticket.confirm_url):
            self.tell("enrol-browser-failed")
        self.tell("enrol-waiting", minutes=max(1, round(ticket.expires_in / 60)))
        return self._poll(key, ticket, answer, record)

    def _resumable(self, existing: Enrolment) -> bool:
        return (
            existing.status == "waiting-for-user"
            and existing.gateway == self.origin
            and existing.enrolment_id is not None
            and (existing.expires_at or 0) > self.clock()
        )

    def _resume(self, key: DeviceKey, existing: Enrolment) -> Enrolment:
        """Keep polling an enrolment an earlier run started: the user may have confirmed it
        already (a fresh enrolment of the same key would then be refused as already enrolled)."""
        remaining = float(existing.expires_at or 0) - self.clock()
        ticket = EnrolmentTicket(
            enrolment_id=existing.enrolment_id or "",
            user_code="",
            confirm_url=existing.confirm_url or "",
            poll_interval=2,
            expires_in=remaining,
            credential=None,  # the TPM answer went with the first run's polls
        )
        if existing.confirm_url:
            self.tell("enrol-open-link")
            self.tell("raw", text=f"  {existing.confirm_url}")
        self.tell("enrol-waiting", minutes=max(1, round(remaining / 60)))
        return self._poll(key, ticket, None, existing)

    def _key(self) -> DeviceKey:
        # A key left by an unconfirmed, refused or expired attempt is reused: the gateway only
        # registers a key once a user confirms it.
        key = self.key_store.load()
        if key is None:
            key = self.key_store.create()
        self.tell(f"enrol-key-{key.storage}")
        return key

    def _send(self, key: DeviceKey) -> EnrolmentTicket:
        request: dict[str, object] = {
            "hostname": self.machine.hostname,
            "serial": self.machine.serial,
            "os": self.machine.os,
            "key_storage": key.storage,
        }
        if key.storage == "tpm":
            try:
                evidence = key.attestation_evidence(
                    attestation_nonce(self.origin, key.public_key())
                )
            except KeyStoreError as error:
                evidence = None
                self.tell("enrol-attestation-missing", code=error.code)
            if evidence is not None:
                request["attestation"] = evidence
        with key.signing_key() as signing_key:
            token = report.sign_enrolment(
                signing_key, request=request, audience=self.origin, now=self.clock()
            )
        return self.client.enrol(token)

    def _activate(self, key: DeviceKey, ticket: EnrolmentTicket) -> str | None:
        if ticket.credential is None:
            return None
        try:
            return key.activate_credential(ticket.credential)
        except KeyStoreError as error:
            # Without the answer the gateway records "tpm-claimed" — weaker, but not a refusal.
            log.warning("TPM credential activation failed: %s", error)
            self.tell("enrol-attestation-missing", code=error.code)
            return None

    def _poll(
        self, key: DeviceKey, ticket: EnrolmentTicket, answer: str | None, record: Enrolment
    ) -> Enrolment:
        deadline = self.clock() + ticket.expires_in
        # A TPM credential answer goes out at once: until the gateway has it the key counts as
        # "tpm-claimed", and a user who confirms quickly must not get a device approved (or
        # refused) by a policy on key storage just because the answer was still waiting here.
        delay = 0.0 if answer is not None else ticket.poll_interval
        while self.clock() < deadline:
            if delay > 0:
                self.sleep(delay)
            delay = ticket.poll_interval
            request: dict[str, object] = {"enrolment_id": ticket.enrolment_id}
            if answer is not None:
                request["credential_answer"] = answer
            with key.signing_key() as signing_key:
                token = report.sign_enrolment(
                    signing_key, request=request, audience=self.origin, now=self.clock()
                )
            try:
                polled = self.client.poll(token)
            except GatewayError as error:
                if error.retryable:  # rate limit or network: wait longer and ask again
                    delay = max(error.retry_after or 0.0, ticket.poll_interval * 2, 5.0)
                    continue
                if error.code in ("enrolment-refused", "enrolment-expired"):
                    self.state.forget_enrolment()
                    raise EnrolmentFailed(error.code, gateway=self.origin) from error
                raise
            if polled.status == "waiting-for-user":
                continue
            if polled.device_id is None:  # client.poll never lets this through; fail closed
                raise GatewayError("gateway-answer-malformed", "no device id")
            if polled.status == "approved" and polled.certificate is not None:
                check_certificate_key(polled.certificate, key)
                path = self.state.save_certificate(polled.certificate, polled.ca)
                record = replace(
                    record, status="approved", device_id=polled.device_id, certificate=str(path)
                )
            else:
                record = replace(record, status="pending", device_id=polled.device_id)
            record = replace(record, enrolment_id=None, expires_at=None, confirm_url=None)
            self.state.save_enrolment(record)
            return record
        self.state.forget_enrolment()
        raise EnrolmentFailed("enrolment-expired", gateway=self.origin)
