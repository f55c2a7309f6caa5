"""The device key inside a TPM 2.0 chip, and its attestation (issue #6 point 1).

The one home of tpm2-pytss (DESIGN.md §3). The P-256 signing key is created under the owner
hierarchy's ECC storage primary (re-derived from the standard template on every use, so nothing
persistent is left in the chip); only its TPM-wrapped private blob is kept on disk — useless
without this very TPM. Every use loads the key, signs inside the chip and flushes the handles:
without a resource manager (swtpm, /dev/tpm0) leaked transient objects exhaust the TPM's three
slots (TPM_RC_OBJECT_MEMORY, 0x902).

Attestation: TPM2_Certify of the device key by an attestation key (a restricted signing primary
of the endorsement hierarchy), plus the EK certificate from NV; TPM2_ActivateCredential proves
to the gateway that the EK and the AK live in the same chip.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

# libtss2 logs every TPM error to stderr itself; the agent reports its own precise codes instead.
os.environ.setdefault("TSS2_LOG", "all+none")

from tpm2_pytss import (  # type: ignore[import-untyped]  # imported after TSS2_LOG is set
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HT,
    TPM2_RC,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TSS2_Exception,
)
from tpm2_pytss.cryptography import tpm_ecc_private_key  # type: ignore[import-untyped]
from tpm2_pytss.utils import (  # type: ignore[import-untyped]
    NoSuchIndex,
    NVReadEK,
    create_ek_template,
)

from device_agent.keys import (
    TPM_KEY_FILE,
    KeyStoreError,
    b64,
    b64url,
    read_private_file,
    write_private_file,
)
from device_agent.report import KeyStorage

KEY_FORMAT: Final = "tabiji-tpm-key-v1"
EVIDENCE_FORMAT: Final = "tpm2-certify-v1"
CREDENTIAL_FORMAT: Final = "tpm2-credential-v1"
LOCK_FILE: Final = ".tpm.lock"
MAX_QUALIFYING_DATA: Final = 64  # TPM2B_DATA holds at most one TPMT_HA's digest

_A = TPMA_OBJECT
# TCG TPM v2.0 Provisioning Guidance, ECC P-256 SRK: a restricted decryption key, AES-128-CFB.
SRK_TEMPLATE: Final = TPM2B_PUBLIC.parse(
    "ecc256:aes128cfb",
    objectAttributes=_A.FIXEDTPM
    | _A.FIXEDPARENT
    | _A.SENSITIVEDATAORIGIN
    | _A.USERWITHAUTH
    | _A.NODA
    | _A.RESTRICTED
    | _A.DECRYPT,
)
# The device key: generated inside the chip (sensitiveDataOrigin), never leaves it (fixedTPM,
# fixedParent), signs arbitrary digests with ECDSA-SHA256 only (what ES256 needs).
DEVICE_KEY_ATTRIBUTES: Final = (
    _A.FIXEDTPM | _A.FIXEDPARENT | _A.SENSITIVEDATAORIGIN | _A.USERWITHAUTH | _A.SIGN_ENCRYPT
)
DEVICE_KEY_TEMPLATE: Final = TPM2B_PUBLIC.parse(
    "ecc256:ecdsa-sha256", objectAttributes=DEVICE_KEY_ATTRIBUTES
)
# The attestation key: restricted, so it signs only what the TPM itself generated (TPM2_Certify
# output starting with TPM_GENERATED_VALUE), never an outside digest made to look like one.
# A primary of the endorsement hierarchy: the same key (and name) every time, nothing to store.
AK_TEMPLATE: Final = TPM2B_PUBLIC.parse(
    "ecc256:ecdsa-sha256:null",
    objectAttributes=_A.FIXEDTPM
    | _A.FIXEDPARENT
    | _A.SENSITIVEDATAORIGIN
    | _A.USERWITHAUTH
    | _A.NODA
    | _A.RESTRICTED
    | _A.SIGN_ENCRYPT,
)
# Low-range EK templates (TCG EK Credential Profile §2.2.1.5): their policy is PolicySecret
# (endorsement), which ActivateCredential can satisfy. Preferred in this order.
EK_TYPES: Final = (("EK-RSA2048", 0x01C00002), ("EK-ECC256", 0x01C0000A))
EK_TEMPLATE_INDEXES: Final = (0x01C00003, 0x01C00004, 0x01C0000B, 0x01C0000C)


def tpm_answers(tcti: str) -> bool:
    """Whether a TPM answers on this TCTI (used to choose the key store)."""
    try:
        context = ESAPI(tcti)
    except (TSS2_Exception, RuntimeError, OSError):
        return False
    try:
        context.get_random(1)
    except (TSS2_Exception, RuntimeError, OSError):
        return False
    finally:
        context.close()
    return True


class TpmKeyStore:
    """The device key as a TPM-wrapped blob in `directory`, usable only in the TPM at `tcti`."""

    kind: Final[KeyStorage] = "tpm"

    def __init__(self, directory: Path, tcti: str) -> None:
        self._directory = directory
        self.tcti = tcti
        self.path = directory / TPM_KEY_FILE

    @property
    def directory(self) -> Path:
        return self._directory

    def create(self) -> TpmDeviceKey:
        if self.path.exists():
            raise KeyStoreError("key-exists", f"{self.path} already holds a device key")
        with _tpm_session(self.tcti, self._directory) as tpm:
            srk = tpm.primary(ESYS_TR.OWNER, SRK_TEMPLATE)
            private, public, *_ = tpm.call(
                "create", srk, TPM2B_SENSITIVE_CREATE(), DEVICE_KEY_TEMPLATE
            )
        record = {
            "format": KEY_FORMAT,
            "parent": "srk-ecc-p256",
            "public": b64(public.marshal()),
            "private": b64(private.marshal()),
        }
        write_private_file(self.path, json.dumps(record, sort_keys=True).encode("ascii"))
        return TpmDeviceKey(self.tcti, self._directory, public.marshal(), private.marshal())

    def load(self) -> TpmDeviceKey | None:
        data = read_private_file(self.path)
        if data is None:
            return None
        try:
            record = json.loads(data)
            if record.get("format") != KEY_FORMAT:
                raise ValueError("unknown format")
            public = base64.b64decode(record["public"], validate=True)
            private = base64.b64decode(record["private"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
            raise KeyStoreError("key-invalid", f"{self.path}: {error}") from error
        return TpmDeviceKey(self.tcti, self._directory, public, private)


class TpmDeviceKey:
    """The P-256 key whose private part only the TPM can use."""

    storage: Final[KeyStorage] = "tpm"

    def __init__(self, tcti: str, directory: Path, public: bytes, private: bytes) -> None:
        self.tcti = tcti
        self._directory = directory
        self.public_blob = public  # TPM2B_PUBLIC, marshalled
        self.private_blob = private  # TPM2B_PRIVATE: wrapped by the SRK, useless elsewhere
        self._public_key = _device_public_key(public)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def signing_key(self) -> AbstractContextManager[ec.EllipticCurvePrivateKey]:
        return self._signing_key()

    @contextmanager
    def _signing_key(self) -> Iterator[ec.EllipticCurvePrivateKey]:
        with _tpm_session(self.tcti, self._directory) as tpm:
            handle = self._load(tpm)
            try:
                signer = _ChipKey(tpm.context, handle)
            except (TSS2_Exception, ValueError) as error:
                raise KeyStoreError("tpm-error", f"read_public: {error}") from error
            yield signer

    def attestation_evidence(self, nonce: bytes) -> dict[str, str] | None:
        """TPM2_Certify of this key by the AK over `nonce`, with the EK certificate and publics."""
        if not 0 < len(nonce) <= MAX_QUALIFYING_DATA:
            raise KeyStoreError("attestation-unavailable", "nonce must be 1..64 bytes")
        with _tpm_session(self.tcti, self._directory) as tpm:
            ek_certificate, ek_template = tpm.endorsement_key()
            key = self._load(tpm)
            ak = tpm.primary(ESYS_TR.ENDORSEMENT, AK_TEMPLATE)
            info, signature = tpm.call(
                "certify", key, ak, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
            ak_public = tpm.publics[ak]
            tpm.flush(key)
            tpm.flush(ak)
            ek = tpm.primary(ESYS_TR.ENDORSEMENT, ek_template)
            ek_public = tpm.publics[ek]
        return {
            "format": EVIDENCE_FORMAT,
            "ek_cert": b64(ek_certificate),
            "ek_public": b64(ek_public.marshal()),
            "ak_public": b64(ak_public.marshal()),
            "device_key_public": b64(self.public_blob),
            "certify_info": b64(info.marshal()),
            "certify_signature": b64(signature.marshal()),
        }

    def activate_credential(self, credential: Mapping[str, str]) -> str | None:
        """TPM2_ActivateCredential: only the TPM holding both the EK and the AK recovers it."""
        blob, secret = _parse_credential(credential)
        with _tpm_session(self.tcti, self._directory) as tpm:
            _, ek_template = tpm.endorsement_key()
            ak = tpm.primary(ESYS_TR.ENDORSEMENT, AK_TEMPLATE)
            ek = tpm.primary(ESYS_TR.ENDORSEMENT, ek_template)
            # The EK's authPolicy is PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile
            # policy A); userWithAuth is clear, so its USER role needs this policy session.
            session = tpm.policy_session(ek_template.publicArea.nameAlg)
            tpm.call("policy_secret", ESYS_TR.ENDORSEMENT, session)
            try:
                recovered = tpm.context.activate_credential(
                    ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
            except TSS2_Exception as error:
                raise KeyStoreError("credential-invalid", str(error)) from error
        return b64url(bytes(recovered))

    def _load(self, tpm: _Tpm) -> Any:
        """The device key loaded under a fresh SRK, which is flushed at once (one slot in use)."""
        srk = tpm.primary(ESYS_TR.OWNER, SRK_TEMPLATE)
        try:
            public, _ = TPM2B_PUBLIC.unmarshal(self.public_blob)
            private, _ = TPM2B_PRIVATE.unmarshal(self.private_blob)
            handle = tpm.call("load", srk, private, public)
        except KeyStoreError as error:
            raise KeyStoreError(
                "tpm-key-mismatch", f"this TPM cannot load the stored key ({error.detail})"
            ) from error
        finally:
            tpm.flush(srk)
        tpm.track(handle)
        return handle


class _ChipKey(tpm_ecc_private_key):  # type: ignore[misc]  # tpm2-pytss is untyped
    """tpm2-pytss's cryptography key (sign() hashes here, signs the digest inside the TPM),
    whose TPM failures surface as KeyStoreError("tpm-error") like every other key error."""

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        try:
            signature: bytes = super().sign(data, signature_algorithm)
        except TSS2_Exception as error:
            raise KeyStoreError("tpm-error", f"sign: {error}") from error
        return signature


def _device_public_key(public_blob: bytes) -> ec.EllipticCurvePublicKey:
    try:
        public, used = TPM2B_PUBLIC.unmarshal(public_blob)
    except (TSS2_Exception, ValueError, TypeError) as error:
        raise KeyStoreError("key-invalid", f"TPM public area: {error}") from error
    area = public.publicArea
    if (
        used != len(public_blob)
        or area.type != TPM2_ALG.ECC
        or area.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256
        or area.objectAttributes & DEVICE_KEY_ATTRIBUTES != DEVICE_KEY_ATTRIBUTES
    ):
        raise KeyStoreError("key-invalid", "the stored TPM key is not a fixed P-256 signing key")
    x = int.from_bytes(bytes(area.unique.ecc.x), "big")
    y = int.from_bytes(bytes(area.unique.ecc.y), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def _parse_credential(credential: Mapping[str, str]) -> tuple[Any, Any]:
    try:
        if credential.get("format") != CREDENTIAL_FORMAT:
            raise ValueError("unknown credential format")
        blob_bytes = base64.b64decode(credential["credential_blob"], validate=True)
        secret_bytes = base64.b64decode(credential["encrypted_secret"], validate=True)
        blob, used_blob = TPM2B_ID_OBJECT.unmarshal(blob_bytes)
        secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(secret_bytes)
    except (KeyError, TypeError, ValueError, AttributeError, TSS2_Exception) as error:
        raise KeyStoreError("credential-invalid", f"malformed credential: {error}") from error
    if used_blob != len(blob_bytes) or used_secret != len(secret_bytes):
        raise KeyStoreError("credential-invalid", "trailing bytes in the credential")
    return blob, secret


# -- one serialised conversation with the TPM, every transient handle flushed at the end -------


class _Tpm:
    """An ESAPI context plus the transient objects it created (flushed on close)."""

    def __init__(self, context: Any, *, may_reclaim: bool) -> None:
        self.context = context
        self.may_reclaim = may_reclaim
        self.handles: list[Any] = []
        self.sessions: list[Any] = []
        self.publics: dict[Any, Any] = {}

    def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Run one ESAPI command; TPM errors become KeyStoreError("tpm-error"). When the chip
        is out of object slots (objects leaked by a crashed process on a TPM without a resource
        manager) the stale ones are flushed and the command is tried once more — only in the
        outermost session, when no other object of this process is alive."""
        function: Callable[..., Any] = getattr(self.context, command)
        try:
            return function(*args, **kwargs)
        except TSS2_Exception as error:
            if error.rc != TPM2_RC.OBJECT_MEMORY or not self.may_reclaim:
                raise KeyStoreError("tpm-error", f"{command}: {error}") from error
        self._reclaim_stale_objects()
        try:
            return function(*args, **kwargs)
        except TSS2_Exception as error:
            raise KeyStoreError("tpm-error", f"{command}: {error}") from error

    def track(self, handle: Any) -> None:
        self.handles.append(handle)

    def primary(self, hierarchy: Any, template: Any) -> Any:
        handle, public, *_ = self.call(
            "create_primary", TPM2B_SENSITIVE_CREATE(), template, hierarchy
        )
        self.track(handle)
        self.publics[handle] = public
        return handle

    def policy_session(self, hash_algorithm: Any) -> Any:
        session = self.call(
            "start_auth_session",
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            hash_algorithm,
        )
        self.sessions.append(session)
        return session

    def flush(self, handle: Any) -> None:
        if handle in self.handles:
            self.handles.remove(handle)
        with contextlib.suppress(TSS2_Exception):
            self.context.flush_context(handle)

    def flush_all(self) -> None:
        for handle in [*self.handles, *self.sessions]:
            with contextlib.suppress(TSS2_Exception):
                self.context.flush_context(handle)
        self.handles.clear()
        self.sessions.clear()

    def _reclaim_stale_objects(self) -> None:
        ours = {self.context.tr_get_tpm_handle(h) for h in self.handles}
        _, data = self.context.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        for tpm_handle in data.data.handles:
            if int(tpm_handle) in ours:
                continue
            with contextlib.suppress(TSS2_Exception):
                self.context.flush_context(self.context.tr_from_tpmpublic(tpm_handle))

    def endorsement_key(self) -> tuple[bytes, Any]:
        """The EK certificate (DER) and the EK template that recreates the certified key."""
        _, data = self.call("get_capability", TPM2_CAP.HANDLES, TPM2_HT.NV_INDEX << 24, 256)
        present = {int(index) for index in data.data.handles}
        reader = NVReadEK(self.context)

        def read_nv(index: int) -> bytes:
            # Probing an absent index through ESAPI is an error round trip; answer from the list.
            if int(index) not in present:
                raise NoSuchIndex(index)
            return bytes(reader(index))

        for ek_type, certificate_index in EK_TYPES:
            if certificate_index in present:
                try:
                    certificate, template = create_ek_template(ek_type, read_nv)
                except (TSS2_Exception, ValueError) as error:
                    raise KeyStoreError("attestation-unavailable", f"EK: {error}") from error
                return bytes(certificate), template
        raise KeyStoreError(
            "attestation-unavailable", "no RSA-2048 or P-256 EK certificate in the TPM's NV"
        )


class _Holder:
    """This process's hold on one key directory's TPM lock: re-entrant for the holding thread."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0


_HOLDERS: dict[str, _Holder] = {}
_HOLDERS_GUARD = threading.Lock()


@contextmanager
def _tpm_session(tcti: str, directory: Path) -> Iterator[_Tpm]:
    """Exclusive use of the TPM by this agent, flushed and closed however it ends.

    Across processes a lock file serialises (without a resource manager two processes would
    trample each other's handles); inside one, other threads wait while the holding thread may
    nest sessions (e.g. activate_credential inside `with key.signing_key()`), each with its own
    context and handles — and only the outermost may reclaim leaked objects, never a live one.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = directory / LOCK_FILE
    with _HOLDERS_GUARD:
        holder = _HOLDERS.setdefault(str(lock_path.resolve()), _Holder())
    with holder.lock, contextlib.ExitStack() as held:
        outermost = holder.depth == 0
        if outermost:
            held.enter_context(_exclusive(lock_path))
        holder.depth += 1
        held.callback(_leave, holder)
        try:
            context = ESAPI(tcti)
        except (TSS2_Exception, RuntimeError, OSError) as error:
            raise KeyStoreError("tpm-unavailable", f"{tcti}: {error}") from error
        tpm = _Tpm(context, may_reclaim=outermost)
        try:
            yield tpm
        finally:
            tpm.flush_all()
            context.close()


def _leave(holder: _Holder) -> None:
    holder.depth -= 1


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: the OS's TPM service (TBS) serialises for us
            yield
            return
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
