"""`tabiji devices list|show|approve|revoke|tag` end to end: a real config file, the SQLite
device store it names, and the audit trail every change is written to."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from registry_helpers import T0, new_device

from gateway.audit.query import AuditFilter
from gateway.audit.record import AuditRecord
from gateway.audit.store_sqlite import SqliteAuditStore
from gateway.cli import main
from gateway.devices.model import DeviceRecord
from gateway.devices.store_sqlite import SqliteDeviceStore

CONFIG = """\
public_url: https://gw.town.example
routes:
  - name: groupware
    from: https://groupware.town.example/
    to: http://127.0.0.1:9001/
    public: true
"""


class Setup:
    """A config in tmp_path, its device store seeded with sato's pending laptop and ito's
    approved one."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(CONFIG, encoding="utf-8")
        self.sato_id = "dev-sato-1"
        self.ito_id = "dev-ito-1"

        async def seed() -> None:
            store = SqliteDeviceStore(tmp_path / "devices.db")
            await store.add(new_device(id=self.sato_id, created_at=T0)[0])
            await store.add(
                new_device(
                    id=self.ito_id,
                    status="approved",
                    owner_subject="u-ito",
                    owner_email="ito@town.example",
                    hostname="ito-desk",
                    tags=frozenset({"town-issued"}),
                    created_at=T0 + 1,
                )[0]
            )
            await store.close()

        asyncio.run(seed())

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        code = main(["devices", *argv, "--config", str(self.config)])
        out, err = capsys.readouterr()
        return code, out, err

    def device(self, device_id: str) -> DeviceRecord:
        async def get() -> DeviceRecord:
            store = SqliteDeviceStore(self.dir / "devices.db")
            try:
                record = await store.get(device_id)
            finally:
                await store.close()
            assert record is not None
            return record

        return asyncio.run(get())

    def admin_records(self) -> list[AuditRecord]:
        async def query() -> list[AuditRecord]:
            store = SqliteAuditStore(self.dir / "audit.db")
            try:
                return await store.query(AuditFilter(kind="admin"), 100)
            finally:
                await store.close()

        return list(reversed(asyncio.run(query())))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """Two seeded devices behind a real config file."""
    return Setup(tmp_path)


def test_list_as_table_and_json(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """list prints every device (a table, or JSON), narrowed by --status and --owner."""
    code, out, err = setup.run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATUS", "OWNER"]
    assert [line.split()[0] for line in lines[1:]] == [setup.sato_id, setup.ito_id]
    assert "2 device(s)" in err
    code, out, _ = setup.run(capsys, "list", "--json", "--status", "approved")
    assert code == 0
    [only] = json.loads(out)
    assert (only["id"], only["status"], only["tags"]) == (setup.ito_id, "approved", ["town-issued"])
    assert only["owner"]["email"] == "ito@town.example"
    code, out, _ = setup.run(capsys, "list", "--json", "--owner", "SATO@town.example")
    assert [d["id"] for d in json.loads(out)] == [setup.sato_id]


def test_show_one_device(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints the device in full; an unknown id exits 1 with device-unknown."""
    code, out, _ = setup.run(capsys, "show", setup.ito_id)
    assert code == 0
    assert "ito@town.example" in out
    assert "ito-desk" in out
    assert "(no report accepted yet)" in out
    code, out, _ = setup.run(capsys, "show", setup.ito_id, "--json")
    assert json.loads(out)["hostname"] == "ito-desk"
    code, out, err = setup.run(capsys, "show", "dev-nope")
    assert (code, out) == (1, "")
    assert "dev-nope" in err
    code, out, _ = setup.run(capsys, "show", "dev-nope", "--json")
    assert (code, json.loads(out)["error"]) == (1, "device-unknown")


def test_approve_is_stored_and_audited(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """approve turns a pending device approved, with the actor, and writes one audit record;
    approving again changes and records nothing."""
    code, out, _ = setup.run(capsys, "approve", setup.sato_id, "--actor", "it-admin@town")
    assert code == 0
    assert "approved" in out
    record = setup.device(setup.sato_id)
    assert (record.status, record.actor) == ("approved", "it-admin@town")
    code, out, _ = setup.run(capsys, "approve", setup.sato_id)
    assert (code, "already approved" in out) == (0, True)
    [audit] = setup.admin_records()
    assert (audit.event.action, audit.event.actor) == ("device.approve", "it-admin@town")
    assert audit.event.detail["device"] == setup.sato_id
    assert audit.event.detail["owner"] == "sato@town.example"


def test_revoke_is_final_and_audited(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """revoke revokes for good (default actor: the OS user); a second revoke exits 1."""
    code, out, _ = setup.run(capsys, "revoke", setup.ito_id, "--json")
    assert code == 0
    assert json.loads(out)["device"]["status"] == "revoked"
    assert setup.device(setup.ito_id).status == "revoked"
    code, out, err = setup.run(capsys, "revoke", setup.ito_id)
    assert code == 1
    assert "device-revoked" in err
    code, _, err = setup.run(capsys, "approve", setup.ito_id)
    assert (code, "device-revoked" in err) == (1, True)
    [audit] = setup.admin_records()
    assert audit.event.action == "device.revoke"
    assert "(cli)" in (audit.event.actor or "")


def test_tag_adds_and_removes(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """tag --add/--remove/--clear changes the tags, audited; a bad tag exits 1 unchanged."""
    code, out, _ = setup.run(capsys, "tag", setup.ito_id, "--add", "finance", "--add", "Kiosk")
    assert (code, out.strip()) == (0, f"{setup.ito_id}: tags finance,kiosk,town-issued")
    assert setup.device(setup.ito_id).tags == frozenset({"town-issued", "finance", "kiosk"})
    code, _, _ = setup.run(capsys, "tag", setup.ito_id, "--remove", "town-issued")
    assert code == 0
    assert setup.device(setup.ito_id).tags == frozenset({"finance", "kiosk"})
    code, _, _ = setup.run(capsys, "tag", setup.ito_id, "--clear", "--add", "x")
    assert setup.device(setup.ito_id).tags == frozenset({"x"})
    code, _, err = setup.run(capsys, "tag", setup.ito_id, "--add", "no spaces")
    assert (code, "device-tag-invalid" in err) == (1, True)
    assert setup.device(setup.ito_id).tags == frozenset({"x"})
    audits = setup.admin_records()
    assert [a.event.action for a in audits] == ["device.tag"] * 3
    assert audits[0].event.detail["tags"] == "finance,kiosk,town-issued"
    assert audits[0].event.detail["before"] == "town-issued"


def test_usage_errors_exit_2(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing subcommand, a bad status, tag without a change, unknown device for a change."""
    assert main(["devices"]) == 2
    assert main(["devices", "list", "--status", "lost", "--config", str(setup.config)]) == 2
    code, _, err = setup.run(capsys, "tag", setup.ito_id)
    assert (code, "--add" in err) == (2, True)
    code, _, _ = setup.run(capsys, "list", "--limit", "0")
    assert code == 2
    code, _, _ = setup.run(capsys, "approve", "dev-nope")
    assert code == 1
    assert setup.admin_records() == []


def test_needs_a_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config or $TABIJI_CONFIG the command says so and exits 2."""
    monkeypatch.delenv("TABIJI_CONFIG", raising=False)
    assert main(["devices", "list"]) == 2
    assert "--config" in capsys.readouterr().err
