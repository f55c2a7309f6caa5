"""TPM attestation of a device key, end to end against swtpm: the agent's evidence, the
gateway's checks, software TPM2_MakeCredential and the chip's TPM2_ActivateCredential — and
every forgery the gateway must refuse."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from device_agent.keys import attestation_nonce as agent_nonce
from device_agent.keys import open_key_store
from device_agent.tpm import AK_TEMPLATE, SRK_TEMPLATE, TpmDeviceKey
from gateway.devices.attestation import (
    AttestationInvalid,
    AttestationVerifier,
    CredentialChallenge,
    attestation_nonce,
    make_credential,
    parse_public,
)
from tests import swtpm_fixture
from tests.swtpm_fixture import Swtpm, provision_tpm, running_swtpm

ORIGIN = "https://gw.example"
# The shared swtpm fixtures (tests/swtpm_fixture.py), made visible to pytest here.
swtpm_template = swtpm_fixture.swtpm_template
swtpm = swtpm_fixture.swtpm
Evidence = dict[str, str]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def new_tpm_key(swtpm: Swtpm, directory: Path) -> TpmDeviceKey:
    key = open_key_store(directory, tcti=swtpm.tcti).create()
    assert isinstance(key, TpmDeviceKey)
    return key


def verifier_for(swtpm: Swtpm) -> AttestationVerifier:
    return AttestationVerifier.from_pem_files(list(swtpm.ca_cert_pem_paths))


def refusal(
    verifier: AttestationVerifier,
    evidence: Evidence,
    key: ec.EllipticCurvePublicKey,
    nonce: bytes,
) -> str:
    with pytest.raises(AttestationInvalid) as refused:
        verifier.challenge(evidence, key, nonce)
    return refused.value.code


@pytest.fixture
def attested(swtpm: Swtpm, tmp_path: Path) -> tuple[TpmDeviceKey, Evidence, bytes]:
    """A TPM device key and its evidence over the enrolment nonce."""
    key = new_tpm_key(swtpm, tmp_path / "agent")
    nonce = attestation_nonce(ORIGIN, key.public_key())
    evidence = key.attestation_evidence(nonce)
    assert evidence is not None
    return key, evidence, nonce


def certify_in_tpm(
    tcti: str,
    *,
    object_public: bytes,
    object_private: bytes,
    signer_template: object,
    nonce: bytes,
) -> tuple[bytes, bytes, bytes]:
    """(signer TPM2B_PUBLIC, TPM2B_ATTEST, TPMT_SIGNATURE): TPM2_Certify of an object loaded
    under the SRK, signed by a primary made from `signer_template` — for forged evidence."""
    context = ESAPI(tcti)
    try:
        srk, *_ = context.create_primary(TPM2B_SENSITIVE_CREATE(), SRK_TEMPLATE, ESYS_TR.OWNER)
        handle = context.load(
            srk,
            TPM2B_PRIVATE.unmarshal(object_private)[0],
            TPM2B_PUBLIC.unmarshal(object_public)[0],
        )
        context.flush_context(srk)
        signer, signer_public, *_ = context.create_primary(
            TPM2B_SENSITIVE_CREATE(), signer_template, ESYS_TR.ENDORSEMENT
        )
        info, signature = context.certify(
            handle,
            signer,
            nonce,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details={"any": {"hashAlg": TPM2_ALG.SHA256}}),
        )
        context.flush_context(handle)
        context.flush_context(signer)
        return signer_public.marshal(), info.marshal(), signature.marshal()
    finally:
        context.close()


def create_child_key(tcti: str, attributes: int) -> tuple[bytes, bytes]:
    """(TPM2B_PUBLIC, TPM2B_PRIVATE) of a P-256 ECDSA key under the SRK with `attributes`."""
    context = ESAPI(tcti)
    try:
        srk, *_ = context.create_primary(TPM2B_SENSITIVE_CREATE(), SRK_TEMPLATE, ESYS_TR.OWNER)
        template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attributes)
        private, public, *_ = context.create(srk, TPM2B_SENSITIVE_CREATE(), template)
        context.flush_context(srk)
        return public.marshal(), private.marshal()
    finally:
        context.close()


def public_key_of(tpm2b_public: bytes) -> ec.EllipticCurvePublicKey:
    key = parse_public(tpm2b_public).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


# -- the good path ------------------------------------------------------------------------------


def test_round_trip_proves_the_key_is_in_the_tpm(swtpm: Swtpm, tmp_path: Path) -> None:
    """Evidence → verified → credential → activated in the chip → the gateway confirms it."""
    verifier = verifier_for(swtpm)
    key = new_tpm_key(swtpm, tmp_path / "agent")
    started = time.perf_counter()
    nonce = attestation_nonce(ORIGIN, key.public_key())
    evidence = key.attestation_evidence(nonce)
    assert evidence is not None
    evidence_done = time.perf_counter()
    challenge, secret = verifier.challenge(evidence, key.public_key(), nonce)
    verified = time.perf_counter()
    answer = key.activate_credential(challenge.to_json())
    activated = time.perf_counter()
    assert verifier.confirm(secret, answer)
    print(  # measured, not asserted (COMMON.md)
        f"\nattestation round trip {1000 * (activated - started):.1f} ms: evidence "
        f"{1000 * (evidence_done - started):.1f} ms, gateway verify+MakeCredential "
        f"{1000 * (verified - evidence_done):.1f} ms, ActivateCredential "
        f"{1000 * (activated - verified):.1f} ms"
    )


def test_agent_and_gateway_agree_on_the_nonce() -> None:
    """Both sides derive the same qualifying data, bound to the gateway origin and the key."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert agent_nonce(ORIGIN, key) == attestation_nonce(ORIGIN, key)
    assert len(attestation_nonce(ORIGIN, key)) == 32
    assert attestation_nonce("https://other.example", key) != attestation_nonce(ORIGIN, key)


def test_each_challenge_has_a_fresh_secret(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Replaying the same evidence gets a new secret: an old answer is worthless."""
    key, evidence, nonce = attested
    verifier = verifier_for(swtpm)
    first_challenge, first = verifier.challenge(evidence, key.public_key(), nonce)
    second_challenge, second = verifier.challenge(evidence, key.public_key(), nonce)
    assert first != second
    old_answer = key.activate_credential(first_challenge.to_json())
    assert not verifier.confirm(second, old_answer)
    assert verifier.confirm(second, key.activate_credential(second_challenge.to_json()))


def test_software_make_credential_works_for_an_ecc_ek(swtpm: Swtpm) -> None:
    """The ECDH + KDFe path: a credential made for a P-256 EK (TCG template L-2) is recovered
    by that EK in the chip."""
    context = ESAPI(swtpm.tcti)
    try:

        def no_nv(index: int) -> bytes:
            raise NoSuchIndex(index)  # swtpm has no P-256 EK certificate: the bare template

        _, template = create_ek_template("EK-ECC256", no_nv)
        ek, ek_public, *_ = context.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        ak, ak_public, *_ = context.create_primary(
            TPM2B_SENSITIVE_CREATE(), AK_TEMPLATE, ESYS_TR.ENDORSEMENT
        )
        ak_name = parse_public(ak_public.marshal()).name
        assert ak_name == bytes(context.tr_get_name(ak))  # our name = the TPM's name
        challenge = make_credential(parse_public(ek_public.marshal()), ak_name, b"s" * 32)
        session = context.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        context.policy_secret(ESYS_TR.ENDORSEMENT, session)
        recovered = context.activate_credential(
            ak,
            ek,
            TPM2B_ID_OBJECT.unmarshal(challenge.credential_blob)[0],
            TPM2B_ENCRYPTED_SECRET.unmarshal(challenge.encrypted_secret)[0],
            session1=ESYS_TR.PASSWORD,
            session2=session,
        )
        for handle in (session, ak, ek):
            context.flush_context(handle)
    finally:
        context.close()
    assert bytes(recovered) == b"s" * 32


# -- refusals, each with evidence that would pass without that one check -------------------


def test_ek_certificate_from_another_ca_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """The very same EK key, certified by a CA the gateway does not trust: ek-untrusted."""
    key, evidence, nonce = attested
    real = x509.load_der_x509_certificate(unb64(evidence["ek_cert"]))
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swtpm-localca")])
    now = datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(rogue_name)  # even the issuer name of the real CA
        .public_key(real.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(rogue_key, hashes.SHA256())
    )
    forged_evidence = {**evidence, "ek_cert": b64(forged.public_bytes(serialization.Encoding.DER))}
    verifier = verifier_for(swtpm)
    assert refusal(verifier, forged_evidence, key.public_key(), nonce) == "attestation-ek-untrusted"
    verifier.challenge(evidence, key.public_key(), nonce)  # the genuine one passes


def test_ek_certificate_outside_its_validity_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Checked at a time before the CA existed, the chain does not hold."""
    key, evidence, nonce = attested
    certificates: list[x509.Certificate] = []
    for path in swtpm.ca_cert_pem_paths:
        certificates.extend(x509.load_pem_x509_certificates(path.read_bytes()))
    past = AttestationVerifier(certificates, now=lambda: datetime(2001, 1, 1, tzinfo=UTC))
    assert refusal(past, evidence, key.public_key(), nonce) == "attestation-ek-untrusted"


def test_ek_public_of_another_key_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """An ek_public that is not the certified EK (here the AK's) is refused: ek-mismatch."""
    key, evidence, nonce = attested
    swapped = {**evidence, "ek_public": evidence["ak_public"]}
    assert (
        refusal(verifier_for(swtpm), swapped, key.public_key(), nonce) == "attestation-ek-mismatch"
    )


def test_wrong_nonce_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Evidence certified over another nonce (another gateway's) is refused: wrong-nonce."""
    key, evidence, _ = attested
    other = attestation_nonce("https://other.example", key.public_key())
    assert (
        refusal(verifier_for(swtpm), evidence, key.public_key(), other) == "attestation-wrong-nonce"
    )


def test_evidence_for_another_key_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Genuine evidence presented for a different enrolling key: key-mismatch."""
    _, evidence, nonce = attested
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert refusal(verifier_for(swtpm), evidence, stranger, nonce) == "attestation-key-mismatch"


def test_certify_of_a_different_tpm_key_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes], tmp_path: Path
) -> None:
    """The certification names key A; device_key_public (and the enrolling key) is key B,
    which is also in the TPM: the name differs, wrong-key."""
    _, evidence, nonce = attested
    other = new_tpm_key(swtpm, tmp_path / "other-agent")
    swapped = {**evidence, "device_key_public": b64(other.public_blob)}
    assert (
        refusal(verifier_for(swtpm), swapped, other.public_key(), nonce) == "attestation-wrong-key"
    )


def test_tampered_certify_info_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Rewriting the certified nonce to the one the gateway expects breaks the AK signature."""
    key, evidence, signed_nonce = attested
    info = bytearray(unb64(evidence["certify_info"]))
    start = bytes(info).index(signed_nonce)
    wanted = attestation_nonce("https://other.example", key.public_key())
    info[start : start + len(wanted)] = wanted
    forged = {**evidence, "certify_info": b64(bytes(info))}
    verifier = verifier_for(swtpm)
    assert refusal(verifier, forged, key.public_key(), wanted) == "attestation-bad-signature"
    for position in (2, 10, len(info) - 1):  # any single byte (magic, signer name, object name)
        flipped = bytearray(unb64(evidence["certify_info"]))
        flipped[position] ^= 0x01
        one_bit = {**evidence, "certify_info": b64(bytes(flipped))}
        assert (
            refusal(verifier, one_bit, key.public_key(), signed_nonce)
            == "attestation-bad-signature"
        )


def test_certify_signed_by_a_non_restricted_key_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """A valid TPM2_Certify signed by an unrestricted key (which would sign any forged
    TPMS_ATTEST digest) is refused: ak-not-restricted."""
    key, evidence, nonce = attested
    unrestricted = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT,
    )
    signer, info, signature = certify_in_tpm(
        swtpm.tcti,
        object_public=key.public_blob,
        object_private=key.private_blob,
        signer_template=unrestricted,
        nonce=nonce,
    )
    forged = {
        **evidence,
        "ak_public": b64(signer),
        "certify_info": b64(info),
        "certify_signature": b64(signature),
    }
    verifier = verifier_for(swtpm)
    assert refusal(verifier, forged, key.public_key(), nonce) == "attestation-ak-not-restricted"


def test_certified_key_that_may_leave_the_tpm_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """A duplicable TPM key (fixedTPM/fixedParent clear), genuinely certified: key-not-fixed."""
    _, evidence, nonce_for_device = attested
    public, private = create_child_key(
        swtpm.tcti,
        TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT,
    )
    movable = public_key_of(public)
    nonce = attestation_nonce(ORIGIN, movable)
    ak, info, signature = certify_in_tpm(
        swtpm.tcti,
        object_public=public,
        object_private=private,
        signer_template=AK_TEMPLATE,
        nonce=nonce,
    )
    forged = {
        **evidence,
        "ak_public": b64(ak),
        "device_key_public": b64(public),
        "certify_info": b64(info),
        "certify_signature": b64(signature),
    }
    assert nonce != nonce_for_device
    assert refusal(verifier_for(swtpm), forged, movable, nonce) == "attestation-key-not-fixed"


MEMBERS = ("ek_public", "ak_public", "device_key_public", "certify_info", "certify_signature")


@pytest.mark.parametrize("member", MEMBERS)
def test_truncated_structures_are_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes], member: str
) -> None:
    """A TPM structure one byte short is attestation-truncated; one byte long, trailing-bytes."""
    key, evidence, nonce = attested
    verifier = verifier_for(swtpm)
    blob = unb64(evidence[member])
    short = {**evidence, member: b64(blob[:-1])}
    assert refusal(verifier, short, key.public_key(), nonce) == "attestation-truncated"
    long = {**evidence, member: b64(blob + b"\x00")}
    assert refusal(verifier, long, key.public_key(), nonce) == "attestation-trailing-bytes"
    cut = {**evidence, member: b64(blob[:3])}
    assert refusal(verifier, cut, key.public_key(), nonce) == "attestation-truncated"


def test_truncated_ek_certificate_is_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """A cut EK certificate does not parse, so it is not trusted."""
    key, evidence, nonce = attested
    cut = {**evidence, "ek_cert": b64(unb64(evidence["ek_cert"])[:-1])}
    assert refusal(verifier_for(swtpm), cut, key.public_key(), nonce) == "attestation-ek-untrusted"


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: {k: v for k, v in e.items() if k != "certify_signature"},
        lambda e: {**e, "format": "tpm2-quote-v9"},
        lambda e: {**e, "ak_public": "not base64!"},
        lambda e: {**e, "ek_cert": ""},
        lambda e: {**e, "certify_info": "A" * 20000},
    ],
    ids=["missing-member", "unknown-format", "bad-base64", "empty", "oversized"],
)
def test_malformed_evidence_is_refused(
    swtpm: Swtpm,
    attested: tuple[TpmDeviceKey, Evidence, bytes],
    damage: Callable[[Evidence], Evidence],
) -> None:
    """Evidence that is not even well formed is attestation-malformed."""
    key, evidence, nonce = attested
    assert refusal(verifier_for(swtpm), damage(evidence), key.public_key(), nonce) == (
        "attestation-malformed"
    )


def test_unsupported_key_types_are_refused() -> None:
    """A TPM2B_PUBLIC of a keyed-hash object is attestation-unsupported, not a crash."""
    keyedhash = TPM2B_PUBLIC.parse("hmac", objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT).marshal()
    with pytest.raises(AttestationInvalid) as refused:
        parse_public(keyedhash)
    assert refused.value.code == "attestation-unsupported"


def test_wrong_credential_answers_are_refused(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """Only the exact secret confirms; other secrets, junk and wrong types do not."""
    key, evidence, nonce = attested
    verifier = verifier_for(swtpm)
    challenge, secret = verifier.challenge(evidence, key.public_key(), nonce)
    right = key.activate_credential(challenge.to_json())
    assert verifier.confirm(secret, right)
    wrong = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    for answer in (wrong, right[:-2], right + "AA", "", None, 42, b"bytes", "!!!", "x" * 500):
        assert not verifier.confirm(secret, answer)


def test_tampered_credential_is_not_activated(
    swtpm: Swtpm, attested: tuple[TpmDeviceKey, Evidence, bytes]
) -> None:
    """A credential blob changed in transit fails the TPM's integrity HMAC: credential-invalid."""
    from device_agent.keys import KeyStoreError

    key, evidence, nonce = attested
    challenge, _ = verifier_for(swtpm).challenge(evidence, key.public_key(), nonce)
    blob = bytearray(challenge.credential_blob)
    blob[-1] ^= 0x01
    tampered = CredentialChallenge(bytes(blob), challenge.encrypted_secret)
    with pytest.raises(KeyStoreError) as refused:
        key.activate_credential(tampered.to_json())
    assert refused.value.code == "credential-invalid"


def test_ak_from_another_tpm_cannot_answer_for_this_ek(
    swtpm: Swtpm,
    attested: tuple[TpmDeviceKey, Evidence, bytes],
    tmp_path: Path,
) -> None:
    """A second chip (same manufacturer CA) certifies its own key and borrows the first chip's
    EK certificate: the evidence checks out, but only the first chip's EK could recover the
    secret, so the second chip cannot answer — the key never becomes "tpm"."""
    from device_agent.keys import KeyStoreError

    _, genuine, _ = attested
    second_chip = provision_tpm(tmp_path / "second-chip", ca_dir=swtpm.ca_cert_pem_paths[0].parent)
    with running_swtpm(tmp_path / "second", second_chip) as second:
        impostor = new_tpm_key(second, tmp_path / "impostor")
        nonce = attestation_nonce(ORIGIN, impostor.public_key())
        evidence = impostor.attestation_evidence(nonce)
        assert evidence is not None
        assert evidence["ek_cert"] != genuine["ek_cert"]
        borrowed = {**evidence, "ek_cert": genuine["ek_cert"], "ek_public": genuine["ek_public"]}
        verifier = verifier_for(swtpm)
        verifier.challenge(evidence, impostor.public_key(), nonce)  # its own EK: fine
        challenge, _ = verifier.challenge(borrowed, impostor.public_key(), nonce)
        with pytest.raises(KeyStoreError) as refused:
            impostor.activate_credential(challenge.to_json())
        assert refused.value.code == "credential-invalid"
