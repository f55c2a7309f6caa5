"""`tabiji demo`: the demo identity provider, the demo upstream and the gateway, on 127.0.0.1 only.

Writes a demo config (embedded SQLite stores, the demo policies, provider "demo", device trust
with its SQLite registry and device CA) into a temporary directory, starts the provider and the
upstream as child processes (stopped by their PIDs on any exit: Ctrl-C, SIGTERM, errors), then
serves the gateway in the foreground.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

DEMO_DIR = Path(__file__).parent
DEMO_POLICIES = DEMO_DIR / "policies"
DEMO_USERS = DEMO_DIR / "users.yaml"
CLIENT_ID = "tabiji-demo"
HOST = "127.0.0.1"
DEVICE_PATH = "/jumin"  # 「住民記録」: the demo route that needs an approved, healthy device
AGENT_HOME = "agent"  # the demo's own device-agent state, inside the demo directory
# For TABIJI_AGENT_FACTS_FILE (device_agent/probes/overrides.py, a documented test hook): the
# "good posture" path on a computer whose disk is not encrypted.
FACTS_OVERRIDE = "posture-override.json"


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) != 0


def _listen(port: int) -> socket.socket | None:
    """A listening socket on HOST:port for a child to inherit, or None if the port is taken.

    Binding here, not in the child, means no other process can take the port between the check
    and the child's start (two demos at once each get their own provider, never the other's).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT, never sharing
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        return None
    sock.set_inheritable(True)
    return sock


def _wait_ready(url: str, child: subprocess.Popen[bytes], seconds: float) -> bool:
    """Until `url` answers 200 (connections queue on the inherited socket meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def demo_config(directory: Path, port: int, upstream_port: int, idp_port: int) -> dict[str, Any]:
    """The gateway config `tabiji demo` runs (paths relative to `directory`, the config's home)."""
    gateway = f"http://{HOST}:{port}"
    upstream = f"http://{HOST}:{upstream_port}"
    return {
        "listen": {"host": HOST, "port": port},
        "public_url": gateway,
        "identity": {
            "providers": [
                {
                    "name": "demo",
                    "display_name": {"ja": "デモ職員ログイン", "en": "Demo staff sign-in"},
                    "issuer": f"http://{HOST}:{idp_port}",
                    "client_id": CLIENT_ID,
                    "client_secret_file": "./demo-client.secret",
                    "groups_claim": "groups",
                }
            ],
            "session": {"lifetime": "12h", "idle_timeout": "1h", "store": "sqlite:///./state.db"},
        },
        "assertion": {"key_dir": "./keys", "lifetime": "2m"},
        # The auditors' view at /.tabiji/audit: who may see it is itself a policy.
        "audit": {
            "store": "sqlite:///./audit.db",
            "view_policy": "audit-view",
            "checkpoint_export": "./audit-checkpoints.jsonl",
        },
        "policies": {"dir": str(directory / "policies")},
        # Device trust: staff's own enrolments are approved at once (policy device-enrolment),
        # anyone else's wait for IT, who use /.tabiji/devices (policy device-admin).
        "devices": {
            "store": "sqlite:///./devices.db",
            "ca_dir": "./device-ca",
            "auto_approve_policy": "device-enrolment",
            "admin_policy": "device-admin",
            "posture_max_age": "15m",  # the admin page marks what jumin-kiroku would refuse
        },
        "routes": [
            {
                # 「住民記録」 at /jumin: the longer prefix wins over the groupware's "/".
                "name": "jumin-kiroku",
                "from": gateway + DEVICE_PATH,
                "to": upstream,
                "policy": "jumin-kiroku",
                "providers": ["demo"],
                "identity_headers": True,
            },
            {
                "name": "groupware",
                "from": gateway,
                "to": upstream,
                "policy": "groupware",
                "websockets": True,
                "providers": ["demo"],
                "identity_headers": True,
            },
            {
                "name": "groupware-localhost",
                "from": f"http://localhost:{port}",
                "to": upstream,
                "public": True,
                "websockets": True,
            },
        ],
    }


def prepare(directory: Path, port: int, upstream_port: int, idp_port: int) -> Path:
    """Write the config, a fresh client secret (0600) and a copy of the demo policies."""
    secret = directory / "demo-client.secret"
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    # A copy, so the policies can be edited while the demo runs (the gateway reloads them).
    shutil.copytree(DEMO_POLICIES, directory / "policies")
    (directory / FACTS_OVERRIDE).write_text('{"disk_encrypted": true}\n', "utf-8")
    config = directory / "gateway.yaml"
    text = yaml.safe_dump(
        demo_config(directory, port, upstream_port, idp_port), allow_unicode=True, sort_keys=False
    )
    config.write_text("# Generated by `tabiji demo` — loopback only.\n" + text, "utf-8")
    return config


def agent_command() -> str:
    """How to start `tabiji-agent` from here: the venv's script beside this Python (relative to
    the current directory when it lies below it, as `.venv/bin/tabiji-agent`), else by name."""
    script = Path(sys.executable).parent / "tabiji-agent"
    if not script.exists():
        return "tabiji-agent"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def device_lines(port: int, directory: Path) -> list[str]:
    """How to try device trust: enrol this computer, keep the agent running, where IT approves."""
    gateway = f"http://{HOST}:{port}"
    agent = agent_command()
    # The demo's own agent state (gone with the demo, like its device registry): a second demo
    # can enrol again, and a real enrolment of this computer is never touched.
    home = directory / AGENT_HOME
    return [
        "  端末の確認（デバイストラスト）/ device trust:",
        f"    住民記録 / resident records: {gateway}{DEVICE_PATH}/",
        "      職員が、自分の承認済みでディスクが暗号化された端末から開くときだけ",
        "      staff only, from their own approved device with an encrypted disk",
        "    別の端末で / in another terminal:",
        f"      export TABIJI_AGENT_HOME={home}",
        f"      {agent} enroll {gateway}",
        "      (リンクを開いて職員でログインし「これは私のパソコンです」→ 職員の端末はすぐ承認)",
        '      (open the link, sign in as staff, press "This is my computer": approved at once)',
        f"      {agent} run",
        "      (動かしたままに / keep it running: it reports and answers the browser's check)",
        f"    端末の管理（joho）/ IT's device admin (joho): {gateway}/.tabiji/devices",
        "    ディスクが暗号化されていない PC では、拒否画面が理由と直し方を示します。",
        "    On a computer whose disk is not encrypted, the refusal page says why and what to do.",
        "    それでも暗号化済みの流れを試すには（テスト用の上書き、本番では使いません）:",
        '    To try the "good posture" path there anyway (a test hook, never for production):',
        f"      TABIJI_AGENT_FACTS_FILE={directory / FACTS_OVERRIDE} {agent} run",
    ]


def banner(port: int, idp_port: int, directory: Path) -> str:
    """What to click, and who can sign in (Japanese, then English)."""
    from gateway.demo.idp import load_users

    lines = [
        "",
        "Tabiji デモ / Tabiji demo",
        f"  庁内グループウェア（ログインが必要）: http://{HOST}:{port}/",
        f"  Groupware through the gateway (sign-in required): http://{HOST}:{port}/",
        f"  ログイン不要の同じアプリ / the same app as a public route: http://localhost:{port}/",
        f"  デモ ID プロバイダ / demo identity provider: http://{HOST}:{idp_port}/",
        f"  監査ログ（auditor でログイン）/ audit view (sign in as auditor): "
        f"http://{HOST}:{port}/.tabiji/audit",
        f"  ログイン中の利用者とログアウト / who am I, sign out: http://{HOST}:{port}/.tabiji/",
        f"  ヘルスチェック / health: http://{HOST}:{port}/.tabiji/healthz",
        "",
        "  デモ利用者（パスワード・ワンタイムコードはデモ専用）/ demo users (demo passwords only):",
    ]
    for user in load_users(DEMO_USERS):
        groups = ", ".join(user.groups) or "グループなし / no groups"
        otp = f"  ワンタイムコード / one-time code: {user.otp}" if user.otp else ""
        lines.append(f"    {user.username:<11} {user.password:<16} {user.name}（{groups}）{otp}")
    lines += [
        "",
        "  職員 (staff) は全操作、監査担当 (auditors) は閲覧のみ、委託先は拒否されます。",
        "  Staff may do anything, auditors may only read, the contractor is refused.",
        "",
        *device_lines(port, directory),
        "",
        f"  設定とポリシー / config and policies: {directory}",
        "  Ctrl-C で停止 / Stop with Ctrl-C.",
        "",
    ]
    return "\n".join(lines)


class _Stop(Exception):
    """SIGTERM before the gateway took over the signal: leave through the cleanup path."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextmanager
def _children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes, each stopped by its PID on the way out (SIGTERM, then SIGKILL)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for child in started:
            if child.poll() is None:
                child.terminate()
        for child in started:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


def _spawn(command: list[str], sock: socket.socket) -> subprocess.Popen[bytes]:
    """Start our own module `command` serving on the inherited `sock`, then drop our copy."""
    try:
        return subprocess.Popen(  # noqa: S603 — our own module, fixed arguments
            [sys.executable, "-m", *command, "--fd", str(sock.fileno())],
            pass_fds=(sock.fileno(),),
        )
    finally:
        sock.close()


def _bind_ports(
    port: int, upstream_port: int, idp_port: int | None
) -> tuple[socket.socket, socket.socket] | str:
    """The upstream's and the provider's listening sockets, or what is wrong."""
    if not _port_free(port):
        return f"port {port} on {HOST} is in use; choose another with --port"
    upstream_socket = _listen(upstream_port)
    if upstream_socket is None:
        return f"port {upstream_port} on {HOST} is in use; choose another with --upstream-port"
    idp_socket = _listen(9000 if idp_port is None else idp_port)
    if idp_socket is None and idp_port is None:
        idp_socket = _listen(0)
    if idp_socket is None:
        upstream_socket.close()
        return f"port {idp_port} on {HOST} is in use; choose another with --idp-port"
    return upstream_socket, idp_socket


def run_demo(port: int, upstream_port: int, idp_port: int | None = None) -> int:
    """Run the demo until Ctrl-C or SIGTERM; returns the exit code.

    `idp_port` None: 9000 when free, else any free port (nobody types the provider's address).
    """
    from gateway.cli import serve_options
    from gateway.serving import serve
    from gateway.settings import load_settings
    from policies.yaml_source import SourceErrors

    bound = _bind_ports(port, upstream_port, idp_port)
    if isinstance(bound, str):
        print(bound, file=sys.stderr)
        return 1
    upstream_socket, idp_socket = bound
    idp_port = int(idp_socket.getsockname()[1])
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="tabiji-demo-") as name,
            _children() as children,
        ):
            directory = Path(name)
            config = prepare(directory, port, upstream_port, idp_port)
            gateway = f"http://{HOST}:{port}"
            idp = f"http://{HOST}:{idp_port}"
            idp_command = [
                "gateway.demo.idp",
                "--issuer", idp,
                "--client-id", CLIENT_ID,
                "--client-secret-file", str(directory / "demo-client.secret"),
                "--redirect-uri", gateway + "/.tabiji/oidc/callback",
                "--post-logout-redirect-uri", gateway + "/.tabiji/logged-out",
                "--users", str(DEMO_USERS),
            ]  # fmt: skip
            upstream_command = [
                "gateway.demo.upstream",
                "--gateway",
                gateway,
                "--audience",
                gateway,
            ]
            children.append(_spawn(idp_command, idp_socket))
            children.append(_spawn(upstream_command, upstream_socket))
            for child, url, what in (
                (children[0], idp + "/.well-known/openid-configuration", "the demo provider"),
                (children[1], f"http://{HOST}:{upstream_port}/headers", "the demo upstream"),
            ):
                if not _wait_ready(url, child, 15):
                    print(f"{what} did not start", file=sys.stderr)
                    return 1
            try:
                settings = load_settings(config)
            except SourceErrors as errors:
                for error in errors.errors:
                    print(error, file=sys.stderr)
                return 1
            print(banner(port, idp_port, directory), flush=True)
            # serve() handles SIGTERM/SIGINT itself (a graceful stop) and returns.
            return serve(serve_options(settings, config, workers=1))
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        idp_socket.close()
        upstream_socket.close()
