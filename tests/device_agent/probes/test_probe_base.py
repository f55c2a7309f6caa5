"""The probe framework: the one command helper, the deadline, merging, and never raising."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from device_agent.probes import DEFAULT_TIMEOUT, probe_for_platform
from device_agent.probes.base import (
    CommandResult,
    PlatformProber,
    ProbeContext,
    UnknownPlatformProber,
    clean_text,
    days_since,
    merge_facts,
    platform_prober,
    resolve_command,
    run_command,
)
from device_agent.probes.overrides import OverridingProber
from device_agent.report import PostureFacts

SLEEP = shutil.which("sleep") or "/usr/bin/sleep"


def test_run_command_captures_output_and_status() -> None:
    """A command's stdout, stderr and exit status come back as text, also for a failure."""
    result = run_command(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert result == CommandResult(3, "out\n", "err\n")
    assert not result.ok


def test_run_command_runs_in_the_c_locale_without_a_shell() -> None:
    """Commands see LC_ALL=C (untranslated output) and their argv verbatim (no shell expansion)."""
    result = run_command(["env"], 10)
    assert result is not None
    assert "LC_ALL=C" in result.stdout.splitlines()
    echoed = run_command(["echo", "$HOME; *"], 10)
    assert echoed is not None
    assert echoed.stdout == "$HOME; *\n"


def test_missing_command_is_none() -> None:
    """A command that is not installed yields None, not an exception."""
    assert run_command(["tabiji-no-such-command-xyz"], 10) is None
    assert run_command(["/nonexistent/dir/tool"], 10) is None
    assert resolve_command("tabiji-no-such-command-xyz") is None


def test_sleeping_command_times_out_as_none() -> None:
    """A command slower than its timeout is killed and yields None long before it would end."""
    started = time.monotonic()
    assert run_command([SLEEP, "60"], 0.3) is None
    assert time.monotonic() - started < 30  # the sleep was killed, not waited for


def test_command_without_execute_permission_is_none(tmp_path: Path) -> None:
    """A command that may not be executed (permission denied, even for root) yields None."""
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    assert run_command([str(script)], 10) is None


def test_overlong_output_is_none() -> None:
    """Output beyond the bound kills the command and yields None, never a truncated answer."""
    assert run_command(["head", "-c", "100000", "/dev/zero"], 10, max_output=1000) is None
    small = run_command(["head", "-c", "500", "/dev/zero"], 10, max_output=1000)
    assert small is not None
    assert len(small.stdout) == 500


def test_no_time_left_runs_nothing() -> None:
    """Once the collection's deadline has passed, a probe's command is not started at all."""
    calls: list[Sequence[str]] = []

    def runner(argv: Sequence[str], timeout: float) -> CommandResult | None:
        calls.append(argv)
        return CommandResult(0, "", "")

    context = ProbeContext(runner=runner, deadline=time.monotonic() - 1, now=time.time())
    assert context.run("true") is None
    assert calls == []


def test_a_runner_that_raises_costs_only_that_command() -> None:
    """An exception inside a runner becomes None for that command."""

    def runner(argv: Sequence[str], timeout: float) -> CommandResult | None:
        raise RuntimeError("boom")

    context = ProbeContext(runner=runner, deadline=time.monotonic() + 5, now=time.time())
    assert context.run("anything") is None
    assert context.output("anything") is None


def test_context_reads_files_under_its_root_with_a_bound(tmp_path: Path) -> None:
    """Files are read under the context's root; missing or oversized files are None."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "small").write_text("hello")
    (tmp_path / "etc" / "big").write_bytes(b"x" * 2000)
    context = ProbeContext(
        runner=run_command, deadline=time.monotonic() + 5, now=time.time(), root=tmp_path
    )
    assert context.read_text("/etc/small") == "hello"
    assert context.read_text("/etc/big", limit=1000) is None
    assert context.read_text("/etc/missing") is None
    assert context.mtime("/etc/small") is not None
    assert context.mtime("/etc/missing") is None


def _kernel(context: ProbeContext) -> PostureFacts:
    return PostureFacts(kernel="6.1.0")


def _broken(context: ProbeContext) -> PostureFacts:
    raise ValueError("parser bug")


def _bad_values(context: ProbeContext) -> PostureFacts:
    return PostureFacts(os_name="line\nbreak", patch_age_days=-3, firewall=True)


def test_a_failing_probe_costs_only_its_fact() -> None:
    """A probe that raises leaves its facts unknown; the others' facts are still reported."""
    prober = PlatformProber("linux", [_broken, _kernel])
    assert prober.collect(5) == PostureFacts(os="linux", kernel="6.1.0")


def test_values_the_gateway_would_refuse_are_dropped() -> None:
    """A fact the wire contract would reject is reported unknown, the valid ones are kept."""
    facts = PlatformProber("linux", [_bad_values]).collect(5)
    assert facts == PostureFacts(os="linux", firewall=True)
    assert PostureFacts.from_json(facts.to_json()) == facts


def test_merge_keeps_the_first_known_value() -> None:
    """Merging takes each fact's first known value, in probe order."""
    merged = merge_facts(
        [
            PostureFacts(os="linux"),
            PostureFacts(kernel="a"),
            PostureFacts(kernel="b", firewall=False),
        ]
    )
    assert merged == PostureFacts(os="linux", kernel="a", firewall=False)


def test_text_and_age_helpers() -> None:
    """Text facts are trimmed and printable; ages are whole days and never negative."""
    assert clean_text("  Debian 12 \n") == "Debian 12"
    assert clean_text("x" * 500) == "x" * 200
    assert clean_text("bad\x00text") is None
    assert clean_text("   ") is None
    assert days_since(0, 86400 * 3 + 5) == 3
    assert days_since(1000, 10) == 0


def test_collect_is_bounded_by_its_timeout_with_a_real_sleep() -> None:
    """Every command replaced by a real 60 s `sleep`: collect() returns well before, with every
    command-read fact unknown and the file-read facts still known."""
    from device_agent.probes.linux import linux_prober

    def sleeping(argv: Sequence[str], timeout: float) -> CommandResult | None:
        return run_command([SLEEP, "60"], timeout)

    started = time.monotonic()
    facts = linux_prober(runner=sleeping, environ={}, is_root=True).collect(1.0)
    assert time.monotonic() - started < 30
    assert facts.os == "linux"
    assert facts.kernel is not None
    assert facts.screen_lock is None
    assert facts.auto_update is None  # apt-config and dpkg-query were cut off


@pytest.mark.parametrize(
    ("system", "os_name"), [("Linux", "linux"), ("Darwin", "macos"), ("Windows", "windows")]
)
def test_platform_selection(system: str, os_name: str) -> None:
    """probe_for_platform picks the OS's probes by platform.system() name, under the override."""
    prober = probe_for_platform(system)
    assert isinstance(prober, OverridingProber)
    inner = prober.inner
    assert isinstance(inner, PlatformProber)
    assert inner.os_name == os_name
    assert inner.probes


def test_unknown_platform_reports_nothing() -> None:
    """On an OS without probes every fact is unknown and nothing fails."""
    assert isinstance(platform_prober("Plan9"), UnknownPlatformProber)
    assert probe_for_platform("Plan9").collect(DEFAULT_TIMEOUT) == PostureFacts()


def test_windows_probes_on_this_machine_find_nothing_and_do_not_fail() -> None:
    """Another OS's probes run here find none of their commands: all unknown, no exception."""
    if os.name != "posix":
        pytest.skip("checks the absence of Windows tools")
    facts = platform_prober("Windows").collect(5)
    assert facts == PostureFacts(os="windows")
