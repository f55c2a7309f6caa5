"""The agent's state on disk: the enrolment record, the report counter and the last report's answer.

Everything lives in one 0700 directory in the user's config dir (XDG on Linux, ~/Library/Application
Support on macOS, %APPDATA% on Windows; TABIJI_AGENT_HOME overrides). Every file is replaced by
write-then-rename, so a crash leaves the old file or the new one, never half of either.
Standard library only: the CLI reads this on every `status`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

HOME_ENV: Final = "TABIJI_AGENT_HOME"
ENROLMENT_FILE: Final = "enrolment.json"
COUNTER_FILE: Final = "counter"
LAST_REPORT_FILE: Final = "last-report.json"
CERTIFICATE_FILE: Final = "device-cert.pem"
CA_FILE: Final = "device-ca.pem"
KEY_DIR: Final = "key"

EnrolmentStatus = Literal["waiting-for-user", "pending", "approved", "revoked"]
ENROLMENT_STATUSES: Final[tuple[str, ...]] = ("waiting-for-user", "pending", "approved", "revoked")


class StateError(Exception):
    """A state file exists but cannot be used: `code` is stable, `path` says which file."""

    def __init__(self, code: str, path: Path, detail: str = "") -> None:
        super().__init__(f"{code}: {path}: {detail}" if detail else f"{code}: {path}")
        self.code = code
        self.path = path
        self.detail = detail


def state_dir() -> Path:
    """Where this user's agent keeps its key and records (created 0700 by `AgentState.ensure`)."""
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "Tabiji" / "agent"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "jp.tabiji.agent"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tabiji-agent"


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: temporary file in the same directory, fsync, rename, fsync dir.

    The rename is atomic on POSIX and NTFS, so readers (and a restart after a crash) see either
    the old content or the new one; a leftover temporary file is ignored by every reader.
    """
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable (POSIX); Windows cannot open a directory and needs no such
    # step.
    if sys.platform == "win32":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateError("state-unreadable", path, str(error)) from error
    try:
        data = json.loads(text)
    except ValueError as error:
        raise StateError("state-corrupt", path, str(error)) from error
    if not isinstance(data, dict):
        raise StateError("state-corrupt", path, "not a JSON object")
    return data


def _json_bytes(value: Mapping[str, object]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


# -- the enrolment record ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What this device is to its gateway. `device_id` is None until the user has confirmed."""

    gateway: str  # the gateway's origin, e.g. "https://gw.example" (= the `aud` of every report)
    status: EnrolmentStatus
    key_storage: str  # "tpm" | "software": where the device key lives (what `status` tells)
    enrolled_at: int  # unix seconds when the enrolment was sent
    device_id: str | None = None
    enrolment_id: str | None = None  # while waiting for the user: lets `enroll` resume polling
    expires_at: int | None = None  # while waiting for the user: when the code stops working
    confirm_url: str | None = None  # while waiting for the user: the link to confirm with
    certificate: str | None = None  # path of the device certificate PEM (once approved)
    ca_file: str | None = None  # the private CA bundle that verifies the gateway's TLS, if any

    def to_json(self) -> dict[str, object]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> Enrolment:
        def text(name: str, required: bool = False) -> str | None:
            value = data.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise StateError("state-corrupt", path, f"{name} is not text")
            return value

        def number(name: str) -> int:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise StateError("state-corrupt", path, f"{name} is not an integer")
            return value

        status = data.get("status")
        if status not in ENROLMENT_STATUSES:
            raise StateError("state-corrupt", path, f"unknown status {status!r}")
        return cls(
            gateway=str(text("gateway", required=True)),
            status=status,
            key_storage=str(text("key_storage", required=True)),
            enrolled_at=number("enrolled_at"),
            device_id=text("device_id"),
            enrolment_id=text("enrolment_id"),
            expires_at=None if data.get("expires_at") is None else number("expires_at"),
            confirm_url=text("confirm_url"),
            certificate=text("certificate"),
            ca_file=text("ca_file"),
        )


# -- the last report and its answer (for `status`) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Fix:
    """One reason the gateway's policies reject this device, with its localised texts."""

    code: str
    title: dict[str, str] = field(default_factory=dict)  # {"ja": …, "en": …}
    fix: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LastReport:
    """The outcome of the latest report attempt, as `status` shows it."""

    at: int  # unix seconds when the answer came
    accepted: bool
    status: str | None = None  # the device's status the gateway gave ("approved" | "pending")
    reasons: tuple[str, ...] = ()
    fixes: tuple[Fix, ...] = ()
    error: str | None = None  # the refusal code when not accepted (or a network failure code)
    message: dict[str, str] = field(default_factory=dict)  # the gateway's localised refusal text

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "accepted": self.accepted,
            "status": self.status,
            "reasons": list(self.reasons),
            "fixes": [asdict(fix) for fix in self.fixes],
            "error": self.error,
            "message": dict(self.message),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path) -> LastReport:
        try:
            at, accepted = data["at"], data["accepted"]
            if not isinstance(at, int) or not isinstance(accepted, bool):
                raise TypeError("at/accepted")
            fixes = tuple(
                Fix(str(item["code"]), _texts(item.get("title")), _texts(item.get("fix")))
                for item in data.get("fixes") or ()
            )
            return cls(
                at=at,
                accepted=accepted,
                status=_optional_text(data.get("status")),
                reasons=tuple(str(reason) for reason in data.get("reasons") or ()),
                fixes=fixes,
                error=_optional_text(data.get("error")),
                message=_texts(data.get("message")),
            )
        except (KeyError, TypeError) as error:
            raise StateError("state-corrupt", path, str(error)) from error


def _texts(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# -- the report counter ----------------------------------------------------------------------


class ReportCounter:
    """A strictly increasing report counter that survives restarts, crashes and a lost file.

    Each value is max(last persisted + 1, clock in milliseconds), persisted *before* it is used.
    Why the clock: every value ever handed out was ≥ the clock at that moment, so after a crash
    that lost the last write (power cut before the rename reached the disk, a restored backup, a
    deleted file) the clock has moved past every value already sent and the gateway — which
    refuses any counter not above the last it accepted — keeps accepting. Why the file: the clock
    alone can step backwards (NTP, a dead RTC battery); the persisted value keeps us above it.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock

    def last(self) -> int:
        """The last persisted value (0 when none yet)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as error:
            raise StateError("state-unreadable", self.path, str(error)) from error
        if not text.isdigit():
            raise StateError("state-corrupt", self.path, "counter is not a number")
        return int(text)

    def next(self) -> int:
        """A value larger than any returned before; durable on disk before it is returned."""
        value = max(self.last() + 1, int(self._clock() * 1000))
        write_atomically(self.path, f"{value}\n".encode("ascii"))
        return value


# -- the directory -----------------------------------------------------------------------------


class AgentState:
    """The agent's files in one directory; every read validates, every write is atomic."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else state_dir()

    @property
    def enrolment_path(self) -> Path:
        return self.directory / ENROLMENT_FILE

    @property
    def key_directory(self) -> Path:
        return self.directory / KEY_DIR

    @property
    def certificate_path(self) -> Path:
        return self.directory / CERTIFICATE_FILE

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE

    def ensure(self) -> None:
        """Create the directory readable by this user only (the key lives below it)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if sys.platform != "win32":
            os.chmod(self.directory, 0o700)

    def counter(self, clock: Callable[[], float] = time.time) -> ReportCounter:
        return ReportCounter(self.directory / COUNTER_FILE, clock)

    def load_enrolment(self) -> Enrolment | None:
        data = _read_json_object(self.enrolment_path)
        return None if data is None else Enrolment.from_json(data, self.enrolment_path)

    def save_enrolment(self, enrolment: Enrolment) -> None:
        self.ensure()
        write_atomically(self.enrolment_path, _json_bytes(enrolment.to_json()))

    def forget_enrolment(self) -> None:
        """Drop the enrolment record (a refused or expired enrolment); the key stays."""
        self.enrolment_path.unlink(missing_ok=True)

    def discard_device(self) -> None:
        """Forget this device entirely — enrolment, reports, certificate and the key itself — so
        `enroll --replace` starts over with a new key (a revoked key can never come back)."""
        for path in (self.enrolment_path, self.directory / LAST_REPORT_FILE):
            path.unlink(missing_ok=True)
        for path in (self.certificate_path, self.ca_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.key_directory, ignore_errors=True)

    def load_last_report(self) -> LastReport | None:
        path = self.directory / LAST_REPORT_FILE
        data = _read_json_object(path)
        return None if data is None else LastReport.from_json(data, path)

    def save_last_report(self, report: LastReport) -> None:
        self.ensure()
        write_atomically(self.directory / LAST_REPORT_FILE, _json_bytes(report.to_json()))

    def save_certificate(self, certificate_pem: str, ca_pem: str | None) -> Path:
        """Store the device certificate (and the device CA) and return the certificate's path."""
        self.ensure()
        write_atomically(self.certificate_path, certificate_pem.encode("ascii"), mode=0o644)
        if ca_pem:
            write_atomically(self.ca_path, ca_pem.encode("ascii"), mode=0o644)
        return self.certificate_path
