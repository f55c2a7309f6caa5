"""Signed checkpoints: a chain's (seq, head hash) signed with the dedicated Ed25519 audit key,
stored in the DB and exported off the box (JSON-lines file, optional URL, optional RFC 3161 TSA).

Must not import gateway.settings. The export is what stops root on the gateway host from
rewriting history and re-signing it: the auditors' copy keeps the old head hashes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from gateway.audit.store import AuditStore

log = logging.getLogger("tabiji.audit")

CheckpointKind = Literal["periodic", "close", "retention"]
_SIG_CONTEXT: Final = b"tabiji-audit-checkpoint:v1:"  # domain separation for the signatures


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex of sha256 of the raw public key: names the key that signed a checkpoint."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """ "Chain `chain_id` had `count` records and its record `seq` hashed to `head_hash` at
    `time_us`", signed. kind: periodic, close (the writer ended: nothing may follow), retention
    (records up to and including `seq` were deleted on purpose; `count` = how many)."""

    chain_id: str
    seq: int
    head_hash: str
    time_us: int
    count: int
    kind: CheckpointKind
    key_id: str = ""
    signature: str = ""  # base64url Ed25519 over _SIG_CONTEXT + payload()
    tsa_token: str | None = None  # base64 RFC 3161 TimeStampResp, when a TSA answered (unsigned)

    def payload(self) -> bytes:
        """The signed bytes: sorted-keys JSON of every field but the signature and TSA token."""
        return orjson.dumps(
            {
                "v": 1,
                "chain_id": self.chain_id,
                "seq": self.seq,
                "head_hash": self.head_hash,
                "time_us": self.time_us,
                "count": self.count,
                "kind": self.kind,
                "key_id": self.key_id,
            },
            option=orjson.OPT_SORT_KEYS,
        )

    def signed(self, private_key: Ed25519PrivateKey) -> Checkpoint:
        cp = replace(self, key_id=key_id(private_key.public_key()))
        return replace(cp, signature=_b64(private_key.sign(_SIG_CONTEXT + cp.payload())))

    def signature_ok(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(_unb64(self.signature), _SIG_CONTEXT + self.payload())
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "time_us": self.time_us,
            "count": self.count,
            "kind": self.kind,
            "key_id": self.key_id,
            "signature": self.signature,
            "tsa_token": self.tsa_token,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Checkpoint:
        kind = str(d["kind"])
        if kind not in ("periodic", "close", "retention"):
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        return Checkpoint(
            chain_id=str(d["chain_id"]),
            seq=int(d["seq"]),
            head_hash=str(d["head_hash"]),
            time_us=int(d["time_us"]),
            count=int(d["count"]),
            kind=kind,  # type: ignore[arg-type]  # checked against the Literal's values above
            key_id=str(d.get("key_id", "")),
            signature=str(d.get("signature", "")),
            tsa_token=d.get("tsa_token"),
        )


# --------------------------------------------------------------------------- keys


def generate_key(path: Path) -> Ed25519PublicKey:
    """Create a new audit key (PEM PKCS#8, mode 0600, never overwriting) and its public key file
    next to it (`<path>.pub`, PEM SubjectPublicKeyInfo) for the auditors."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    pub = key.public_key()
    public_path(path).write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_private_key(path: Path, *, create: bool = False) -> Ed25519PrivateKey:
    """The audit signing key; created on first start when `create`. Refuses a group/world
    readable file: the key is what makes a checkpoint trustworthy."""
    if create and not path.exists():
        generate_key(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path}: audit key must be mode 0600 (is {mode:o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file (PEM), or the public half of a private key file."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        priv = serialization.load_pem_private_key(data, password=None)
        if not isinstance(priv, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        return priv.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


# --------------------------------------------------------------------------- export


def append_export(path: Path, checkpoint: Checkpoint) -> None:
    """Append one JSON line and fsync: the auditors' copy must not lag behind the DB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, orjson.dumps(checkpoint.to_dict()) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_export(path: Path) -> list[Checkpoint | None]:
    """Every exported checkpoint, in file order; None for a line that does not parse (verify
    reports it: someone wrote garbage into the auditors' copy)."""
    out: list[Checkpoint | None] = []
    if not path.exists():
        return out
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            out.append(Checkpoint.from_dict(orjson.loads(line)))
        except (ValueError, KeyError, TypeError):
            out.append(None)
    return out


# --------------------------------------------------------------------------- RFC 3161


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(n: int) -> bytes:
    body = n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)
    return _der(0x02, body)


_SHA256_OID: Final = bytes.fromhex("0609608648016503040201")  # 2.16.840.1.101.3.4.2.1


def timestamp_request(digest: bytes, nonce: int) -> bytes:
    """A DER TimeStampReq (RFC 3161 §2.4.1): version 1, messageImprint (sha256), nonce, certReq."""
    algorithm = _der(0x30, _SHA256_OID + b"\x05\x00")
    imprint = _der(0x30, algorithm + _der(0x04, digest))
    return _der(0x30, _der_int(1) + imprint + _der_int(nonce) + b"\x01\x01\xff")


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Writes a signed checkpoint per chain every `interval` seconds (and on close / retention)
    to the store, the export file, and best-effort to `url` and a TSA."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        export_path: Path | None,
        interval: float = 60.0,
        url: str | None = None,
        tsa_url: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._key = private_key
        self.export_path = export_path
        self.interval = interval
        self._url = url
        self._tsa_url = tsa_url
        self._timeout = timeout
        self._last: dict[str, tuple[float, int]] = {}  # chain -> (monotonic time, seq)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def make(
        self, chain_id: str, seq: int, head: str, count: int, kind: CheckpointKind
    ) -> Checkpoint:
        """A signed checkpoint (not yet stored)."""
        return Checkpoint(
            chain_id=chain_id,
            seq=seq,
            head_hash=head,
            time_us=time.time_ns() // 1000,
            count=count,
            kind=kind,
        ).signed(self._key)

    def due(self, chain_id: str, seq: int) -> bool:
        """True when the chain moved since its last checkpoint and `interval` has passed."""
        last = self._last.get(chain_id)
        if last is None:
            return seq > 0
        return seq > last[1] and time.monotonic() - last[0] >= self.interval

    async def write(
        self,
        store: AuditStore,
        chain_id: str,
        seq: int,
        head: str,
        kind: CheckpointKind = "periodic",
    ) -> Checkpoint:
        """Sign, timestamp (when configured), store, export and publish one checkpoint."""
        cp = self.make(chain_id, seq, head, seq, kind)
        if self._tsa_url:
            cp = replace(cp, tsa_token=await self._timestamp(cp))
        await store.add_checkpoint(cp)
        await self.export(cp)
        self._last[chain_id] = (time.monotonic(), seq)
        return cp

    async def export(self, cp: Checkpoint) -> None:
        if self.export_path is not None:
            await asyncio.to_thread(append_export, self.export_path, cp)
        if self._url:
            task = asyncio.create_task(self._post(cp))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, cp: Checkpoint) -> None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                resp = await client.post(
                    str(self._url),
                    content=orjson.dumps(cp.to_dict()),
                    headers={"content-type": "application/json"},
                )
                resp.raise_for_status()
        except httpx.HTTPError as exc:  # best effort: the export file is the durable copy
            log.warning("audit checkpoint POST failed: %s", type(exc).__name__)

    async def _timestamp(self, cp: Checkpoint) -> str | None:
        import httpx

        digest = hashlib.sha256(cp.payload()).digest()
        req = timestamp_request(digest, secrets.randbits(63))
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                resp = await client.post(
                    str(self._tsa_url),
                    content=req,
                    headers={"content-type": "application/timestamp-query"},
                )
                resp.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("audit TSA request failed: %s", type(exc).__name__)
            return None
        return base64.b64encode(resp.content).decode()

    async def aclose(self) -> None:
        """Wait for outstanding POSTs (bounded by their timeout)."""
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)


# --------------------------------------------------------------------------- rotation


def retired_path(private_path: Path, retired_id: str) -> Path:
    """Where a retired audit key's public half is kept: `<key file>.retired-<key id>.pub`
    beside the key (flat, so a Kubernetes Secret can hold it too)."""
    return private_path.with_name(f"{private_path.name}.retired-{retired_id}.pub")


def retired_keys(private_path: Path) -> list[Path]:
    """The public key files of every audit key retired from `private_path`."""
    return sorted(private_path.parent.glob(f"{private_path.name}.retired-*.pub"))


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write beside, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def rotate_key(path: Path) -> tuple[str, Ed25519PublicKey]:
    """Retire the audit key at `path` and put a new one in its place; returns (the old key's
    id, the new public key).

    The old public key is kept as `<path>.retired-<key id>.pub`, so every checkpoint it signed
    stays verifiable; its private half is overwritten, so nothing can sign as it again.
    Running gateways keep signing with the key they loaded until they restart.
    """
    old = load_private_key(path).public_key()
    old_id = key_id(old)
    # The retired public key first: were we to stop after this, nothing is lost.
    _replace_file(retired_path(path, old_id), _public_pem(old), 0o644)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _replace_file(path, pem, 0o600)
    _replace_file(public_path(path), _public_pem(key.public_key()), 0o644)
    return old_id, key.public_key()


def verification_keys(*sources: Path | None) -> dict[str, Ed25519PublicKey]:
    """Every audit public key found at `sources`, by key id: a file is a public key or a private
    key (its public half); a directory contributes each `*.pub` in it. Missing paths are
    skipped, so the current, the published and the retired keys can all be named."""
    keys: dict[str, Ed25519PublicKey] = {}
    for source in sources:
        if source is None or not source.exists():
            continue
        files = sorted(source.glob("*.pub")) if source.is_dir() else [source]
        for file in files:
            key = load_public_key(file)
            keys[key_id(key)] = key
    return keys


def signature_ok_any(
    checkpoint: Checkpoint, keys: Ed25519PublicKey | Mapping[str, Ed25519PublicKey]
) -> bool:
    """Check a checkpoint with one key, or with the key of a key ring its `key_id` names (a key
    ring holds the current key and the retired ones: a rotation keeps old checkpoints valid)."""
    if isinstance(keys, Mapping):
        key = keys.get(checkpoint.key_id)
        return key is not None and checkpoint.signature_ok(key)
    return checkpoint.signature_ok(keys)
