"""Helpers for the audit integration tests: audit config blocks, `tabiji audit …` runs, a fresh
PostgreSQL database per run, SQLite tampering and outages, and an IdP + TLS gateway with audit on.

Test helper only (no tests here).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import yaml

from .conftest import _LIVE, REPO, Gateway, Upstream, free_port, route, wait_healthy
from .identity_env import CLIENT_SECRET, IdentityEnv, gateway_clients
from .idp_fixture import DEFAULT_USERS, Idp, IdpUser, make_ca, start_idp

POSTGRES_URL = os.environ.get(
    "TABIJI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
AUDITOR = IdpUser(
    sub="u-0009-yamada",
    username="yamada",
    password="yamada-pw-9",
    email="yamada@town.example.jp",
    email_verified=True,
    name="山田 監査",
    groups=("auditors",),
)


def must_have(condition: bool, reason: str) -> None:
    """Skip when a real component is missing; fail instead when CI=true (CI provides it)."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# -- config --------------------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    """An absolute sqlite URL (four slashes), independent of the gateway's working directory."""
    return "sqlite:///" + str(path.resolve())


def audit_block(directory: Path, store: str | None = None, **options: Any) -> dict[str, Any]:
    """The `audit:` section: store (default SQLite in `directory`), key, spool and export there;
    a short flush interval; `options` override anything."""
    block: dict[str, Any] = {
        "store": store or sqlite_url(directory / "audit.db"),
        "spool_dir": str(directory / "spool"),
        "key_file": str(directory / "audit-key.pem"),
        "checkpoint_export": str(directory / "checkpoints.jsonl"),
        "flush_interval": "50ms",
    }
    block.update(options)
    return block


# -- the command line ----------------------------------------------------------------------------


def tabiji(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m gateway.cli ARGS --config CONFIG` as an operator or auditor runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args, "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def query(config: Path, *filters: str) -> list[dict[str, Any]]:
    """Every matching record (newest first) through `tabiji audit query --json`."""
    done = tabiji(config, "audit", "query", "--json", "--limit", "100000", *filters)
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def requests_by_id(config: Path) -> dict[str, dict[str, Any]]:
    """The request records, by request id (durable mode's result records left out)."""
    return {
        r["request_id"]: r
        for r in query(config, "--kind", "request")
        if r["action"] != "request.result"
    }


def verify(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tabiji(config, "audit", "verify", *args)


# -- SQLite: what root can do to the file, and an outage -----------------------------------------


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """A plain connection to the audit DB, as root with the sqlite3 shell would have."""
    return sqlite3.connect(path, isolation_level=None, timeout=10)


def drop_triggers(conn: sqlite3.Connection) -> None:
    """Remove the append-only triggers (they protect against mistakes, not against root)."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    assert names, "the audit DB has no append-only triggers"
    for name in names:
        conn.execute(f'DROP TRIGGER "{name}"')


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[None]:
    """Hold an exclusive write lock on the audit DB: to the gateway, the store is unavailable."""
    conn = sqlite_connect(path)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`chattr +i`: even root's already-open file descriptor can no longer write to `path`
    (a read-only directory or chmod would not stop a gateway running as root)."""
    chattr = shutil.which("chattr")
    must_have(chattr is not None, "chattr (e2fsprogs) is needed to make the spool unwritable")
    assert chattr is not None
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True, check=False)
    must_have(done.returncode == 0, f"chattr +i does not work here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def spool_files(directory: Path) -> list[Path]:
    return sorted((directory / "spool").glob("*.spool.jsonl"))


def file_bytes(*paths: Path) -> bytes:
    """The raw bytes of the files that exist (a SQLite DB is its file plus -wal and -shm)."""
    return b"".join(p.read_bytes() for p in paths if p.exists())


def sqlite_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


# -- PostgreSQL ------------------------------------------------------------------------------------


def require_postgres() -> None:
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=2):
            pass
    except psycopg.Error as exc:
        must_have(False, f"PostgreSQL at {POSTGRES_URL} is unreachable ({exc})")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database for this run (the gateway's config takes only a URL, so a schema
    cannot be chosen); dropped afterwards. Yields its URL."""
    require_postgres()
    name = f"tabiji_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_URL)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Burst:
    """Requests sent from several threads until stopped; what the clients saw."""

    seen: list[str]  # X-Request-Id of every response received
    errors: int = 0


@contextlib.contextmanager
def burst(url: str, threads: int = 8) -> Iterator[Burst]:
    """Keep `threads` clients sending GET `url` until the block ends."""
    result = Burst(seen=[])
    stop = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    response = client.get(url)
                except httpx.HTTPError:
                    with lock:
                        result.errors += 1
                    continue
                request_id = response.headers.get("x-request-id")
                if request_id:
                    with lock:
                        result.seen.append(request_id)

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield result
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)


# -- an identity deployment with audit on ----------------------------------------------------------


@contextlib.contextmanager
def audit_identity_env(
    directory: Path,
    upstream: Upstream,
    *,
    policies: Mapping[str, Any],
    audit: Callable[[int], dict[str, Any]],
    users: Sequence[IdpUser] = (*DEFAULT_USERS, AUDITOR),
) -> Iterator[IdentityEnv]:
    """The test OpenID Provider and a TLS gateway (like identity_env.identity_env) with the audit
    trail on: `audit(port)` is its `audit:` section; `policies` the policy file's document."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory / "ca")
    port = free_port()
    idp: Idp = start_idp(
        directory / "idp", ca, name="op", clients=gateway_clients(port), users=users
    )
    try:
        cert, key = ca.issue(["127.0.0.1", "localhost"], directory / "gw-tls")
        policy_dir = directory / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "policies.yaml").write_text(yaml.safe_dump(dict(policies)), "utf-8")
        secret = directory / "client.secret"
        secret.write_text(CLIENT_SECRET)
        p = f"https://127.0.0.1:{port}"
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "public_url": p,
            "tls": {"cert": str(cert), "key": str(key)},
            "policies": {"dir": str(policy_dir), "watch": "poll"},
            "identity": {
                "session": {"store": sqlite_url(directory / "state.db")},
                "rate_limit": {"per_minute": 600, "burst": 200},
                "providers": [
                    {
                        "name": "town",
                        "display_name": {"ja": "役場", "en": "Town hall"},
                        "issuer": idp.issuer,
                        "client_id": "tabiji",
                        "client_secret_file": str(secret),
                        "scopes": ["openid", "email", "profile", "groups"],
                        "ca_bundle": str(ca.ca_path),
                    }
                ],
            },
            "assertion": {"key_dir": str(directory / "keys")},
            "audit": audit(port),
            "routes": [
                route("papp", p + "/papp", f"http://127.0.0.1:{upstream.port}", policy="signed-in"),
                route("public", p, f"http://127.0.0.1:{upstream.port}", public=True),
            ],
        }
        config_path = directory / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        stderr_path = directory / "gateway.stderr.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)]
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=stderr, stderr=subprocess.STDOUT
            )
        gateway = Gateway(port, process, config_path, stderr_path, scheme="https")
        _LIVE.append(gateway)
        try:
            wait_healthy(gateway, verify=ssl.create_default_context(cafile=str(ca.ca_path)))
            yield IdentityEnv(idp, gateway, upstream, ca, directory)
        finally:
            gateway.stop()
            _LIVE.remove(gateway)
    finally:
        idp.stop()
