"""The agent's command line: light imports, bilingual status, honest enrolment state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.cli import main


def test_agent_does_not_load_the_gateway_stack() -> None:
    """A laptop's agent never imports the server stack (it is not even installed there)."""
    code = (
        "import sys, device_agent.cli as c; c.main(['status', '--json']); "
        "heavy = {'uvicorn', 'starlette', 'aiohttp', 'pydantic', 'yaml', 'gateway', 'policies'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.splitlines()
    assert out[-1] == "[]"


def test_status_not_enrolled_in_japanese_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no enrolment record the agent says so, in Japanese unless asked otherwise."""
    monkeypatch.setenv("TABIJI_AGENT_HOME", str(tmp_path))
    monkeypatch.setenv("LANG", "ja_JP.UTF-8")
    assert main(["status"]) == 0
    assert "この端末はまだ登録されていません。" in capsys.readouterr().out
    assert main(["status", "--lang", "en"]) == 0
    assert "This device is not enrolled yet." in capsys.readouterr().out


def test_status_reads_the_enrolment_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An enrolment record gives the device id; a broken one is an error, not a guess."""
    monkeypatch.setenv("TABIJI_AGENT_HOME", str(tmp_path))
    (tmp_path / "enrolment.json").write_text('{"device_id": "pc-17"}', encoding="utf-8")
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device_id"] == "pc-17"
    (tmp_path / "enrolment.json").write_text("{broken", encoding="utf-8")
    assert main(["status", "--lang", "en"]) == 1
    assert "cannot be read" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    """No command, or an unknown one, is a usage error."""
    assert main([]) == 2
    assert main(["fly"]) == 2
