"""Private Redis and PostgreSQL servers for fault tests: started on free 127.0.0.1 ports, stopped
and started again by PID, so a test can take a store away without touching the shared ones on
6379 / 5432. Skip (fail when CI=true) when the Debian binaries are absent. Test helper only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PG_USER = "postgres"  # initdb and postgres refuse to run as root


def must_have(condition: bool, reason: str) -> None:
    """Skip when a real component is missing; fail instead when CI=true (CI provides it)."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(port):
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not listen on {port} within {START_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _tail(path: Path, size: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text("utf-8", "replace")[-size:]
    return ""


def _stop_pid(pid: int, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> None:
    """Signal a process that is not our child by PID; wait until it is gone (SIGKILL after
    `timeout`). Its parent must reap it (a zombie still answers signal 0)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- Redis -----------------------------------------------------------------------------------------


def require_redis_server() -> str:
    """The redis-server binary (Debian redis-server); skip, or fail when CI=true, without it."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    must_have(found is not None, "redis-server is not installed (apt-get install redis-server)")
    assert found is not None
    return found


@dataclass
class PrivateRedis:
    """One redis-server of this test's own; `stop()` and `start()` again on the same port.

    No automatic snapshots (`--save ''`); `stop(keep_data=True)` asks for one SAVE first, so the
    restarted server loads what it held, as a Redis with persistence would after a restart.
    """

    binary: str
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (again) on `port` (a free one the first time); return once it listens."""
        if self.running:
            return
        self.port = self.port or free_port()
        self.starts += 1
        log = self.directory / "redis.log"
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            "--dbfilename",
            "dump.rdb",
        ]
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.process, "redis-server", log)

    def save(self) -> None:
        """SAVE: a snapshot the next start loads (RESP spoken directly, no client needed)."""
        with socket.create_connection(("127.0.0.1", self.port), 5) as conn:
            conn.sendall(b"*1\r\n$4\r\nSAVE\r\n")
            reply = conn.recv(64)
        assert reply.startswith(b"+OK"), reply

    def stop(self, *, keep_data: bool = True) -> None:
        """Stop by PID (SIGTERM, SIGKILL if it lingers); with `keep_data`, SAVE first."""
        if not self.running:
            return
        assert self.process is not None
        if keep_data:
            self.save()
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / "dump.rdb").unlink()
        self.process.send_signal(signal.SIGTERM)  # by PID: Popen signals its own child
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return _tail(self.directory / "redis.log")


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[PrivateRedis]:
    """A running private Redis in `directory`; stopped by PID however the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    server = PrivateRedis(require_redis_server(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(keep_data=False)


# -- PostgreSQL ------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin with initdb and postgres; skip/fail without one."""
    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    usable = [p for p in candidates if (p / "initdb").exists() and (p / "postgres").exists()]
    must_have(
        bool(usable), "PostgreSQL server binaries are not installed (apt-get install postgresql)"
    )
    runuser = shutil.which("runuser")
    must_have(runuser is not None, "runuser (util-linux) is needed to run PostgreSQL unprivileged")
    try:
        import pwd

        pwd.getpwnam(PG_USER)
    except KeyError:
        must_have(False, f"no '{PG_USER}' OS user to run initdb and postgres as")
    return usable[-1]


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *command] if os.geteuid() == 0 else list(command)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test's own (trust auth, 127.0.0.1 only, socket in its dir);
    `stop()` and `start()` again on the same port keep its data."""

    bin_dir: Path
    directory: Path  # owned by the postgres user; data in ./data, socket and log beside it
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def init(self) -> None:
        """initdb with trust authentication (only 127.0.0.1 and its own socket can reach it)."""
        done = subprocess.run(
            _as_postgres(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                PG_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"initdb failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        """Start (again) on `port` (a free one the first time); return once it accepts logins."""
        if self.running:
            return
        self.port = self.port or free_port()
        log = self.directory / "postgres.log"
        command = _as_postgres(
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.directory),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",  # a test cluster: speed over crash safety of the machine
            "-c",
            "max_connections=100",
        )
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _wait_listening(self.port, self.process, "postgres", log)
        self._wait_accepting(log)

    def _wait_accepting(self, log: Path) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"postgres does not accept logins: {exc}\n{_tail(log)}")
                time.sleep(0.1)

    def postmaster_pid(self) -> int | None:
        """The server's own PID (runuser is only its parent), from postmaster.pid."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster by PID), then reap runuser."""
        if not self.running:
            return
        assert self.process is not None
        pid = self.postmaster_pid()
        if pid is not None:
            _stop_pid(pid, signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def create_database(self, name: str) -> str:
        """A new database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def log(self) -> str:
        return _tail(self.directory / "postgres.log")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh private cluster in a temp dir the postgres user owns; stopped by PID and removed
    however the block ends."""
    bin_dir = postgres_bin_dir()
    # Under /tmp (world-traversable), not pytest's root-only tmp dir: the postgres user must
    # reach its data directory.
    directory = Path(tempfile.mkdtemp(prefix="tabiji-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, PG_USER, PG_USER)
        server = PrivatePostgres(bin_dir, directory)
        server.init()
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis for one test."""
    with private_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def postgres_server() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster for one test."""
    with private_postgres() as server:
        yield server
