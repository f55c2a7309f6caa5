"""The device key: one interface over where the P-256 key lives — a TPM 2.0 chip when one is
usable (device_agent/tpm.py, loaded lazily), else a 0600 PEM file in the agent's state directory.

Never needs administrator rights. Imports neither tpm2_pytss (only tpm.py does) nor the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.report import KeyStorage, key_thumbprint

KEY_FILE: Final = "device-key.pem"
TPM_KEY_FILE: Final = "device-key.tpm.json"
TCTI_ENV: Final = "TABIJI_AGENT_TCTI"
KERNEL_TPM: Final = Path("/dev/tpmrm0")  # the kernel's resource manager: usable without root
ATTEST_NONCE_LABEL: Final = b"tabiji-tpm-attest\x00"
_POSIX: Final = os.name == "posix"


class KeyStoreError(Exception):
    """The key cannot be created, read or used: `code` is a stable kebab-case reason."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class DeviceKey(Protocol):
    """The device's P-256 key, wherever it lives."""

    @property
    def storage(self) -> KeyStorage: ...

    def signing_key(self) -> AbstractContextManager[ec.EllipticCurvePrivateKey]:
        """A key for report.sign_*: `with key.signing_key() as k: ...`. A TPM key signs inside
        the chip; its handles are loaded on enter and flushed on exit."""
        ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def attestation_evidence(self, nonce: bytes) -> dict[str, str] | None:
        """TPM2_Certify evidence for the gateway (base64 blobs), or None for a software key."""
        ...

    def activate_credential(self, credential: Mapping[str, str]) -> str | None:
        """The secret the gateway sealed to this TPM's EK and AK (base64url), or None."""
        ...


class KeyStore(Protocol):
    """Creates or loads the one device key kept in `directory`."""

    @property
    def kind(self) -> KeyStorage: ...

    @property
    def directory(self) -> Path: ...

    def create(self) -> DeviceKey:
        """A new key; refuses (`key-exists`) to replace one."""
        ...

    def load(self) -> DeviceKey | None:
        """The stored key, None when there is none; KeyStoreError when it is there but unusable."""
        ...


def attestation_nonce(audience: str, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The TPM2_Certify qualifying data for an enrolment: binds the evidence to this gateway and
    this key. gateway/devices/attestation.py computes the same bytes (tests check they agree)."""
    material = ATTEST_NONCE_LABEL + audience.encode("utf-8") + b"\x00"
    return hashlib.sha256(material + key_thumbprint(public_key).encode("ascii")).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# -- private files: created atomically 0600, refused when others can read them -----------------


def ensure_private_directory(directory: Path) -> None:
    """Create the state directory 0700 if missing; refuse one that others may write to (they
    could swap the key file)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _POSIX:
        return
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeyStoreError(
            "key-dir-permissions-too-open",
            f"{directory} is writable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod go-w {directory}",
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) atomically: a temporary file opened O_EXCL with mode 0600
    from the first byte (no world-readable window), synced, then hard-linked into place — the
    link fails if `path` exists, so a key is never overwritten and never seen half written."""
    ensure_private_directory(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, 0o600)
    try:
        try:
            if _POSIX:
                os.fchmod(descriptor, 0o600)  # in case an odd umask or ACL widened it
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError as error:
            raise KeyStoreError("key-exists", f"{path} already holds a device key") from error
    finally:
        temporary.unlink(missing_ok=True)


def read_private_file(path: Path) -> bytes | None:
    """The file's bytes, None when absent; refused when group or others have any permission, or
    when another user owns it (a key someone else could have read or planted)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise KeyStoreError("key-unreadable", f"{path}: {error.strerror}") from error
    try:
        info = os.fstat(descriptor)
        if _POSIX:
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise KeyStoreError(
                    "key-permissions-too-open",
                    f"{path} has mode {mode:04o}, group/others may read it; the key may have "
                    f"leaked — remove it and enrol again, or if it never left: chmod 600 {path}",
                )
            if info.st_uid != os.getuid():
                raise KeyStoreError(
                    "key-wrong-owner", f"{path} belongs to uid {info.st_uid}, not {os.getuid()}"
                )
        chunks = []
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(descriptor)


# -- the software key ---------------------------------------------------------------------------


class FileDeviceKey:
    """A P-256 key held in memory, loaded from the 0600 PEM file."""

    storage: Final[KeyStorage] = "software"

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._private_key = private_key

    @contextmanager
    def _signing_key(self) -> Iterator[ec.EllipticCurvePrivateKey]:
        yield self._private_key

    def signing_key(self) -> AbstractContextManager[ec.EllipticCurvePrivateKey]:
        return self._signing_key()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private_key.public_key()

    def attestation_evidence(self, nonce: bytes) -> dict[str, str] | None:
        return None  # a file key has nothing to attest: the gateway records "software"

    def activate_credential(self, credential: Mapping[str, str]) -> str | None:
        return None


class FileKeyStore:
    """The device key as a PKCS#8 PEM file, mode 0600, in a 0700 directory."""

    kind: Final[KeyStorage] = "software"

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.path = directory / KEY_FILE

    @property
    def directory(self) -> Path:
        return self._directory

    def create(self) -> FileDeviceKey:
        private_key = ec.generate_private_key(ec.SECP256R1())
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(self.path, pem)
        return FileDeviceKey(private_key)

    def load(self) -> FileDeviceKey | None:
        pem = read_private_file(self.path)
        if pem is None:
            return None
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as error:
            raise KeyStoreError("key-invalid", f"{self.path}: not a PEM private key") from error
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise KeyStoreError("key-invalid", f"{self.path}: not a P-256 key")
        return FileDeviceKey(private_key)


# -- choosing the store -------------------------------------------------------------------------


def _tpm_tcti(tcti: str | None) -> str | None:
    """The TCTI to try: the one given, the environment's, or the kernel's resource manager when
    this user may open it (membership of the `tss` group; never root)."""
    if tcti:
        return tcti
    configured = os.environ.get(TCTI_ENV, "").strip()
    if configured:
        return configured
    if KERNEL_TPM.exists() and os.access(KERNEL_TPM, os.R_OK | os.W_OK):
        return f"device:{KERNEL_TPM}"
    return None


def open_key_store(
    directory: Path, *, tcti: str | None = None, prefer_tpm: bool = True
) -> KeyStore:
    """The TPM store when a TPM answers (and tpm2-pytss is installed), else the file store.

    A key already in `directory` decides: a TPM device never silently falls back to a file key
    (loading then fails with `tpm-unavailable`), and a file key stays a file key.
    """
    chosen = _tpm_tcti(tcti)
    has_tpm_key = (directory / TPM_KEY_FILE).exists()
    if has_tpm_key or (prefer_tpm and chosen and not (directory / KEY_FILE).exists()):
        try:
            from device_agent.tpm import TpmKeyStore, tpm_answers
        except ImportError as error:
            if has_tpm_key:
                raise KeyStoreError("tpm-unavailable", f"tpm2-pytss: {error}") from error
            return FileKeyStore(directory)
        if has_tpm_key:
            if chosen is None:
                raise KeyStoreError("tpm-unavailable", "the key is in a TPM that is not reachable")
            return TpmKeyStore(directory, chosen)
        if chosen is not None and tpm_answers(chosen):
            return TpmKeyStore(directory, chosen)
    return FileKeyStore(directory)
