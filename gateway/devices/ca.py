"""The gateway's device CA: short-lived client-auth certificates for enrolled device keys, and
their verification when a trusted ingress (nginx) forwards a client certificate.

The CA key (P-256) and its self-signed certificate live in a 0700 directory, created on first
use and loaded once. Verification is cached per certificate fingerprint, so the hot path does no
uncached signature checks; only the validity window is compared with `now` each time.
Revocation is the registry's job (a revoked device's certificate names a revoked device).
Rotation without downtime: `prepare` adds a next CA that every gateway trusts but none issues
with, `activate` makes it the issuing CA and keeps the old certificate (not its key) trusted
until `prune` drops it once all it issued has expired. Must not import gateway.settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.report import ReportInvalid, load_public_key
from gateway.devices.model import DeviceError

DEVICE_URI_PREFIX: Final = "urn:tabiji:device:"
KEY_FILE: Final = "device-ca-key.pem"
CERT_FILE: Final = "device-ca.pem"
DEFAULT_LIFETIME: Final = 30 * 86400.0
BACKDATE: Final = 300.0  # not_before this far in the past: laptops' clocks run a little behind
_PEM_BEGIN: Final = "-----BEGIN CERTIFICATE-----"
# One flat directory (a Kubernetes Secret holds no subdirectories): the prepared CA, trusted but
# not yet issuing, and the certificates (never keys) of earlier CAs, named
# retired-device-ca-<unix time retired>-<sha256 prefix>.pem.
NEXT_KEY_FILE: Final = "next-device-ca-key.pem"
NEXT_CERT_FILE: Final = "next-device-ca.pem"
RETIRED_PREFIX: Final = "retired-device-ca-"
BUNDLE_FILE: Final = "device-ca-bundle.pem"  # every trusted CA, for the ingress's client-CA file

log = logging.getLogger("tabiji.devices")


class CARotationError(Exception):
    """A rotation step that does not fit the directory's state (e.g. activate with nothing
    prepared)."""


class TrustedCA(NamedTuple):
    """One CA certificate the gateway accepts device certificates from."""

    role: str  # "current" (issues), "next" (prepared) or "retired"
    certificate: x509.Certificate
    path: Path
    retired_at: float | None  # for "retired": when it stopped issuing


class IssuedCertificate(NamedTuple):
    cert_pem: str
    serial: str  # lowercase hex, as the registry stores it
    not_after: float


class VerifiedCertificate(NamedTuple):
    serial: str
    device_id: str


class _Checked(NamedTuple):
    """What one certificate was found to be, kept per fingerprint."""

    serial: str
    device_id: str
    not_before: float
    not_after: float
    refusal: tuple[str, str] | None  # (code, detail): a certificate that will never verify


class DeviceCA:
    """Issues and verifies device certificates under one CA kept in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        ca_lifetime: float = 10 * 365 * 86400.0,
        common_name: str = "Tabiji device CA",
        cache_size: int = 4096,
    ) -> None:
        self.directory = directory
        self.lifetime = float(lifetime)
        self._ca_lifetime = float(ca_lifetime)
        self._common_name = common_name
        self._cache_size = cache_size
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None
        self._cert_pem = ""
        self._cache: OrderedDict[bytes, _Checked] = OrderedDict()
        self._trusted: tuple[TrustedCA, ...] = ()
        self._stamp: tuple[tuple[int, int] | None, ...] | None = None

    # -- the CA itself ----------------------------------------------------------------------

    def load(self) -> None:
        """Load the CA, creating it on first use (one process creates it; the others wait and
        load the same one). Idempotent."""
        if self._key is not None:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(self.directory / ".lock"):
            key_path, cert_path = self.directory / KEY_FILE, self.directory / CERT_FILE
            if not key_path.exists():
                self._create(key_path, cert_path)
                self._write_bundle(self._read_trusted()[1])
            self._read()

    def _stamp_now(self) -> tuple[tuple[int, int] | None, ...]:
        """What changes when the directory is rotated: a few stat calls, no reads."""
        stamp: list[tuple[int, int] | None] = []
        for path in (
            self.directory / KEY_FILE,
            self.directory / CERT_FILE,
            self.directory / NEXT_CERT_FILE,
            self.directory,  # its mtime changes when a retired certificate comes or goes
        ):
            try:
                info = path.stat()
            except OSError:
                stamp.append(None)
            else:
                stamp.append((info.st_mtime_ns, info.st_ino))
        return tuple(stamp)

    def _read_trusted(
        self,
    ) -> tuple[tuple[ec.EllipticCurvePrivateKey, x509.Certificate, str], tuple[TrustedCA, ...]]:
        """The issuing key and certificate, and every trusted CA; ValueError on a torn state."""
        key_path, cert_path = self.directory / KEY_FILE, self.directory / CERT_FILE
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert_pem = cert_path.read_text(encoding="ascii")
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ValueError(f"{key_path}: the device CA key must be P-256")
        if cert.public_key() != key.public_key():
            raise ValueError(f"{cert_path} does not belong to {key_path}")
        trusted = [TrustedCA("current", cert, cert_path, None)]
        next_cert = self.directory / NEXT_CERT_FILE
        if next_cert.exists():
            trusted.append(TrustedCA("next", _load_ca(next_cert), next_cert, None))
        for path in sorted(self.directory.glob(RETIRED_PREFIX + "*.pem")):
            trusted.append(TrustedCA("retired", _load_ca(path), path, _retired_at(path)))
        return (key, cert, cert_pem), tuple(trusted)

    def _read(self) -> None:
        stamp = self._stamp_now()  # before reading: a change while we read is seen next time
        (key, cert, cert_pem), trusted = self._read_trusted()
        self._key, self._cert, self._cert_pem = key, cert, cert_pem
        self._trusted, self._stamp = trusted, stamp

    def refresh(self) -> bool:
        """Re-read the directory if a rotation changed it (four stat calls otherwise); True if
        it did. A half-written state keeps what is loaded and is read again next time.

        Called before issuing, before handing out the CA certificate, and when a certificate's
        issuer is unknown — never per request for a known certificate."""
        if self._key is None:
            self.load()
            return True
        if self._stamp_now() == self._stamp:
            return False
        try:
            self._read()
        except (OSError, ValueError) as error:
            log.warning("device CA not reloaded, keeping the loaded one: %s", error)
            return False
        self._cache.clear()  # a pruned CA's certificates must not stay verified from the cache
        return True

    def _create(self, key_path: Path, cert_path: Path, common_name: str | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name or self._common_name)]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=BACKDATE))
            .not_valid_after(now + timedelta(seconds=self._ca_lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        # The certificate first: the key's presence is what says the CA is complete.
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    @property
    def ca_pem(self) -> str:
        """The issuing CA certificate (PEM), for the agent (the ingress wants `bundle_pem`)."""
        self.refresh()
        return self._cert_pem

    # -- rotation (the CLI on the host: `tabiji devices ca …`) -------------------------------

    def trusted(self) -> tuple[TrustedCA, ...]:
        """Every CA a device certificate is accepted from: current, next and retired."""
        self.refresh()
        return self._trusted

    @property
    def bundle_pem(self) -> str:
        """Every trusted CA certificate (PEM, concatenated): the ingress's client-CA file."""
        return _bundle(self.trusted())

    def _write_bundle(self, trusted: tuple[TrustedCA, ...]) -> None:
        _write_private(self.directory / BUNDLE_FILE, _bundle(trusted).encode("ascii"), 0o644)

    def prepare(self, now: float) -> x509.Certificate:
        """Create the next CA: from now on every gateway reading this directory accepts its
        certificates, but the current CA still issues. Rewrites the bundle."""
        self.load()
        with _locked(self.directory / ".lock"):
            next_key, next_cert = self.directory / NEXT_KEY_FILE, self.directory / NEXT_CERT_FILE
            if next_key.exists():
                raise CARotationError(f"{next_key}: a next CA is already prepared; activate it")
            stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M")
            self._create(next_key, next_cert, f"{self._common_name} {stamp}")
            self._read()
            self._write_bundle(self._trusted)
            return _load_ca(next_cert)

    def activate(self, now: float) -> tuple[x509.Certificate, x509.Certificate]:
        """Make the prepared CA the issuing one; the old certificate is kept as retired (still
        trusted), its key is overwritten. Returns (old, new) certificates."""
        self.load()
        with _locked(self.directory / ".lock"):
            self._read()
            next_key, next_cert = self.directory / NEXT_KEY_FILE, self.directory / NEXT_CERT_FILE
            if not next_key.exists() or not next_cert.exists():
                raise CARotationError(
                    f"{self.directory}: no next CA; run `tabiji devices ca prepare` first"
                )
            old = self._cert
            assert old is not None
            name = f"{RETIRED_PREFIX}{int(now)}-{old.fingerprint(hashes.SHA256()).hex()[:16]}.pem"
            # Retired first: the old CA never stops being trusted, whatever step we stop at.
            retired = old.public_bytes(serialization.Encoding.PEM)
            _write_private(self.directory / name, retired, 0o644)
            # A gateway reading between these two renames sees a key that does not match the
            # certificate, keeps what it has loaded and reads again on its next look.
            os.replace(next_cert, self.directory / CERT_FILE)
            os.replace(next_key, self.directory / KEY_FILE)
            self._read()
            self._cache.clear()
            self._write_bundle(self._trusted)
            assert self._cert is not None
            return old, self._cert

    def prune(self, now: float, keep: float) -> list[TrustedCA]:
        """Forget retired CAs that stopped issuing more than `keep` seconds ago (set it to the
        certificate lifetime: all they issued has expired) or that have expired themselves."""
        self.load()
        with _locked(self.directory / ".lock"):
            self._read()
            gone = [
                ca
                for ca in self._trusted
                if ca.role == "retired"
                and (
                    (ca.retired_at is not None and ca.retired_at + keep <= now)
                    or ca.certificate.not_valid_after_utc.timestamp() <= now
                )
            ]
            for ca in gone:
                ca.path.unlink()
            if gone:
                self._read()
                self._cache.clear()
                self._write_bundle(self._trusted)
            return gone

    # -- issuing ----------------------------------------------------------------------------

    def issue(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey | str,
        *,
        now: float,
        lifetime: float | None = None,
    ) -> IssuedCertificate:
        """A client-auth certificate for the device's own key (renewal: issue again)."""
        self.refresh()  # after `activate`, issue with the new CA at once
        assert self._key is not None
        assert self._cert is not None
        if not device_id or not device_id.isprintable() or len(device_id) > 64:
            raise DeviceError(code="device-certificate-invalid", detail="bad device id")
        if isinstance(public_key, str):
            try:
                public_key = load_public_key(public_key)
            except ReportInvalid as exc:
                raise DeviceError(code="device-key-invalid", detail=exc.detail) from exc
        # Whole seconds: X.509 times have no fractions, and not_after must be what is signed.
        start = datetime.fromtimestamp(int(now - BACKDATE), UTC)
        end = datetime.fromtimestamp(
            int(now + (self.lifetime if lifetime is None else lifetime)), UTC
        )
        ca_end = self._cert.not_valid_after_utc
        end = min(end, ca_end)  # never outlive the CA
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return IssuedCertificate(pem, format(serial, "x"), end.timestamp())

    # -- verifying --------------------------------------------------------------------------

    def verify(self, cert: str | bytes, *, now: float) -> VerifiedCertificate:
        """The serial and device of a certificate this CA issued, if valid at `now`.

        `cert`: PEM text, nginx's URL-encoded PEM ($ssl_client_escaped_cert), or DER bytes.
        DeviceError device-certificate-invalid | -expired | -untrusted (status 403).
        """
        raw = cert.encode("utf-8", "replace") if isinstance(cert, str) else bytes(cert)
        fingerprint = hashlib.sha256(raw).digest()
        checked = self._cache.get(fingerprint)
        if checked is None:
            checked = self._check(cert)
            self._cache[fingerprint] = checked
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(fingerprint)
        if checked.refusal is not None:
            # A new error each time: re-raising one instance would grow its traceback forever.
            raise DeviceError(checked.refusal[0], checked.refusal[1], 403)
        if now >= checked.not_after:
            # Signed by our CA, so the device is known: IT sees which one holds a stale certificate.
            raise DeviceError(
                code="device-certificate-expired",
                detail=checked.serial,
                status=403,
                device_id=checked.device_id,
            )
        if now < checked.not_before:
            raise DeviceError(
                "device-certificate-invalid", "not valid yet", 403, device_id=checked.device_id
            )
        return VerifiedCertificate(checked.serial, checked.device_id)

    def _check(self, given: str | bytes) -> _Checked:
        """The uncached part: parse, check the signature and the certificate's shape."""
        self.load()
        assert self._cert is not None

        def refused(*, code: str, detail: str) -> _Checked:
            return _Checked("", "", 0.0, 0.0, (code, detail))

        try:
            cert = _parse(given)
        except ValueError as exc:
            return refused(code="device-certificate-invalid", detail=f"unreadable: {exc}"[:120])
        problem = self._issuer_problem(cert)
        if problem is not None and self.refresh():  # a CA prepared since we last looked
            problem = self._issuer_problem(cert)
        if problem is not None:
            return refused(code="device-certificate-untrusted", detail=problem)
        try:
            device_id = _device_id(cert)
        except (ValueError, x509.ExtensionNotFound) as exc:
            return refused(code="device-certificate-invalid", detail=str(exc)[:100])
        return _Checked(
            format(cert.serial_number, "x"),
            device_id,
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
            None,
        )

    def _issuer_problem(self, cert: x509.Certificate) -> str | None:
        """None when one of the trusted CAs signed `cert`, else why not."""
        named = [ca for ca in self._trusted if ca.certificate.subject == cert.issuer]
        if not named:
            return "issued by another CA"
        for ca in named:
            try:
                cert.verify_directly_issued_by(ca.certificate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return None
        return "not signed by the device CA"


def _load_ca(path: Path) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise ValueError(f"{path}: not a CA certificate")
    return cert


def _retired_at(path: Path) -> float | None:
    """When a retired CA stopped issuing, from its file name (None: placed by hand, unknown)."""
    try:
        return float(path.name.removeprefix(RETIRED_PREFIX).split("-", 1)[0])
    except ValueError:
        return None


def _bundle(trusted: tuple[TrustedCA, ...]) -> str:
    return "".join(
        ca.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii") for ca in trusted
    )


def _parse(given: str | bytes) -> x509.Certificate:
    if isinstance(given, bytes):
        if given.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(given.strip())
        return x509.load_der_x509_certificate(given)
    text = given.strip()
    if not text.startswith(_PEM_BEGIN) and "%" in text:
        text = unquote(text).strip()  # nginx's $ssl_client_escaped_cert
    if not text.startswith(_PEM_BEGIN):
        raise ValueError("not a PEM certificate")
    return x509.load_pem_x509_certificate(text.encode("ascii", "replace"))


def _device_id(cert: x509.Certificate) -> str:
    """The device a client certificate names, if it is one of ours in every respect."""
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.ca:
        raise ValueError("a CA certificate is not a device certificate")
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ValueError("not a client-auth certificate")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    ids = [u[len(DEVICE_URI_PREFIX) :] for u in uris if u.startswith(DEVICE_URI_PREFIX)]
    if len(ids) != 1 or not ids[0]:
        raise ValueError("no single device URI")
    return ids[0]


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write beside, then rename: a crash never leaves half a key; nobody else can read it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (workers creating the CA together)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
