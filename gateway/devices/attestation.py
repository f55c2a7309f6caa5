"""TPM attestation of a device key, checked by the gateway (issue #6 point 1).

The agent sends TPM2_Certify evidence: its device key certified by an attestation key (AK), and
the TPM's endorsement key (EK) certificate. The gateway checks the EK certificate chains to a
configured TPM-manufacturer CA, the certification (signature, magic, type, nonce, name), and then
runs TPM2_MakeCredential in software: a secret only a TPM holding *both* that EK and that AK can
recover with TPM2_ActivateCredential. Verified evidence and the right secret back → key_storage
"tpm"; anything less → "tpm-claimed".

Pure `cryptography` + stdlib: the gateway host needs no libtss2 (never import tpm2_pytss here).
References: TPM 2.0 Library Part 1 (§11.4.10 KDFs, §24 credential protection), Part 2
(structures), Part 3 (TPM2_Certify, TPM2_MakeCredential); TCG EK Credential Profile 2.0.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from device_agent.report import key_thumbprint
from gateway.devices.model import DeviceError

try:  # cryptography ≥ 47 keeps CFB among the "decrepit" modes; the TPM still uses it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

EVIDENCE_FORMAT: Final = "tpm2-certify-v1"
CREDENTIAL_FORMAT: Final = "tpm2-credential-v1"
EVIDENCE_MEMBERS: Final = (
    "ek_cert",
    "ek_public",
    "ak_public",
    "device_key_public",
    "certify_info",
    "certify_signature",
)
MAX_BLOB: Final = 8192  # an EK certificate is ~1-2 KiB, TPM structures far less
ATTEST_NONCE_LABEL: Final = b"tabiji-tpm-attest\x00"  # == device_agent.keys.ATTEST_NONCE_LABEL
SECRET_BYTES: Final = 32

# TPM 2.0 Part 2 constants.
TPM_GENERATED_VALUE: Final = 0xFF544347  # "\xffTCG": only the TPM writes this magic
TPM_ST_ATTEST_CERTIFY: Final = 0x8017
ALG_RSA, ALG_SHA1, ALG_AES, ALG_SHA256, ALG_SHA384, ALG_SHA512 = 0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0D
ALG_NULL, ALG_RSASSA, ALG_RSAES, ALG_RSAPSS, ALG_OAEP = 0x10, 0x14, 0x15, 0x16, 0x17
ALG_ECDSA, ALG_ECDH, ALG_ECDAA, ALG_ECC, ALG_CFB = 0x18, 0x19, 0x1A, 0x23, 0x43
ECC_NIST_P256, ECC_NIST_P384 = 0x0003, 0x0004
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 0x2, 0x10, 0x20
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
FIXED_IN_TPM: Final = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN

_HASHES: Final[dict[int, Callable[[], hashes.HashAlgorithm]]] = {
    ALG_SHA256: hashes.SHA256,
    ALG_SHA384: hashes.SHA384,
    ALG_SHA512: hashes.SHA512,
}
_HASHLIB: Final = {ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
_CURVES: Final[dict[int, Callable[[], ec.EllipticCurve]]] = {
    ECC_NIST_P256: ec.SECP256R1,
    ECC_NIST_P384: ec.SECP384R1,
}
_SCHEMES_WITH_HASH: Final = frozenset({ALG_RSASSA, ALG_RSAPSS, ALG_OAEP, ALG_ECDSA, ALG_ECDH})


class AttestationInvalid(DeviceError):
    """Evidence or a credential answer that does not prove a TPM-held key: `code` says why.

    Not a refusal of the enrolment: the device is then recorded as "tpm-claimed".
    """


# -- small explicit big-endian parsers --------------------------------------------------------


class _Reader:
    """Reads TPM's big-endian wire format; refuses truncation and (at `end`) trailing bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise AttestationInvalid(
                "attestation-truncated",
                f"{self.what}: {count} bytes needed at offset {self.offset}, "
                f"{len(self.data) - self.offset} left",
            )
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def sized(self) -> bytes:
        """A TPM2B: a 16-bit size and that many bytes."""
        return self.take(self.u16())

    def end(self) -> None:
        if self.offset != len(self.data):
            raise AttestationInvalid(
                "attestation-trailing-bytes",
                f"{self.what}: {len(self.data) - self.offset} bytes after the structure",
            )


def _outer(blob: bytes, what: str) -> bytes:
    """The contents of a TPM2B that must fill `blob` exactly."""
    reader = _Reader(blob, what)
    inner = reader.sized()
    reader.end()
    if not inner:
        raise AttestationInvalid("attestation-truncated", f"{what}: empty")
    return inner


@dataclass(frozen=True, slots=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC (RSA or ECC); `area` is its exact marshalled bytes."""

    area: bytes
    type: int
    name_alg: int
    attributes: int
    symmetric: tuple[int, int, int]  # (algorithm, key bits, mode); (ALG_NULL, 0, 0) when none
    scheme: int
    scheme_hash: int
    curve: int = 0
    x: bytes = b""
    y: bytes = b""
    rsa_bits: int = 0
    exponent: int = 0
    modulus: bytes = b""

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1 §16)."""
        return (
            struct.pack(">H", self.name_alg)
            + hashlib.new(_HASHLIB[self.name_alg], self.area).digest()
        )

    def has(self, attributes: int) -> bool:
        return self.attributes & attributes == attributes

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        try:
            if self.type == ALG_ECC:
                x, y = int.from_bytes(self.x, "big"), int.from_bytes(self.y, "big")
                return ec.EllipticCurvePublicNumbers(x, y, _CURVES[self.curve]()).public_key()
            exponent = self.exponent or 65537  # 0 means the default exponent (Part 2 §12.2.3.5)
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.modulus, "big")).public_key()
        except ValueError as error:
            raise AttestationInvalid("attestation-malformed", f"public key: {error}") from error


def parse_public(blob: bytes, what: str = "public") -> TpmPublic:
    """A TPM2B_PUBLIC holding an RSA or ECC key (Part 2 §12.2.5)."""
    area = _outer(blob, what)
    reader = _Reader(area, what)
    kind, name_alg, attributes = reader.u16(), reader.u16(), reader.u32()
    if kind not in (ALG_RSA, ALG_ECC):
        raise AttestationInvalid("attestation-unsupported", f"{what}: key type {kind:#06x}")
    if name_alg not in _HASHES:
        raise AttestationInvalid("attestation-unsupported", f"{what}: nameAlg {name_alg:#06x}")
    reader.sized()  # authPolicy: part of the name, not otherwise needed
    symmetric_alg = reader.u16()
    symmetric = (symmetric_alg, 0, 0)
    if symmetric_alg != ALG_NULL:
        symmetric = (symmetric_alg, reader.u16(), reader.u16())
    scheme, scheme_hash = reader.u16(), ALG_NULL
    if scheme in _SCHEMES_WITH_HASH:
        scheme_hash = reader.u16()
    elif scheme == ALG_ECDAA:
        scheme_hash = reader.u16()
        reader.u16()  # count
    elif scheme not in (ALG_NULL, ALG_RSAES):
        raise AttestationInvalid("attestation-unsupported", f"{what}: scheme {scheme:#06x}")
    common = (area, kind, name_alg, attributes, symmetric, scheme, scheme_hash)
    if kind == ALG_ECC:
        curve = reader.u16()
        if reader.u16() != ALG_NULL:
            reader.u16()  # a KDF's hash: keys we accept have none, but parse it honestly
        x, y = reader.sized(), reader.sized()
        reader.end()
        if curve not in _CURVES:
            raise AttestationInvalid("attestation-unsupported", f"{what}: curve {curve:#06x}")
        return TpmPublic(*common, curve=curve, x=x, y=y)
    bits, exponent, modulus = reader.u16(), reader.u32(), reader.sized()
    reader.end()
    return TpmPublic(*common, rsa_bits=bits, exponent=exponent, modulus=modulus)


@dataclass(frozen=True, slots=True)
class CertifyInfo:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY; `raw` is what the AK signed."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    certified_name: bytes
    certified_qualified_name: bytes


def parse_certify_info(blob: bytes) -> CertifyInfo:
    """A TPM2B_ATTEST from TPM2_Certify (Part 2 §10.12.12)."""
    raw = _outer(blob, "certify_info")
    reader = _Reader(raw, "certify_info")
    magic, kind = reader.u32(), reader.u16()
    if magic != TPM_GENERATED_VALUE:
        raise AttestationInvalid("attestation-bad-magic", f"magic {magic:#010x}")
    if kind != TPM_ST_ATTEST_CERTIFY:
        raise AttestationInvalid("attestation-wrong-type", f"attestation type {kind:#06x}")
    qualified_signer, extra_data = reader.sized(), reader.sized()
    reader.take(8 + 4 + 4 + 1 + 8)  # clockInfo and firmwareVersion: not used for a decision
    name, qualified_name = reader.sized(), reader.sized()
    reader.end()
    return CertifyInfo(raw, magic, kind, qualified_signer, extra_data, name, qualified_name)


@dataclass(frozen=True, slots=True)
class TpmSignature:
    """A parsed TPMT_SIGNATURE (ECDSA, RSASSA or RSAPSS)."""

    algorithm: int
    hash: int
    r: bytes = b""
    s: bytes = b""
    rsa: bytes = b""


def parse_signature(blob: bytes) -> TpmSignature:
    reader = _Reader(blob, "certify_signature")
    algorithm, digest = reader.u16(), reader.u16()
    if algorithm == ALG_ECDSA:
        signature = TpmSignature(algorithm, digest, r=reader.sized(), s=reader.sized())
    elif algorithm in (ALG_RSASSA, ALG_RSAPSS):
        signature = TpmSignature(algorithm, digest, rsa=reader.sized())
    else:
        raise AttestationInvalid("attestation-unsupported", f"signature alg {algorithm:#06x}")
    reader.end()
    return signature


def _verify_signature(key: TpmPublic, signature: TpmSignature, message: bytes) -> None:
    """The AK's signature over the TPMS_ATTEST bytes, in the AK's own scheme."""
    if signature.hash not in _HASHES or (
        key.scheme != ALG_NULL
        and (signature.algorithm, signature.hash) != (key.scheme, key.scheme_hash)
    ):
        raise AttestationInvalid("attestation-bad-signature", "signature scheme is not the AK's")
    digest = _HASHES[signature.hash]()
    public = key.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and signature.algorithm == ALG_ECDSA:
            der = encode_dss_signature(
                int.from_bytes(signature.r, "big"), int.from_bytes(signature.s, "big")
            )
            public.verify(der, message, ec.ECDSA(digest))
        elif isinstance(public, rsa.RSAPublicKey) and signature.algorithm == ALG_RSASSA:
            public.verify(signature.rsa, message, padding.PKCS1v15(), digest)
        elif isinstance(public, rsa.RSAPublicKey) and signature.algorithm == ALG_RSAPSS:
            pss = padding.PSS(padding.MGF1(digest), padding.PSS.AUTO)
            public.verify(signature.rsa, message, pss, digest)
        else:
            raise AttestationInvalid("attestation-bad-signature", "signature does not fit the AK")
    except InvalidSignature as error:
        raise AttestationInvalid("attestation-bad-signature", "AK signature invalid") from error


# -- TPM2_MakeCredential in software -----------------------------------------------------------


def kdfa(
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, *, bits: int
) -> bytes:
    """KDFa (Part 1 §11.4.10.2): SP 800-108 counter-mode HMAC,
    K(i) = HMAC(key, [i]32 || label || 0x00 || contextU || contextV || [bits]32)."""
    name = _HASHLIB[hash_alg]
    output = b""
    counter = 0
    while len(output) * 8 < bits:
        counter += 1
        data = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
        output += hmac.new(key, data + struct.pack(">I", bits), name).digest()
    return output[: bits // 8]


def kdfe(
    hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, *, bits: int
) -> bytes:
    """KDFe (Part 1 §11.4.10.3): SP 800-56A concatenation KDF,
    K(i) = H([i]32 || Z || label || 0x00 || partyUInfo || partyVInfo)."""
    output = b""
    counter = 0
    while len(output) * 8 < bits:
        counter += 1
        data = struct.pack(">I", counter) + z + label + b"\x00" + party_u + party_v
        output += hashlib.new(_HASHLIB[hash_alg], data).digest()
    return output[: bits // 8]


@dataclass(frozen=True, slots=True)
class CredentialChallenge:
    """What TPM2_MakeCredential produced: the agent passes both to TPM2_ActivateCredential."""

    credential_blob: bytes  # TPM2B_ID_OBJECT
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET

    def to_json(self) -> dict[str, str]:
        return {
            "format": CREDENTIAL_FORMAT,
            "credential_blob": base64.b64encode(self.credential_blob).decode("ascii"),
            "encrypted_secret": base64.b64encode(self.encrypted_secret).decode("ascii"),
        }


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _seed_for(ek: TpmPublic) -> tuple[bytes, bytes]:
    """A fresh seed and its encryption to the EK (Part 1 §24.4 / Annex B.10.3, C.6.4):
    RSA-OAEP with label "IDENTITY\\0", or ephemeral ECDH + KDFe("IDENTITY") for an ECC EK."""
    digest_size = hashlib.new(_HASHLIB[ek.name_alg]).digest_size
    public = ek.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        seed = secrets.token_bytes(digest_size)
        digest = _HASHES[ek.name_alg]()
        oaep = padding.OAEP(padding.MGF1(digest), _HASHES[ek.name_alg](), b"IDENTITY\x00")
        return seed, public.encrypt(seed, oaep)
    ephemeral = ec.generate_private_key(public.curve)
    size = (public.curve.key_size + 7) // 8
    point = ephemeral.public_key().public_numbers()
    ephemeral_x, ephemeral_y = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
    z = ephemeral.exchange(ec.ECDH(), public)
    ek_x = public.public_numbers().x.to_bytes(size, "big")
    seed = kdfe(ek.name_alg, z, b"IDENTITY", ephemeral_x, ek_x, bits=digest_size * 8)
    return seed, _sized(ephemeral_x) + _sized(ephemeral_y)  # a TPMS_ECC_POINT


def make_credential(ek: TpmPublic, ak_name: bytes, secret: bytes) -> CredentialChallenge:
    """TPM2_MakeCredential (Part 3 §12.6, Part 1 §24): `secret` sealed so that only the TPM
    holding the EK's private key, with an object named `ak_name` loaded, can recover it."""
    symmetric_alg, symmetric_bits, symmetric_mode = ek.symmetric
    if symmetric_alg != ALG_AES or symmetric_mode != ALG_CFB or symmetric_bits not in (128, 256):
        raise AttestationInvalid("attestation-ek-unsupported", "EK symmetric is not AES-CFB")
    if not 0 < len(secret) <= hashlib.new(_HASHLIB[ek.name_alg]).digest_size:
        raise AttestationInvalid("attestation-malformed", "credential secret size")
    seed, encrypted_seed = _seed_for(ek)
    symmetric_key = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", bits=symmetric_bits)
    encryptor = Cipher(algorithms.AES(symmetric_key), CFB(bytes(16))).encryptor()
    encrypted_identity = encryptor.update(_sized(secret)) + encryptor.finalize()
    digest_bits = hashlib.new(_HASHLIB[ek.name_alg]).digest_size * 8
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", bits=digest_bits)
    outer_hmac = hmac.new(hmac_key, encrypted_identity + ak_name, _HASHLIB[ek.name_alg]).digest()
    blob = _sized(_sized(outer_hmac) + encrypted_identity)
    return CredentialChallenge(credential_blob=blob, encrypted_secret=_sized(encrypted_seed))


# -- the verifier -------------------------------------------------------------------------------


def attestation_nonce(audience: str, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The qualifying data the agent certified with: SHA-256 of a label, the gateway origin and
    the key's RFC 7638 thumbprint (the same formula as device_agent.keys.attestation_nonce)."""
    material = ATTEST_NONCE_LABEL + audience.encode("utf-8") + b"\x00"
    return hashlib.sha256(material + key_thumbprint(public_key).encode("ascii")).digest()


def _blob(evidence: Mapping[str, str], member: str) -> bytes:
    value = evidence.get(member)
    if not isinstance(value, str) or not value or len(value) > MAX_BLOB * 4 // 3 + 4:
        raise AttestationInvalid("attestation-malformed", f"{member} missing or too large")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AttestationInvalid("attestation-malformed", f"{member}: not base64") from error


def _same_public_key(a: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, b: object) -> bool:
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    return False


class AttestationVerifier:
    """Checks TPM2_Certify evidence against the configured EK CA certificates."""

    def __init__(
        self,
        ca_certs: Sequence[x509.Certificate],
        *,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        if not ca_certs:
            raise ValueError("at least one TPM manufacturer CA certificate is needed")
        self._ca_certs = list(ca_certs)
        self._now = now or (lambda: datetime.now(UTC))

    @classmethod
    def from_pem_files(cls, paths: Sequence[Path]) -> AttestationVerifier:
        certificates: list[x509.Certificate] = []
        for path in paths:
            certificates.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        return cls(certificates)

    def _check_ek_certificate(self, der: bytes) -> x509.Certificate:
        """The EK certificate chains to a configured CA (every configured certificate is a trust
        anchor, and may also serve as an intermediate).

        cryptography's client verifier builds and checks the path (signatures, validity, CA
        basic constraints and key usage, depth) with web-PKI rules for the CA certificates. The
        leaf gets `permit_all` extensions: an EK certificate is no web certificate — it has no
        clientAuth EKU (if any, tcg-kp-EKCertificate), a critical SAN holding a directoryName
        (TPM manufacturer, model, version) and often an empty subject, which the default leaf
        policy refuses. What makes it an EK is that a TPM manufacturer's CA signed it.
        """
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError as error:
            raise AttestationInvalid("attestation-ek-untrusted", "EK cert unreadable") from error
        builder = (
            PolicyBuilder()
            .store(Store(self._ca_certs))
            .time(self._now())
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
        )
        try:
            builder.build_client_verifier().verify(certificate, self._ca_certs)
        except VerificationError as error:
            raise AttestationInvalid("attestation-ek-untrusted", str(error)) from error
        return certificate

    def challenge(
        self,
        evidence: Mapping[str, str],
        device_public_key: ec.EllipticCurvePublicKey,
        nonce: bytes,
    ) -> tuple[CredentialChallenge, bytes]:
        """Check the evidence for `device_public_key` certified over `nonce`; return the
        credential to send to the agent and the secret its TPM must give back."""
        if not isinstance(evidence, Mapping) or evidence.get("format") != EVIDENCE_FORMAT:
            raise AttestationInvalid("attestation-malformed", "unknown evidence format")
        blobs = {member: _blob(evidence, member) for member in EVIDENCE_MEMBERS}

        ek_certificate = self._check_ek_certificate(blobs["ek_cert"])
        ek = parse_public(blobs["ek_public"], "ek_public")
        if not _same_public_key(ek.public_key(), ek_certificate.public_key()):
            raise AttestationInvalid("attestation-ek-mismatch", "ek_public is not the EK's key")
        if not ek.has(RESTRICTED | DECRYPT):
            raise AttestationInvalid("attestation-ek-unsupported", "EK is no storage key")

        # A restricted signing key signs only digests of TPM-generated data, so a TPMS_ATTEST
        # with TPM_GENERATED_VALUE under its signature was made by a TPM (Part 1 §36.6).
        # fixedTPM: a key imported or loaded from outside can never carry it, and it is part of
        # the AK's name, which MakeCredential binds (so a software "AK" fails activation).
        ak = parse_public(blobs["ak_public"], "ak_public")
        if not ak.has(RESTRICTED | SIGN):
            raise AttestationInvalid("attestation-ak-not-restricted", "AK is no restricted signer")
        if not ak.has(FIXED_IN_TPM):
            raise AttestationInvalid("attestation-ak-not-fixed", "AK may exist outside the TPM")

        info_blob = blobs["certify_info"]
        raw_info = _outer(info_blob, "certify_info")
        _verify_signature(ak, parse_signature(blobs["certify_signature"]), raw_info)
        info = parse_certify_info(info_blob)
        if not hmac.compare_digest(info.extra_data, nonce):
            raise AttestationInvalid("attestation-wrong-nonce", "qualifying data differs")

        device = parse_public(blobs["device_key_public"], "device_key_public")
        if not hmac.compare_digest(info.certified_name, device.name):
            raise AttestationInvalid("attestation-wrong-key", "certify names another object")
        if device.type != ALG_ECC or device.curve != ECC_NIST_P256:
            raise AttestationInvalid("attestation-key-mismatch", "device key is not P-256")
        if not _same_public_key(device.public_key(), device_public_key):
            raise AttestationInvalid("attestation-key-mismatch", "certified key is another key")
        if not device.has(FIXED_IN_TPM | SIGN):
            raise AttestationInvalid("attestation-key-not-fixed", "device key may leave the TPM")

        secret = secrets.token_bytes(SECRET_BYTES)
        return make_credential(ek, ak.name, secret), secret

    @staticmethod
    def confirm(expected_secret: bytes, answer: object) -> bool:
        """Whether the agent's answer (base64url) is the secret; constant time, junk → False."""
        if not isinstance(answer, str) or not answer or len(answer) > 128:
            return False
        try:
            decoded = base64.b64decode(
                answer + "=" * (-len(answer) % 4), altchars=b"-_", validate=True
            )
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(decoded, expected_secret)
