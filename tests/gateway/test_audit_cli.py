"""`tabiji audit …`: query, export, verify, stats, keygen and retention against a real SQLite
trail; auditors' own views are recorded."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sqlite3
import stat
from pathlib import Path

import orjson
import pytest
from audit_helpers import T0, fill

from gateway.audit.checkpoint import Checkpoint, load_private_key
from gateway.audit.cli import AuditCliConfig, add_audit_parser, parse_time, run_audit
from gateway.audit.query import AuditFilter
from gateway.audit.store_sqlite import SqliteAuditStore


def cli(config: AuditCliConfig, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tabiji")
    add_audit_parser(parser.add_subparsers(dest="command"))
    return run_audit(parser.parse_args(["audit", *argv]), config)


@pytest.fixture
def config(tmp_path: Path) -> AuditCliConfig:
    """A trail of 20 records (every third refused) with checkpoints, and the CLI's config."""
    store = SqliteAuditStore(tmp_path / "audit.db")

    async def build() -> None:
        await store.open()
        await fill(store, tmp_path, 20)
        await store.close()

    asyncio.run(build())
    return AuditCliConfig(
        store_url="sqlite:///audit.db",
        base_dir=tmp_path,
        key_file=tmp_path / "audit-key.pem",
        checkpoint_export=tmp_path / "checkpoints.jsonl",
        actor="auditor@town.example",
    )


def count(config: AuditCliConfig, flt: AuditFilter) -> int:
    async def go() -> int:
        store = SqliteAuditStore(config.base_dir / "audit.db")
        try:
            return await store.count(flt)
        finally:
            await store.close()

    return asyncio.run(go())


def test_audit_cli_query_table_json_csv(
    config: AuditCliConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """query prints a table, JSON or CSV of the matching records, newest first."""
    assert cli(config, "query", "--decision", "deny") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["time", "(UTC)", "decision"]
    assert len(out) == 1 + 7
    assert all("device-posture-stale" in line for line in out[1:])

    assert cli(config, "query", "--json", "--limit", "3", "--kind", "request") == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in rows] == ["req-19", "req-18", "req-17"]
    assert rows[0]["hash"]
    assert rows[0]["seq"] == 20

    assert cli(config, "query", "--csv", "--reason", "device-posture-stale", "--limit", "2") == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["request_id"] for r in table] == ["req-18", "req-15"]
    assert table[0]["time_utc"].startswith("2026-09-")


def test_audit_cli_views_and_exports_are_recorded(
    config: AuditCliConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export writes oldest-first JSON lines or CSV, and is itself recorded (kind view) —
    with who ran it and the filter — and the trail still verifies."""
    out = tmp_path / "export.jsonl"
    assert cli(config, "export", "--kind", "request", "--format", "jsonl", "-o", str(out)) == 0
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == [f"req-{i}" for i in range(20)]
    assert cli(config, "export", "--decision", "deny", "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7
    assert rows[0]["request_id"] == "req-0"

    assert count(config, AuditFilter(kind="view")) == 2
    assert cli(config, "query", "--kind", "view", "--json") == 0
    views = orjson.loads(capsys.readouterr().out)
    assert views[1]["action"] == "audit.export"
    assert views[1]["actor"] == "auditor@town.example"
    assert views[1]["detail"] == {"count": 20, "filter.kind": "request", "format": "jsonl"}
    assert cli(config, "verify") == 0


def test_audit_cli_verify_names_the_first_bad_record(
    config: AuditCliConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify exits 0 on a sound trail and 1 naming chain, seq and damage after an edit."""
    assert cli(config, "verify") == 0
    assert capsys.readouterr().out.startswith("OK: 20 records in 1 chain(s)")
    conn = sqlite3.connect(config.base_dir / "audit.db")
    conn.execute("DROP TRIGGER audit_records_no_update")
    conn.execute("UPDATE audit_records SET status = 200 WHERE seq = 13")
    conn.commit()
    conn.close()
    assert cli(config, "verify") == 1
    err = capsys.readouterr().err
    assert "FAILED: chain h:1:1 seq 13: edited" in err
    assert cli(config, "verify", "--json") == 1
    report = orjson.loads(capsys.readouterr().out)
    assert report["first_bad"]["seq"] == 13


def test_audit_cli_stats(config: AuditCliConfig, capsys: pytest.CaptureFixture[str]) -> None:
    """stats reports totals, refusals and the most refused reasons."""
    assert cli(config, "stats", "--json", "--kind", "request", "--bucket", "86400") == 0
    st = orjson.loads(capsys.readouterr().out)
    assert (st["total"], st["denied"]) == (20, 7)
    assert st["top_reasons"] == [["device-posture-stale", 7]]


def test_audit_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """keygen writes a 0600 Ed25519 key and its .pub, and never overwrites a key."""
    cfg = AuditCliConfig("sqlite:///a.db", tmp_path, tmp_path / "keys" / "audit.pem")
    assert cli(cfg, "keygen") == 0
    assert stat.S_IMODE((tmp_path / "keys" / "audit.pem").stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "audit.pem.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert cli(cfg, "keygen") == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_audit_cli_retention(config: AuditCliConfig, capsys: pytest.CaptureFixture[str]) -> None:
    """retention deletes up to an old enough checkpoint, records itself, and verify passes."""
    key = load_private_key(config.key_file)

    async def old_checkpoint() -> None:
        store = SqliteAuditStore(config.base_dir / "audit.db")
        head = await store.get("h:1:1", 10)
        assert head is not None
        await store.add_checkpoint(
            Checkpoint("h:1:1", 10, head.hash, T0, 10, "periodic").signed(key)
        )
        await store.close()

    asyncio.run(old_checkpoint())
    assert cli(config, "retention", "--days", "30", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["deleted"] == {"h:1:1": 10}
    assert count(config, AuditFilter(kind="request")) == 10
    assert count(config, AuditFilter(text="audit.retention")) == 1
    assert cli(config, "verify") == 0


def test_audit_cli_times() -> None:
    """Relative times count back from now; ISO times without an offset are UTC."""
    now = 1_800_000_000_000_000
    assert parse_time("24h", now) == now - 86_400_000_000
    assert parse_time("30m", now) == now - 1_800_000_000
    assert parse_time("now", now) == now
    assert parse_time("2026-01-01T00:00:00") == 1_767_225_600_000_000
    assert parse_time("2026-01-01T09:00:00+09:00") == 1_767_225_600_000_000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")
