"""The device CA: created once in a private directory, issues client-auth certificates bound to
the device key and id, and verifies them (cached) — refusing expired, foreign and malformed ones."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from registry_helpers import T0, make_key, new_device

from gateway.devices.ca import DEVICE_URI_PREFIX, DeviceCA
from gateway.devices.model import DeviceError
from gateway.devices.registry import DeviceRegistry
from gateway.devices.store_sqlite import SqliteDeviceStore

DAY = 86400.0


def refused(ca: DeviceCA, cert: str | bytes, now: float) -> str:
    with pytest.raises(DeviceError) as caught:
        ca.verify(cert, now=now)
    assert caught.value.status == 403
    return caught.value.code


def test_the_ca_is_created_once_and_kept_private(tmp_path: Path) -> None:
    """First use creates a P-256 CA in a 0700 directory (key 0600); a second instance (another
    worker) loads the very same CA."""
    directory = tmp_path / "device-ca"
    ca = DeviceCA(directory)
    pem = ca.ca_pem
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "device-ca-key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert DeviceCA(directory).ca_pem == pem
    assert not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_issued_certificate_is_a_client_certificate_for_the_device(tmp_path: Path) -> None:
    """The certificate carries the device's key, clientAuth, the device URI and 30 days' life."""
    ca = DeviceCA(tmp_path / "ca")
    key = make_key()
    now = time.time()
    issued = ca.issue("dev-1", key.public_key(), now=now)
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [DEVICE_URI_PREFIX + "dev-1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.serial == format(cert.serial_number, "x")
    assert issued.not_after == cert.not_valid_after_utc.timestamp()
    assert abs(issued.not_after - (now + 30 * DAY)) < 2
    short = ca.issue("dev-1", key.public_key(), now=now, lifetime=3600)
    assert abs(short.not_after - (now + 3600)) < 2
    assert DeviceCA(tmp_path / "ca", lifetime=7 * DAY).issue("dev-1", key.public_key(), now=now)


def test_verify_names_the_serial_and_device(tmp_path: Path) -> None:
    """A certificate from this CA verifies as PEM, nginx's URL-encoded PEM, or DER."""
    ca = DeviceCA(tmp_path / "ca")
    now = time.time()
    issued = ca.issue("dev-42", make_key().public_key(), now=now)
    assert ca.verify(issued.cert_pem, now=now) == (issued.serial, "dev-42")
    assert ca.verify(quote(issued.cert_pem), now=now) == (issued.serial, "dev-42")
    der = x509.load_pem_x509_certificate(issued.cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert ca.verify(der, now=now).device_id == "dev-42"
    assert ca.verify(issued.cert_pem.encode(), now=now).serial == issued.serial
    fresh_process = DeviceCA(tmp_path / "ca")
    assert fresh_process.verify(issued.cert_pem, now=now).device_id == "dev-42"


def test_an_expired_certificate_is_refused_even_when_cached(tmp_path: Path) -> None:
    """After not_after the certificate is device-certificate-expired, though its check is cached;
    before not_before it is invalid."""
    ca = DeviceCA(tmp_path / "ca")
    now = time.time()
    issued = ca.issue("dev-1", make_key().public_key(), now=now, lifetime=3600)
    assert ca.verify(issued.cert_pem, now=now).device_id == "dev-1"
    assert refused(ca, issued.cert_pem, now + 3601) == "device-certificate-expired"
    assert refused(ca, issued.cert_pem, now - 3600) == "device-certificate-invalid"
    with pytest.raises(DeviceError) as expired:
        ca.verify(issued.cert_pem, now=now + 3601)
    assert expired.value.device_id == "dev-1"  # our CA signed it: which device is known


def test_certificates_of_another_ca_are_untrusted(tmp_path: Path) -> None:
    """A certificate issued by another device CA — even one with the same name — is untrusted."""
    ours, theirs = DeviceCA(tmp_path / "ours"), DeviceCA(tmp_path / "theirs")
    now = time.time()
    foreign = theirs.issue("dev-1", make_key().public_key(), now=now)
    assert refused(ours, foreign.cert_pem, now) == "device-certificate-untrusted"
    renamed = DeviceCA(tmp_path / "other", common_name="Somebody else's CA")
    other = renamed.issue("dev-1", make_key().public_key(), now=now)
    assert refused(ours, other.cert_pem, now) == "device-certificate-untrusted"


def test_malformed_and_misshapen_certificates_are_invalid(tmp_path: Path) -> None:
    """Garbage, the CA's own certificate, and CA-signed certificates without the device URI or
    without clientAuth are device-certificate-invalid."""
    directory = tmp_path / "ca"
    ca = DeviceCA(directory)
    now = time.time()
    assert refused(ca, "not a certificate", now) == "device-certificate-invalid"
    assert refused(ca, b"\x30\x03\x02\x01\x00", now) == "device-certificate-invalid"
    assert refused(ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", now) == (
        "device-certificate-invalid"
    )
    assert refused(ca, ca.ca_pem, now) == "device-certificate-invalid"
    ca_key = serialization.load_pem_private_key(
        (directory / "device-ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(ca.ca_pem.encode()).subject

    def signed(*extensions: x509.ExtensionType) -> str:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
            .issuer_name(issuer)
            .public_key(make_key().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    uri = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + "dev-1")])
    client = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    server = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert ca.verify(signed(client, uri), now=now).device_id == "dev-1"  # the shape is enough
    assert refused(ca, signed(client), now) == "device-certificate-invalid"
    assert refused(ca, signed(uri), now) == "device-certificate-invalid"
    assert refused(ca, signed(server, uri), now) == "device-certificate-invalid"
    assert refused(ca, ca.ca_pem, now) == "device-certificate-invalid"  # refusals are cached too


def test_issue_refuses_a_bad_key_or_id(tmp_path: Path) -> None:
    """Only a P-256 public key and a printable device id get a certificate."""
    ca = DeviceCA(tmp_path / "ca")
    with pytest.raises(DeviceError) as bad_key:
        ca.issue("dev-1", "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----", now=T0)
    assert bad_key.value.code == "device-key-invalid"
    with pytest.raises(DeviceError) as bad_id:
        ca.issue("dev\n1", make_key().public_key(), now=T0)
    assert bad_id.value.code == "device-certificate-invalid"
    device, _ = new_device()
    assert ca.issue(device.id, device.public_key_pem, now=time.time()).cert_pem


@pytest.mark.anyio
async def test_renewal_and_revocation_through_the_registry(tmp_path: Path) -> None:
    """Renewal issues a new certificate whose serial the registry then knows; after revocation
    the certificate still verifies cryptographically but names a revoked device."""
    ca = DeviceCA(tmp_path / "ca")
    registry = DeviceRegistry(SqliteDeviceStore(tmp_path / "devices.db"))
    await registry.start()
    try:
        device = await registry.add(new_device(status="approved")[0])
        now = time.time()
        first = ca.issue(device.id, device.public_key_pem, now=now)
        await registry.set_certificate(device.id, first.serial, first.not_after, now=now)
        renewed = ca.issue(device.id, device.public_key_pem, now=now + DAY)
        assert renewed.serial != first.serial
        await registry.set_certificate(device.id, renewed.serial, renewed.not_after, now=now)
        serial, device_id = ca.verify(renewed.cert_pem, now=now + DAY)
        assert registry.by_cert_serial_cached(serial).id == device_id  # type: ignore[union-attr]
        await registry.revoke(device.id, now=now, actor="it")
        _, device_id = ca.verify(renewed.cert_pem, now=now + DAY)
        assert registry.get_cached(device_id).status == "revoked"  # type: ignore[union-attr]
    finally:
        await registry.stop()
