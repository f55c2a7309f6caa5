"""`tabiji check-config` as an operator runs it: every error with file:line:column, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration

BROKEN = """\
listen:
  host: 127.0.0.1
  port: 99999
public_url: ftp://gw.example
routs: []
server:
  workrs: 2
routes:
  - name: Bad Name
    from: http://app.example
    to: http://127.0.0.1:9000
    publik: true
"""

VALID = """\
listen: {host: 127.0.0.1, port: 8080}
public_url: https://gw.town.example
trusted_proxies: [10.0.0.0/8]
routes:
  - name: groupware
    from: https://gw.town.example/groupware
    to: http://127.0.0.1:9001
    public: true
"""


def check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_broken_config_reports_every_error_with_position(tmp_path: Path) -> None:
    """A broken file gives exit 1 and one file:line:column line per error, in reading order."""
    path = tmp_path / "gateway.yaml"
    path.write_text(BROKEN, "utf-8")
    result = check_config(path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"6 problems in {path}"
    errors = lines[:-1]
    assert len(errors) == 6
    positions = []
    for line in errors:
        match = re.match(rf"{re.escape(str(path))}:(\d+):(\d+): (.+)", line)
        assert match, line
        positions.append((int(match.group(1)), int(match.group(2))))
    assert positions == sorted(positions)
    assert [line for line, _ in positions] == [3, 4, 5, 7, 9, 12]
    assert "listen.port" in errors[0]
    assert "http:// or https://" in errors[1]
    assert "name" in errors[4]


def test_unknown_keys_are_errors_with_did_you_mean(tmp_path: Path) -> None:
    """Unknown keys (typos) are errors that suggest the key that was meant."""
    path = tmp_path / "gateway.yaml"
    path.write_text(BROKEN, "utf-8")
    stderr = check_config(path).stderr
    assert f"{path}:5:1: unknown key 'routs' — did you mean 'routes'?" in stderr
    assert f"{path}:7:3: unknown key 'workrs' — did you mean 'workers'?" in stderr
    assert f"{path}:12:5: unknown key 'publik' — did you mean 'public'?" in stderr


def test_a_lone_typo_fails_an_otherwise_valid_config(tmp_path: Path) -> None:
    """A single misspelt key fails the whole check (a typo must not silently weaken security)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID.replace("    public: true", "    public: true\n    polcy: strict"))
    result = check_config(path)
    assert result.returncode == 1
    assert f"{path}:9:5: unknown key 'polcy' — did you mean 'policy'?" in result.stderr


def test_broken_config_as_json(tmp_path: Path) -> None:
    """--json lists each error with file, line, column, message and hint."""
    path = tmp_path / "gateway.yaml"
    path.write_text(BROKEN, "utf-8")
    result = check_config(path, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert len(report["errors"]) == 6
    routs = next(e for e in report["errors"] if "routs" in e["message"])
    assert (routs["line"], routs["column"], routs["hint"]) == (5, 1, "did you mean 'routes'?")


def test_valid_config_exits_0(tmp_path: Path) -> None:
    """A valid file gives exit 0 and names its routes."""
    path = tmp_path / "gateway.yaml"
    path.write_text(VALID, "utf-8")
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert "groupware" in result.stdout


def test_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    """`tabiji serve` with a broken config reports the errors and exits 1 without serving."""
    path = tmp_path / "gateway.yaml"
    path.write_text(BROKEN, "utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "did you mean 'routes'?" in result.stderr
