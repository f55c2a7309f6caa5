"""Signed checkpoints: keys (0600), signatures, the DER TimeStampReq, and the off-box copies
(a URL that receives each checkpoint, a time-stamping authority) over a real local HTTP server."""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import orjson
import pytest
from audit_helpers import make_event

from gateway.audit.checkpoint import (
    Checkpoint,
    Checkpointer,
    load_private_key,
    read_export,
    timestamp_request,
)
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.writer import AuditWriter


class _Handler(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, self.headers["content-type"], body))
        self.send_response(200)
        reply = b"\x30\x03\x02\x01\x00" if self.path == "/tsa" else b"ok"
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:  # stdlib signature
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A loopback HTTP server recording what it is sent; stopped afterwards."""
    received: ClassVar[list[tuple[str, str, bytes]]] = []
    handler = type("H", (_Handler,), {"received": received})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_audit_key_file_is_private(tmp_path: Path) -> None:
    """The key is created 0600; a group- or world-readable key file is refused."""
    path = tmp_path / "k.pem"
    load_private_key(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        load_private_key(path)


def test_audit_checkpoint_signature_covers_every_field(tmp_path: Path) -> None:
    """Changing any signed field of a checkpoint breaks its signature."""
    key = load_private_key(tmp_path / "k.pem", create=True)
    cp = Checkpoint("c:1:1", 5, "ab" * 32, 1000, 5, "periodic").signed(key)
    assert cp.signature_ok(key.public_key())
    for change in (
        {"seq": 6},
        {"head_hash": "cd" * 32},
        {"time_us": 1},
        {"count": 4},
        {"kind": "close"},
        {"chain_id": "c:1:2"},
    ):
        forged = Checkpoint.from_dict({**cp.to_dict(), **change})
        assert not forged.signature_ok(key.public_key()), change


def test_audit_timestamp_request_is_rfc3161_der() -> None:
    """The TimeStampReq is the DER of RFC 3161 §2.4.1: v1, sha256 imprint, nonce, certReq."""
    digest = bytes(32)
    req = timestamp_request(digest, 1)
    assert req == (
        bytes.fromhex("303c020101")
        + bytes.fromhex("3031300d060960864801650304020105000420")
        + digest
        + bytes.fromhex("020101")
        + bytes.fromhex("0101ff")
    )
    # A nonce with its top bit set gets a leading zero byte (DER INTEGERs are signed).
    assert timestamp_request(digest, 2**63).endswith(
        bytes.fromhex("020900") + (2**63).to_bytes(8, "big") + bytes.fromhex("0101ff")
    )


@pytest.mark.anyio
async def test_audit_checkpoints_are_posted_and_timestamped(
    tmp_path: Path, server: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    """Each checkpoint goes to the export file, the configured URL (JSON) and the TSA
    (application/timestamp-query over the signed payload's sha256); the token is kept."""
    base, received = server
    key = load_private_key(tmp_path / "k.pem", create=True)
    cp = Checkpointer(
        key,
        export_path=tmp_path / "cp.jsonl",
        url=base + "/checkpoints",
        tsa_url=base + "/tsa",
        interval=0,
    )
    store = SqliteAuditStore(tmp_path / "a.db")
    writer = AuditWriter(store, chain_id="c:1:1", checkpointer=cp)
    writer.submit(make_event())
    await writer.close()
    stored = await store.checkpoints()
    await store.close()
    assert [c.kind for c in stored] == ["periodic", "close"]
    posted = [orjson.loads(b) for path, ctype, b in received if path == "/checkpoints"]
    assert sorted(p["kind"] for p in posted) == ["close", "periodic"]
    tsa = [(ctype, b) for path, ctype, b in received if path == "/tsa"]
    assert len(tsa) == 2
    assert tsa[0][0] == "application/timestamp-query"
    digests = {hashlib.sha256(c.payload()).digest() for c in stored}
    assert {b[24:56] for _, b in tsa} == digests
    assert all(c.tsa_token == base64.b64encode(b"\x30\x03\x02\x01\x00").decode() for c in stored)
    exported = read_export(tmp_path / "cp.jsonl")
    assert [c.kind for c in exported if c is not None] == ["periodic", "close"]
