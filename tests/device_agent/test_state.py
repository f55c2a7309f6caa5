"""The agent's state files: atomic, private, validated; a report counter that never goes back."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.state import (
    AgentState,
    Enrolment,
    Fix,
    LastReport,
    ReportCounter,
    StateError,
    write_atomically,
)


def make_enrolment(**changes: object) -> Enrolment:
    values: dict[str, object] = {
        "gateway": "https://gw.example",
        "status": "approved",
        "key_storage": "software",
        "enrolled_at": 1_700_000_000,
        "device_id": "dev-1",
    }
    values.update(changes)
    return Enrolment(**values)  # type: ignore[arg-type]


def test_enrolment_round_trips_in_a_private_directory(tmp_path: Path) -> None:
    """A saved enrolment reads back equal, in a 0700 directory and a 0600 file."""
    state = AgentState(tmp_path / "agent")
    record = make_enrolment(certificate="/x/cert.pem", ca_file="/x/ca.pem")
    state.save_enrolment(record)
    assert state.load_enrolment() == record
    assert stat.S_IMODE(state.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.enrolment_path.stat().st_mode) == 0o600
    assert [p.name for p in state.directory.iterdir()] == ["enrolment.json"]  # no temp left


def test_missing_files_mean_nothing_yet(tmp_path: Path) -> None:
    """No enrolment and no report yet are None, not errors."""
    state = AgentState(tmp_path)
    assert state.load_enrolment() is None
    assert state.load_last_report() is None
    assert state.counter().last() == 0


@pytest.mark.parametrize(
    "content",
    [
        "{broken",
        "[]",
        '{"device_id": "pc-17"}',
        json.dumps({**make_enrolment().to_json(), "status": "happy"}),
        json.dumps({**make_enrolment().to_json(), "enrolled_at": "yesterday"}),
        json.dumps({**make_enrolment().to_json(), "gateway": 7}),
    ],
)
def test_corrupt_enrolment_is_refused_not_guessed(tmp_path: Path, content: str) -> None:
    """A record that is not exactly an enrolment raises state-corrupt naming the file."""
    state = AgentState(tmp_path)
    state.enrolment_path.write_text(content, encoding="utf-8")
    with pytest.raises(StateError) as caught:
        state.load_enrolment()
    assert caught.value.code == "state-corrupt"
    assert caught.value.path == state.enrolment_path


def test_last_report_round_trips_with_fixes(tmp_path: Path) -> None:
    """The last answer keeps its reasons and both languages of every fix."""
    state = AgentState(tmp_path)
    last = LastReport(
        at=1_700_000_100,
        accepted=True,
        status="approved",
        reasons=("device-disk-unencrypted",),
        fixes=(
            Fix(
                "device-disk-unencrypted",
                {"ja": "ディスクの暗号化が無効です", "en": "Disk encryption is off"},
                {"ja": "設定 → … で有効にしてください", "en": "Turn it on in Settings → …"},
            ),
        ),
    )
    state.save_last_report(last)
    assert state.load_last_report() == last


def test_forget_enrolment_keeps_other_files(tmp_path: Path) -> None:
    """Forgetting a refused enrolment removes only the record."""
    state = AgentState(tmp_path)
    state.save_enrolment(make_enrolment())
    state.counter().next()
    state.forget_enrolment()
    assert state.load_enrolment() is None
    assert state.counter().last() > 0


def test_counter_increases_across_restarts_even_when_the_clock_stands_still(tmp_path: Path) -> None:
    """With a frozen clock each new counter object still continues above the persisted value."""
    path = tmp_path / "counter"
    seen = [ReportCounter(path, clock=lambda: 1000.0).next() for _ in range(5)]
    assert seen == [1_000_000, 1_000_001, 1_000_002, 1_000_003, 1_000_004]


def test_counter_survives_the_clock_stepping_back(tmp_path: Path) -> None:
    """A clock set back by an hour cannot make the counter repeat or decrease."""
    path = tmp_path / "counter"
    first = ReportCounter(path, clock=lambda: 5000.0).next()
    second = ReportCounter(path, clock=lambda: 5000.0 - 3600).next()
    assert second == first + 1


def test_counter_survives_a_lost_file_because_the_clock_moved_on(tmp_path: Path) -> None:
    """If the file is lost (restored backup, deleted), the clock-derived value is still above
    every counter sent before — that is why the clock takes part."""
    path = tmp_path / "counter"
    now = [10_000.0]
    counter = ReportCounter(path, clock=lambda: now[0])
    sent = [counter.next() for _ in range(100)]  # 100 reports within one millisecond's worth
    path.unlink()
    now[0] += 1.0  # the next report comes a second later at the earliest
    assert ReportCounter(path, clock=lambda: now[0]).next() > max(sent)


def test_counter_survives_a_crash_between_write_and_rename(tmp_path: Path) -> None:
    """A process killed after writing the temporary file but before the rename leaves the old
    value in force, the leftover temporary file is ignored, and the next value is still higher
    than every value ever returned."""
    path = tmp_path / "counter"
    counter = ReportCounter(path)
    issued = [counter.next() for _ in range(3)]
    crash = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from device_agent.state import ReportCounter
        os.replace = lambda *a: os._exit(137)  # the power goes out right before the rename
        print(ReportCounter(Path({str(path)!r})).next())
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", crash], capture_output=True, text=True, timeout=30, check=False
    )
    assert run.returncode == 137
    assert run.stdout == ""  # the crashed process never handed out (or sent) a value
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the crash left its temporary file behind"
    assert ReportCounter(path).last() == issued[-1]
    assert ReportCounter(path).next() > issued[-1]


def test_counter_refuses_a_corrupt_file(tmp_path: Path) -> None:
    """A counter file that is not a number is an error, never silently restarted at zero."""
    path = tmp_path / "counter"
    path.write_text("twelve\n", encoding="ascii")
    with pytest.raises(StateError) as caught:
        ReportCounter(path).next()
    assert caught.value.code == "state-corrupt"


def test_write_atomically_replaces_whole_files(tmp_path: Path) -> None:
    """The target holds the new bytes, with the requested mode, and no temporary file stays."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    write_atomically(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
