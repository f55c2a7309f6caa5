"""The probe framework: one helper runs every external command, one context carries the deadline,
and a platform prober runs small fact probes side by side and merges what they found.

Rules every probe follows (so a report never lies by omission or by accident):
- a fact that could not be read is None (*unknown*), never False and never an exception;
- commands run without a shell, from argv lists, with LC_ALL=C, a timeout taken from the
  collection's deadline and bounded output; a missing command, a non-zero exit the parser does not
  expect, a timeout or an overlong output all make the fact unknown;
- nothing asks for elevation (no sudo, no UAC): a probe that needs root answers only when the
  agent already is root, and otherwise leaves its fact unknown;
- parsers are pure functions (text in, typed value out) so they are tested against recorded
  outputs in tests/device_agent/probes/fixtures/; the probes only fetch the text.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Protocol

from device_agent.report import MAX_FACT_TEXT, OsName, PostureFacts, ReportInvalid

log = logging.getLogger("device_agent.probes")

DEFAULT_TIMEOUT: Final = 15.0  # seconds for a whole collection; the slowest command decides
MAX_OUTPUT: Final = 2 * 1024 * 1024  # per stream; a firewalld nft ruleset is a few hundred KiB
MAX_FILE: Final = 1024 * 1024
WORKERS: Final = 4  # probes wait on commands, not on the CPU; Windows' PowerShell starts slowly
_REAP_GRACE: Final = 1.0  # seconds to collect a killed command and its output threads
# Unprivileged users on Debian lack the sbin directories in PATH, where ufw and nft live.
_SBIN_DIRS: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A command that ran to its end (any exit status) within its time and output bounds."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Runner(Protocol):
    """Runs argv within `timeout` seconds; None when it could not run or finish."""

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult | None: ...


class Prober(Protocol):
    """What the agent's runner calls: every fact it can read within `timeout` seconds."""

    def collect(self, timeout: float) -> PostureFacts: ...


def resolve_command(name: str) -> str | None:
    """The executable for `name`: PATH (plus the sbin directories on POSIX), or None if absent."""
    if os.path.isabs(name):
        return name if os.path.exists(name) else None
    search = os.environ.get("PATH", os.defpath)
    if os.name == "posix":
        search = os.pathsep.join([search, *_SBIN_DIRS])
    return shutil.which(name, path=search)


class _OutputReader:
    """Drains one pipe on a thread (portable: Windows has no select() on pipes), up to a limit.

    Past the limit it kills the command: a probe never parses a truncated answer."""

    def __init__(self, stream: IO[bytes], limit: int, on_overflow: Callable[[], None]) -> None:
        self._stream = stream
        self._limit = limit
        self._on_overflow = on_overflow
        self._chunks: list[bytes] = []
        self.overflowed = False
        self._thread = threading.Thread(target=self._drain, daemon=True, name="tabiji-probe-io")
        self._thread.start()

    def _drain(self) -> None:
        size = 0
        try:
            while chunk := os.read(self._stream.fileno(), 65536):
                size += len(chunk)
                if size > self._limit:
                    self.overflowed = True
                    self._on_overflow()
                    return
                self._chunks.append(chunk)
        except (OSError, ValueError):
            return

    def finish(self, grace: float) -> str | None:
        """The text read, or None if the pipe is still held open (a grandchild) or overflowed."""
        self._thread.join(grace)
        if self._thread.is_alive():
            return None  # a daemon thread left blocked on the pipe; it ends when the pipe closes
        self._stream.close()
        if self.overflowed:
            return None
        return b"".join(self._chunks).decode("utf-8", errors="replace")


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Kill the command and, on POSIX, everything it started in its own session."""
    with contextlib.suppress(OSError):  # already gone
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()


def _spawn(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """The started command, or None when it is missing or may not be executed."""
    executable = resolve_command(argv[0])
    if executable is None:
        log.debug("probe command not found: %s", argv[0])
        return None
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C"}  # untranslated, parseable output
    try:
        return subprocess.Popen(  # noqa: S603 — fixed argv lists, never a shell
            [executable, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            start_new_session=os.name == "posix",  # so a timeout kills its children too
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console flash
        )
    except OSError as error:  # permission denied, exec format error, …
        log.debug("probe command %s could not start: %s", argv[0], error)
        return None


def run_command(
    argv: Sequence[str], timeout: float, *, max_output: int = MAX_OUTPUT
) -> CommandResult | None:
    """Run one probe command; None when it is missing, not permitted, too slow or too talkative."""
    process = _spawn(argv) if argv and timeout > 0 else None
    if process is None or process.stdout is None or process.stderr is None:
        return None
    stdout = _OutputReader(process.stdout, max_output, lambda: _kill(process))
    stderr = _OutputReader(process.stderr, max_output, lambda: _kill(process))
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.debug("probe command %s timed out after %.1f s", argv[0], timeout)
        _kill(process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(_REAP_GRACE)
        stdout.finish(_REAP_GRACE)
        stderr.finish(_REAP_GRACE)
        return None
    out, err = stdout.finish(_REAP_GRACE), stderr.finish(_REAP_GRACE)
    if out is None or err is None:
        log.debug("probe command %s: output over %d bytes or held open", argv[0], max_output)
        return None
    return CommandResult(returncode, out, err)


def clean_text(value: str | None) -> str | None:
    """A text fact as the wire accepts it (printable, ≤ MAX_FACT_TEXT), or None."""
    if value is None:
        return None
    value = value.strip()[:MAX_FACT_TEXT].strip()
    return value if value and value.isprintable() else None


def days_since(then: float, now: float) -> int:
    """Whole days from `then` to `now` (unix seconds); a timestamp in the future counts as 0."""
    return max(0, int((now - then) // 86400))


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """What a probe may use: commands (bounded by the deadline), files under `root`, the env."""

    runner: Runner
    deadline: float  # time.monotonic() by which every command has finished
    now: float  # wall clock at the start of the collection (unix seconds)
    root: Path = Path("/")
    is_root: bool = False
    environ: Mapping[str, str] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, *argv: str) -> CommandResult | None:
        """The command's result within what is left of the deadline, or None."""
        remaining = self.remaining()
        if remaining <= 0:
            return None
        try:
            return self.runner(argv, remaining)
        except Exception:  # a runner bug must cost one fact, not the report
            log.exception("probe runner failed for %s", argv[0] if argv else "?")
            return None

    def output(self, *argv: str) -> str | None:
        """stdout of a command that exited 0, else None."""
        result = self.run(*argv)
        return result.stdout if result is not None and result.ok else None

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def read_bytes(self, path: str, limit: int = MAX_FILE) -> bytes | None:
        """A file's content if it is readable and not larger than `limit`, else None."""
        try:
            with self.path(path).open("rb") as stream:
                data = stream.read(limit + 1)
        except OSError:
            return None
        return data if len(data) <= limit else None

    def read_text(self, path: str, limit: int = MAX_FILE) -> str | None:
        data = self.read_bytes(path, limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def mtime(self, path: str) -> float | None:
        try:
            return self.path(path).stat().st_mtime
        except OSError:
            return None


# A probe reads one fact (or a few that come from the same place) and returns only those set.
Probe = Callable[[ProbeContext], PostureFacts]

_FIELDS: Final = tuple(f.name for f in dataclasses.fields(PostureFacts))


def merge_facts(parts: Sequence[PostureFacts]) -> PostureFacts:
    """The first known value of every fact, in probe order."""
    values: dict[str, object] = {}
    for part in parts:
        for name in _FIELDS:
            value = getattr(part, name)
            if value is not None and name not in values:
                values[name] = value
    return PostureFacts(**values)  # type: ignore[arg-type]  # names and types come from parts


def wire_valid(facts: PostureFacts) -> PostureFacts:
    """Drop any fact the gateway would refuse (PostureFacts.from_json), so one odd value costs
    that fact only, never the whole report."""
    kept: dict[str, object] = {}
    for name, value in facts.to_json().items():
        try:
            PostureFacts.from_json({name: value})
        except ReportInvalid:
            log.warning("probe produced an invalid %s; reported as unknown", name)
            continue
        kept[name] = value
    return PostureFacts(**kept)  # type: ignore[arg-type]  # validated member by member


def _guarded(probe: Probe, context: ProbeContext) -> PostureFacts:
    try:
        return probe(context)
    except Exception:  # a parser bug must cost one fact, never the report
        log.exception("posture probe %s failed", getattr(probe, "__name__", probe))
        return PostureFacts()


def _running_as_root() -> bool:
    geteuid = getattr(os, "geteuid", None)  # absent on Windows: never "root" there
    return geteuid is not None and geteuid() == 0


class PlatformProber:
    """Runs one platform's probes concurrently under one deadline and merges their facts."""

    def __init__(
        self,
        os_name: OsName,
        probes: Sequence[Probe],
        *,
        runner: Runner = run_command,
        root: Path = Path("/"),
        environ: Mapping[str, str] | None = None,
        is_root: bool | None = None,
    ) -> None:
        self.os_name: OsName = os_name
        self.probes = tuple(probes)
        self._runner = runner
        self._root = root
        self._environ = environ
        self._is_root = is_root

    def context(self, timeout: float) -> ProbeContext:
        return ProbeContext(
            runner=self._runner,
            deadline=time.monotonic() + max(0.0, timeout),
            now=time.time(),
            root=self._root,
            is_root=_running_as_root() if self._is_root is None else self._is_root,
            environ=dict(os.environ if self._environ is None else self._environ),
        )

    def collect(self, timeout: float) -> PostureFacts:
        """Every fact readable within `timeout` seconds; the rest unknown. Never raises."""
        try:
            context = self.context(timeout)
            pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="tabiji-probe")
            futures = [pool.submit(_guarded, probe, context) for probe in self.probes]
            done, _ = concurrent.futures.wait(futures, timeout=max(0.0, timeout) + _REAP_GRACE)
            pool.shutdown(wait=False, cancel_futures=True)
            parts = [PostureFacts(os=self.os_name)]
            parts += [future.result() for future in futures if future in done]
            return wire_valid(merge_facts(parts))
        except Exception:  # e.g. no threads left: report what is certain, the platform
            log.exception("posture collection failed")
            return PostureFacts(os=self.os_name)


class UnknownPlatformProber:
    """A platform without probes: every fact unknown."""

    def collect(self, timeout: float) -> PostureFacts:
        return PostureFacts()


def platform_prober(system: str | None = None) -> Prober:
    """The probes for this OS (platform.system() names), without the diagnostic override."""
    import platform

    name = platform.system() if system is None else system
    if name == "Linux":
        from device_agent.probes.linux import linux_prober

        return linux_prober()
    if name == "Darwin":
        from device_agent.probes.macos import macos_prober

        return macos_prober()
    if name == "Windows":
        from device_agent.probes.windows import windows_prober

        return windows_prober()
    return UnknownPlatformProber()


def probe_for_platform(system: str | None = None) -> Prober:
    """The prober the agent runs: this OS's probes, under the TABIJI_AGENT_FACTS_FILE override
    (device_agent/probes/overrides.py), which does nothing unless that variable is set."""
    from device_agent.probes.overrides import OverridingProber

    return OverridingProber(platform_prober(system))
