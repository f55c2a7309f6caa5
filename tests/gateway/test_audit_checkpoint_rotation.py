"""Rotating the audit checkpoint key: checkpoints signed before the rotation keep verifying with
the retired public key, the old private key is gone, and a key outside the ring is refused."""

from __future__ import annotations

import argparse
import asyncio
import stat
from pathlib import Path

import orjson
import pytest
from audit_helpers import T0, fill, make_event

from gateway.audit.checkpoint import (
    Checkpointer,
    key_id,
    load_private_key,
    load_public_key,
    public_path,
    read_export,
    retired_keys,
    rotate_key,
    verification_keys,
)
from gateway.audit.cli import AuditCliConfig, add_audit_parser, run_audit
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.audit.verify import verify
from gateway.audit.writer import AuditWriter


async def write_chain(store: SqliteAuditStore, tmp_path: Path, chain_id: str, n: int) -> None:
    """`n` records in a new chain, signed with whatever key the key file holds now."""
    key = load_private_key(tmp_path / "audit-key.pem")
    checkpointer = Checkpointer(key, export_path=tmp_path / "checkpoints.jsonl", interval=0.0)
    writer = AuditWriter(
        store, chain_id=chain_id, checkpointer=checkpointer, spool_dir=tmp_path / "spool"
    )
    for i in range(n):
        writer.submit(make_event(time_us=T0 + 100_000_000 + i, request_id=f"after-{i}"))
    await writer.close()


@pytest.fixture
async def rotated(tmp_path: Path) -> tuple[SqliteAuditStore, str, str]:
    """A chain signed with key A, a rotation, a second chain signed with key B; returns the
    open store and the two key ids."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    await store.open()
    filled = await fill(store, tmp_path, 10)
    old_id = key_id(filled.key.public_key())
    retired_id, new_public = rotate_key(tmp_path / "audit-key.pem")
    assert retired_id == old_id
    await write_chain(store, tmp_path, "h:2:1", 5)
    return store, old_id, key_id(new_public)


@pytest.mark.anyio
async def test_old_checkpoints_verify_with_the_retired_key(
    rotated: tuple[SqliteAuditStore, str, str], tmp_path: Path
) -> None:
    """After a rotation the DB and the export hold checkpoints of both keys; the key ring (the
    published key plus the retired directory) verifies all of them."""
    store, old_id, new_id = rotated
    export = tmp_path / "checkpoints.jsonl"
    signers = {cp.key_id for cp in read_export(export) if cp is not None}
    assert signers == {old_id, new_id}
    key_file = tmp_path / "audit-key.pem"
    ring = verification_keys(public_path(key_file), *retired_keys(key_file))
    assert set(ring) == {old_id, new_id}
    report = await verify(store, ring, export)
    assert report.ok, report.first_bad
    assert report.chains_checked == 2
    await store.close()


@pytest.mark.anyio
async def test_the_new_key_alone_refuses_the_old_checkpoints(
    rotated: tuple[SqliteAuditStore, str, str], tmp_path: Path
) -> None:
    """Without the retired key the old checkpoints are bad-signature: keeping it is what makes
    the rotation safe (and a key the auditors never trusted proves nothing)."""
    store, _, new_id = rotated
    only_new = load_public_key(public_path(tmp_path / "audit-key.pem"))
    assert key_id(only_new) == new_id
    report = await verify(store, only_new, tmp_path / "checkpoints.jsonl")
    assert not report.ok
    assert report.first_bad is not None
    assert report.first_bad.what == "bad-signature"
    assert (await verify(store, {new_id: only_new}, None)).first_bad is not None
    await store.close()


@pytest.mark.anyio
async def test_rotation_destroys_the_old_private_key(
    rotated: tuple[SqliteAuditStore, str, str], tmp_path: Path
) -> None:
    """The key file now holds only the new key (0600), its .pub matches it, and the retired
    file beside it holds only the old public key."""
    store, old_id, new_id = rotated
    await store.close()
    path = tmp_path / "audit-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == new_id
    assert key_id(load_public_key(public_path(path))) == new_id
    retired = retired_keys(path)
    assert [p.name for p in retired] == [f"audit-key.pem.retired-{old_id}.pub"]
    assert b"PRIVATE" not in retired[0].read_bytes()


def cli(config: AuditCliConfig, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tabiji")
    add_audit_parser(parser.add_subparsers(dest="command"))
    return run_audit(parser.parse_args(["audit", *argv]), config)


def test_cli_keygen_rotate_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tabiji audit keygen --rotate` retires the key; `tabiji audit verify` then passes over
    both keys' checkpoints by default, and with the auditor's own copies given by --public-key
    (two files); given only the old public key it fails."""
    store = SqliteAuditStore(tmp_path / "audit.db")
    key_file = tmp_path / "audit-key.pem"
    config = AuditCliConfig(
        store_url="sqlite:///audit.db",
        base_dir=tmp_path,
        key_file=key_file,
        checkpoint_export=tmp_path / "checkpoints.jsonl",
        actor="it@town.example",
    )

    async def first() -> None:
        await store.open()
        await fill(store, tmp_path, 8)
        await store.close()

    asyncio.run(first())
    auditors_copy = tmp_path / "auditors-old.pub"
    auditors_copy.write_bytes(public_path(key_file).read_bytes())
    assert cli(config, "keygen", "--rotate") == 0
    assert "retired" in capsys.readouterr().out

    async def second() -> None:
        await store.open()
        await write_chain(store, tmp_path, "h:2:1", 4)
        await store.close()

    asyncio.run(second())
    assert cli(config, "verify", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["ok"] is True
    new_copy = public_path(key_file)
    assert (
        cli(config, "verify", "--public-key", str(new_copy), "--public-key", str(auditors_copy))
        == 0
    )
    capsys.readouterr()
    assert cli(config, "verify", "--public-key", str(auditors_copy)) == 1
    assert "bad-signature" in capsys.readouterr().err


def test_cli_rotate_without_a_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rotating a key that does not exist creates nothing and exits 1."""
    config = AuditCliConfig(
        store_url="sqlite:///audit.db", base_dir=tmp_path, key_file=tmp_path / "none.pem"
    )
    assert cli(config, "keygen", "--rotate") == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.pem").exists()
