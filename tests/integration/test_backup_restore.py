"""Backing up the audit store while a real gateway writes to it, restoring into a fresh file or
database, and checking the restore as deploy/OPERATIONS.md says: `tabiji audit verify` on the
restored copy, then against the off-box checkpoint export — which names what an old backup
lacks. SQLite (the backup API, from Python and the sqlite3 shell) and PostgreSQL
(pg_dump/pg_restore)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .audit_env import (
    audit_block,
    burst,
    fresh_database,
    must_have,
    requests_by_id,
    sqlite_files,
    sqlite_url,
    tabiji,
)
from .conftest import REPO, Gateway, Upstream, gateway_config, route, run_gateway

pytestmark = pytest.mark.integration

CHECKPOINT_INTERVAL = "500ms"  # several exported checkpoints after the backup, in seconds


def _builder(directory: Path, upstream: Upstream, store: str) -> Callable[[int], dict[str, Any]]:
    """A public route and a durable audit trail with frequent checkpoints exported off the box
    (here: a file beside it)."""

    def build(port: int) -> dict[str, Any]:
        frm = f"http://127.0.0.1:{port}"
        return gateway_config(
            port,
            [route("root", frm, f"http://127.0.0.1:{upstream.port}", public=True)],
            audit=audit_block(
                directory,
                store=store,
                durability="durable",
                checkpoint_interval=CHECKPOINT_INTERVAL,
            ),
        )

    return build


def _wait(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _exported(directory: Path) -> int:
    path = directory / "checkpoints.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def restored_config(live: Path, directory: Path, store: str) -> Path:
    """The live config with the audit store pointing at the restore (and no export of its own:
    the auditors' export is given to verify explicitly)."""
    config = yaml.safe_load(live.read_text("utf-8"))
    config["audit"]["store"] = store
    config["audit"].pop("checkpoint_export")
    config["audit"]["spool_dir"] = str(directory / "spool")
    path = directory / "restored.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
    return path


def verify_json(config: Path, store: str, export: Path) -> tuple[int, dict[str, Any]]:
    """The documented recipe: the live config with the store overridden from the environment,
    `TABIJI_AUDIT__STORE=URL tabiji audit verify --json --export EXPORT`; (exit code, report)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
    env["TABIJI_AUDIT__STORE"] = store
    command = [sys.executable, "-m", "gateway.cli", "audit", "verify", "--json"]
    command += ["--export", str(export), "--config", str(config)]
    done = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


def cut_export(export: Path, until_us: int, out: Path) -> Path:
    """The documented recipe: the auditors' checkpoints up to the backup's newest checkpoint
    (`jq -c 'select(.time_us <= T)'`; the same filter in Python where jq is missing)."""
    jq = shutil.which("jq")
    if jq is not None:
        done = subprocess.run(
            [jq, "-c", f"select(.time_us <= {until_us})", str(export)],
            capture_output=True,
            check=True,
        )
        out.write_bytes(done.stdout)
    else:
        lines = export.read_bytes().splitlines()
        kept = [line for line in lines if json.loads(line)["time_us"] <= until_us]
        out.write_bytes(b"".join(line + b"\n" for line in kept))
    return out


def check_restore(
    live: Gateway, directory: Path, store: str, seen_before: set[str], *, old: bool
) -> int:
    """The restore procedure's checks: the copy verifies on its own and against the auditors'
    checkpoints up to the backup; every request answered before the backup is in it; against
    the whole export an old backup is named as missing records, an up-to-date one passes.
    Returns the copy's newest checkpoint time (T of the recipe)."""
    export = live.config_path.parent / "checkpoints.jsonl"
    code, alone = verify_json(live.config_path, store, Path("/dev/null"))
    assert code == 0, alone
    assert alone["records_checked"] > 0
    upto = cut_export(export, alone["last_checkpoint_us"], directory / "upto.jsonl")
    code, matched = verify_json(live.config_path, store, upto)
    assert code == 0, matched
    assert matched["checkpoints_checked"] > alone["checkpoints_checked"]  # the export's too
    code, whole = verify_json(live.config_path, store, export)
    if old:
        assert code == 1, whole
        assert whole["first_bad"]["what"] == "truncated", whole
        assert "chain ends at seq" in whole["first_bad"]["detail"]
    else:
        assert code == 0, whole
    records = requests_by_id(restored_config(live.config_path, directory, store))
    assert not seen_before - set(records), "a request answered before the backup is missing"
    until_us: int = alone["last_checkpoint_us"]
    return until_us


def traffic_then_backup(gw: Gateway, directory: Path, backup: Callable[[], None]) -> set[str]:
    """Requests from 6 clients; `backup()` runs mid-traffic after a few checkpoints; traffic
    goes on until more checkpoints are exported. Returns the request ids answered before the
    backup began."""
    with burst(gw.url("/traffic/x"), threads=6) as load:
        assert _wait(lambda: len(load.seen) >= 100 and _exported(directory) >= 2)
        seen_before = set(load.seen)
        exported_before = _exported(directory)
        backup()
        assert _wait(lambda: _exported(directory) >= exported_before + 3)
    assert load.errors == 0
    return seen_before


def test_sqlite_online_backup_restores_and_verifies(upstream: Upstream, tmp_path: Path) -> None:
    """A backup taken with SQLite's backup API while the gateway writes (Python's
    Connection.backup, and the sqlite3 shell's .backup) restores to a file that verifies; the
    off-box export shows the mid-traffic backup lacks the later records, and a backup taken
    after a clean stop lacks nothing. Put into service (export archived, a new one started), the
    old backup serves and verifies, while the archive still proves what survived and the gap."""
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    db = live_dir / "audit.db"
    backups = tmp_path / "backups"
    backups.mkdir()

    def backup() -> None:
        # The recipe of deploy/OPERATIONS.md: consistent under WAL while the gateway writes.
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        target = sqlite3.connect(backups / "mid.db")
        with target:
            source.backup(target)
        target.close()
        source.close()
        shell = shutil.which("sqlite3")
        if shell is not None:
            subprocess.run([shell, str(db), f".backup '{backups / 'mid-shell.db'}'"], check=True)

    with run_gateway(live_dir, _builder(live_dir, upstream, sqlite_url(db))) as gw:
        seen_before = traffic_then_backup(gw, live_dir, backup)
        assert gw.stop() == 0  # the closing checkpoint is exported too
    final = sqlite3.connect(backups / "final.db")
    source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with final:
        source.backup(final)
    final.close()
    source.close()

    restore_dir = tmp_path / "restore"
    restore_dir.mkdir()
    restored = restore_dir / "audit.db"
    shutil.copyfile(backups / "mid.db", restored)
    backup_until = check_restore(gw, restore_dir, sqlite_url(restored), seen_before, old=True)

    if (backups / "mid-shell.db").exists():
        shell_dir = tmp_path / "restore-shell"
        shell_dir.mkdir()
        shutil.copyfile(backups / "mid-shell.db", shell_dir / "audit.db")
        check_restore(gw, shell_dir, sqlite_url(shell_dir / "audit.db"), seen_before, old=True)

    final_dir = tmp_path / "restore-final"
    final_dir.mkdir()
    shutil.copyfile(backups / "final.db", final_dir / "audit.db")
    check_restore(gw, final_dir, sqlite_url(final_dir / "audit.db"), seen_before, old=False)

    # OPERATIONS.md §2.4: the mid-traffic backup into service. The auditors archive their
    # export; the gateway starts a new one (the same path, now empty).
    archived = tmp_path / "archived-checkpoints.jsonl"
    (live_dir / "checkpoints.jsonl").rename(archived)
    for path in sqlite_files(db):
        path.unlink(missing_ok=True)
    shutil.copyfile(backups / "mid.db", db)
    with run_gateway(live_dir, _builder(live_dir, upstream, sqlite_url(db))) as again:
        with httpx.Client(base_url=again.origin, timeout=10) as client:
            for i in range(5):
                assert client.get(f"/after-restore/{i}").status_code == 200
        assert again.stop() == 0
    serving = tabiji(again.config_path, "audit", "verify")
    assert serving.returncode == 0, serving.stdout + serving.stderr
    code, gap = verify_json(again.config_path, sqlite_url(db), archived)
    assert code == 1, gap
    assert gap["first_bad"]["what"] == "truncated"
    upto = cut_export(archived, backup_until, tmp_path / "archived-upto.jsonl")
    code, survived = verify_json(again.config_path, sqlite_url(db), upto)
    assert code == 0, survived


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    must_have(path is not None, f"{name} (postgresql-client) is needed for the PostgreSQL backup")
    assert path is not None
    return path


def test_postgres_dump_restores_and_verifies(upstream: Upstream, tmp_path: Path) -> None:
    """pg_dump -Fc taken while the gateway writes restores with pg_restore into a new
    database that verifies; against the off-box export it is named as missing the records
    written after the dump."""
    pg_dump, pg_restore = _pg_tool("pg_dump"), _pg_tool("pg_restore")
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    dump = tmp_path / "audit.dump"
    with fresh_database() as live_url, fresh_database() as restore_url:

        def backup() -> None:
            subprocess.run([pg_dump, "-Fc", "-d", live_url, "-f", str(dump)], check=True)

        with run_gateway(live_dir, _builder(live_dir, upstream, live_url)) as gw:
            seen_before = traffic_then_backup(gw, live_dir, backup)
            assert gw.stop() == 0
        subprocess.run(
            [pg_restore, "--no-owner", "--no-privileges", "-d", restore_url, str(dump)],
            check=True,
        )
        restore_dir = tmp_path / "restore"
        restore_dir.mkdir()
        check_restore(gw, restore_dir, restore_url, seen_before, old=True)
