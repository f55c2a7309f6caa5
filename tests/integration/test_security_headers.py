"""Security headers on the gateway's own pages, and TLS terminated by the gateway itself (HSTS
only over HTTPS)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import Gateway, Upstream, echo_headers, gateway_config, run_gateway, standard_routes

pytestmark = pytest.mark.integration

OWN_PAGES = ["/.tabiji/healthz", "/.tabiji/readyz", "/.tabiji/nope", "/admin/x", "/dead/x"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Tabiji test CA"))
        .issuer_name(_name("Tabiji test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def ca_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path, Path]:
    """A client TLS context trusting the test CA, and the server's cert and key paths."""
    ca, cert, key = make_ca_and_server_cert(tmp_path_factory.mktemp("pki"))
    return ssl.create_default_context(cafile=str(ca)), cert, key


@pytest.fixture(scope="module")
def tls_gateway(
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
    ca_context: tuple[ssl.SSLContext, Path, Path],
) -> Iterator[Gateway]:
    """A gateway terminating TLS itself with a certificate from the test CA."""
    context, cert, key = ca_context

    def build(port: int) -> dict[str, object]:
        return gateway_config(
            port,
            standard_routes(port, upstream.port),
            public_url=f"https://127.0.0.1:{port}",
            tls={"cert": str(cert), "key": str(key)},
        )

    with run_gateway(
        tmp_path_factory.mktemp("tls"), build, scheme="https", client={"verify": context}
    ) as running:
        yield running


@pytest.mark.parametrize("path", OWN_PAGES)
def test_own_pages_carry_security_headers_without_hsts_over_http(
    gateway: Gateway, path: str
) -> None:
    """Over plain HTTP the gateway's own pages carry a strict CSP and nosniff, but never HSTS."""
    response = httpx.get(gateway.url(path), timeout=10)
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in response.headers


@pytest.mark.parametrize("path", OWN_PAGES)
def test_own_pages_carry_hsts_over_https(
    tls_gateway: Gateway, ca_context: tuple[ssl.SSLContext, Path, Path], path: str
) -> None:
    """Over HTTPS the gateway's own pages add HSTS to the CSP and nosniff."""
    response = httpx.get(tls_gateway.url(path), verify=ca_context[0], timeout=10)
    assert response.headers["strict-transport-security"].startswith("max-age=")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_https_is_forwarded_as_https(
    tls_gateway: Gateway, ca_context: tuple[ssl.SSLContext, Path, Path]
) -> None:
    """A request over the gateway's TLS reaches the upstream with proto https."""
    response = httpx.get(tls_gateway.url("/public/echo"), verify=ca_context[0], timeout=10)
    assert response.status_code == 200
    echo = response.json()
    assert echo_headers(echo, "x-forwarded-proto") == ["https"]
    assert "proto=https" in echo_headers(echo, "forwarded")[0]


def test_tls_rejects_clients_that_do_not_trust_the_ca(tls_gateway: Gateway) -> None:
    """The gateway's certificate is the one configured: a client without the CA rejects it."""
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_gateway.url("/.tabiji/healthz"), timeout=10)


def test_plain_http_to_the_tls_port_is_not_served(tls_gateway: Gateway) -> None:
    """Plain HTTP on the TLS listener gets no page."""
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_gateway.port}/.tabiji/healthz", timeout=5)
