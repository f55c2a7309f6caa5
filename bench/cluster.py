"""A real multi-replica Tabiji deployment on one machine, for tests, benches and people.

`Cluster(ClusterSpec(...))` starts N `tabiji serve` processes (own port each) behind a real Debian
nginx (round-robin), sharing one Redis DB, one fresh PostgreSQL database (audit + devices), one
policy dir, one assertion-key/audit-key/device-CA dir; plus the real test OpenID Provider
(tests/idp, npm oidc-provider) and the test upstream (tests/integration/upstream_app.py).
Everything listens on 127.0.0.1 and is stopped by PID. Imports the test helpers (dev venv).

Stable interface (bench/soak.py and tests/integration/test_replicas.py rely on it):

    spec = ClusterSpec(replicas=3, workers=1, audit_mode="durable" | "batched",
                       flush_interval=0.1, devices=True, bearer=False, policies=None, ...)
    with Cluster(spec) as c:               # raises ClusterUnavailable when Redis/PostgreSQL/
        c.lb_url, c.lb_port, c.ws_url(p)   #   nginx/node are missing (tests: skip or fail)
        c.public_url                       # == c.lb_url: the gateways' public_url
        c.url(path)                        # c.lb_url + path
        r = c.replicas[i]                  # Replica: .url .port .pid .config_path .alive()
        r.kill9(); r.start(); r.stop()     #   .readyz() .policy_hash() .rss_bytes() .log()
        c.nginx_retries()                  # requests nginx sent to a second replica (its log)
        c.config_path                      # replica 0's config: for `tabiji … --config` calls
        c.cli("sessions", "revoke", "--user", "tanaka")      # -> CompletedProcess (any replica)
        c.policy_dir, c.set_policies(doc) -> content hash    # atomic rename in the shared dir
        c.client(replica=None)             # httpx.Client via nginx, or pinned to one replica
                                           #   (URLs stay c.lb_url…, only the socket changes)
        c.login("tanaka", replica=None) -> httpx.Client     # a signed-in cookie jar
        c.pin(client, i) -> httpx.Client   # the same cookies, requests go to replica i only
        c.bearer_token(sub, email, groups) # when spec.bearer: a JWT the gateways accept
        c.redis_url, c.postgres_url, c.idp, c.upstream_url, c.workdir, c.nginx_pid
        c.routes: "/app" signed-in (WebSockets), "/staff" group staff, "/public" public,
                  "/own" own approved device, "/enc" device with an encrypted disk
                  (the last two only with spec.devices)

Isolation for parallel runs: Redis keys use a fixed `tabiji:` prefix, so the cluster claims a
whole empty Redis DB (1-15) with a claim key and empties it at the end; PostgreSQL gets a fresh
`tabiji_cluster_<hex>` database, dropped at the end (the stores take only a URL, no schema).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import yaml

from bench.common import REPO, free_port, make_workdir, process_tree, rss_bytes

PROXY_SOURCE = "127.0.0.2"  # nginx connects to the gateways from here: the one trusted proxy
DEFAULT_REDIS_URL = os.environ.get("TABIJI_TEST_REDIS_URL", "redis://127.0.0.1:6379")
DEFAULT_POSTGRES_URL = os.environ.get(
    "TABIJI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CLIENT_ID = "tabiji"
CLIENT_SECRET = "cluster-client-secret-0123456789abcdef"  # noqa: S105 -- made up, test only
BEARER_ISSUER = "https://tokens.tabiji.test"
BEARER_AUDIENCE = "tabiji-api"
REDIS_CLAIM_KEY = "tabiji-cluster:claim"  # outside the gateways' `tabiji:` prefix
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

DEFAULT_POLICIES: dict[str, Any] = {
    "policies": [
        {"name": "signed-in", "allow": {"authenticated": True}},
        {"name": "staff", "allow": {"name": "staff-only", "group": "staff"}},
        {
            "name": "own-device",
            "allow": {
                "name": "own-approved-device",
                "all": [
                    {"authenticated": True},
                    {"device": {"approved": True, "owned_by_user": True}},
                ],
            },
        },
        {
            "name": "encrypted-device",
            "allow": {
                "name": "encrypted-disk",
                "all": [
                    {"authenticated": True},
                    {"device": {"approved": True, "posture": {"disk_encrypted": True}}},
                ],
            },
        },
    ]
}


class ClusterError(Exception):
    """The cluster could not be started or stopped; the message says what and where to look."""


class ClusterUnavailable(ClusterError):
    """A real component the cluster needs is missing here (tests skip, or fail when CI=true)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What to start. Durations are seconds."""

    replicas: int = 3
    workers: int = 1  # uvicorn worker processes per replica
    audit: bool = True
    audit_mode: Literal["durable", "batched"] = "batched"
    flush_interval: float = 0.1  # batched mode: the most a kill -9 may lose (≤ 0.1 s)
    checkpoint_interval: float = 60.0
    devices: bool = True
    registry_poll_interval: float = 0.5
    bearer: bool = False  # a JWKS server and a bearer issuer (programs with device proofs)
    policies: Mapping[str, Any] | None = None  # the policy document (default DEFAULT_POLICIES)
    policy_watch: Literal["events", "poll"] = "events"
    policy_poll_interval: float = 0.5
    redis_url: str = DEFAULT_REDIS_URL
    postgres_url: str = DEFAULT_POSTGRES_URL
    nginx_workers: int = 1
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # the gateways' access logs (and nginx's, unless said below)
    nginx_access_log: bool | None = None  # nginx's log of which replica(s) served each request
    workdir: Path | None = None  # default: a fresh temp dir, removed unless keep_workdir
    keep_workdir: bool = False
    users: Sequence[Any] | None = None  # idp_fixture.IdpUser; default its DEFAULT_USERS
    extra_config: Mapping[str, Any] = field(default_factory=dict)  # merged into each config


# -- helpers ------------------------------------------------------------------------------------


def _test_helpers() -> Any:
    """tests/integration/idp_fixture (the real test provider and its login driver)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.integration import idp_fixture

    return idp_fixture


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _clean_env() -> dict[str, str]:
    """The environment of every process we start, without TABIJI_* overrides of the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _Pinned(httpx.BaseTransport):
    """Sends requests for the public origin to one replica's port; the URL and Host stay the
    public ones (as nginx forwards them), so cookies and routes behave as through nginx."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # A copy: the client's request (and so response.url, for relative redirects and
        # cookies) keeps the public URL; the copy keeps its Host header.
        pinned = httpx.Request(
            request.method,
            request.url.copy_with(port=self._port),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return self._inner.handle_request(pinned)

    def close(self) -> None:
        self._inner.close()


# -- one replica --------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `tabiji serve` process (its own process group: kill9 ends its workers too)."""

    index: int
    port: int
    directory: Path
    config_path: Path
    public_host: str
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The replica's own origin (send `Host: <public host>` to reach its routes)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "gateway.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ClusterError(f"replica {self.index} is not running")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, tail: int = 8000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text("utf-8", errors="replace")[-tail:]
        return ""

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart) the process; with `wait`, until /.tabiji/readyz says ready."""
        if self.alive():
            return
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)]
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: kill9/stop reach every worker
            )
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.process is None else self.process.returncode
                raise ClusterError(f"replica {self.index} exited ({code}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if self.readyz(timeout=2).get("status") == "ready":
                    return
            time.sleep(0.1)
        raise ClusterError(f"replica {self.index} not ready within {timeout:.0f} s:\n{self.log()}")

    def readyz(self, timeout: float = 5) -> dict[str, Any]:
        """/.tabiji/readyz of this replica (asked directly, not through nginx)."""
        response = httpx.get(
            self.url + "/.tabiji/readyz", headers={"Host": self.public_host}, timeout=timeout
        )
        result: dict[str, Any] = response.json()
        return result

    def policy_hash(self) -> str:
        """The first 16 hex digits of the policy set this replica serves (readyz detail)."""
        detail = str(self.readyz()["checks"]["policies"]["detail"])
        return detail.removeprefix("serving ").split(";", 1)[0].strip()

    def rss_bytes(self) -> int:
        """Resident memory of the replica's whole process tree (supervisor + workers)."""
        return sum(rss_bytes(self.pid)) if self.alive() else 0

    def kill9(self) -> None:
        """SIGKILL the replica's process group (supervisor and workers), as `kill -9` would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful: the audit trail is flushed), SIGKILL after `timeout`."""
        if self.process is None:
            return None
        tree = [st.pid for st in process_tree(self.process.pid)]
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for pid in tree[1:]:  # workers orphaned by a supervisor that died first
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == self.process.pid:
                    os.kill(pid, signal.SIGKILL)
        return self.process.returncode


# -- the cluster --------------------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    log_format upstreams '$remote_addr "$request" $status up=$upstream_addr '
                         'upstatus=$upstream_status rt=$request_time';
    access_log {access_log};
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    # WebSocket upgrade: pass Upgrade on, and keep-alive ("") to the gateways otherwise.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream tabiji {{
        # Round-robin. Passive health: one failure takes a replica out for 2 s, then nginx
        # tries it again (open-source nginx has no active health checks).
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 100m;
        location / {{
            proxy_pass http://tabiji;
            # The gateways believe X-Forwarded-For only from this address (trusted_proxies),
            # so a client connecting to a replica directly cannot claim another address.
            proxy_bind {source};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            # Replace, never append: the client's own X-Forwarded-For is not evidence.
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Retry on another replica only when this one could not be reached or did not
            # answer. nginx never re-sends a non-idempotent request (POST, PATCH, LOCK) once it
            # reached a replica, and we do not add `non_idempotent`: the replica may already
            # have forwarded it (a form submitted twice is worse than one 502).
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries {tries};
            proxy_connect_timeout 2s;
            proxy_read_timeout 3600s;  # idle WebSockets; the gateways time upstreams out
            proxy_send_timeout 60s;
            proxy_buffering off;       # stream, as the gateways do
            proxy_request_buffering off;
        }}
    }}
}}
"""


class Cluster:
    """See the module docstring. Use as a context manager; `close()` is idempotent."""

    def __init__(self, spec: ClusterSpec | None = None) -> None:
        self.spec = spec or ClusterSpec()
        if self.spec.replicas < 1:
            raise ValueError("a cluster has at least one replica")
        self.replicas: list[Replica] = []
        self.workdir = Path()
        self.lb_port = 0
        self.redis_url = ""
        self.postgres_url = ""
        self.idp: Any = None
        self.ca: Any = None
        self.upstream_url = ""
        self._stack = contextlib.ExitStack()
        self._upstream: subprocess.Popen[str] | None = None
        self._nginx: subprocess.Popen[bytes] | None = None
        self._bearer_key: Any = None
        self._closed = False

    # -- places ---------------------------------------------------------------------------------

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    @property
    def public_url(self) -> str:
        return self.lb_url

    @property
    def public_host(self) -> str:
        return f"127.0.0.1:{self.lb_port}"

    def url(self, path: str) -> str:
        return self.lb_url + path

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.lb_port}{path}"

    @property
    def shared_dir(self) -> Path:
        return self.workdir / "shared"

    @property
    def policy_dir(self) -> Path:
        return self.shared_dir / "policies"

    @property
    def config_path(self) -> Path:
        """Replica 0's config (every replica's config names the same stores)."""
        return self.replicas[0].config_path

    @property
    def nginx_dir(self) -> Path:
        return self.workdir / "nginx"

    @property
    def nginx_pid(self) -> int:
        if self._nginx is None:
            raise ClusterError("nginx is not running")
        return self._nginx.pid

    def nginx_retries(self) -> int:
        """Requests nginx's access log shows sent to more than one replica (a retry after an
        error or timeout); needs spec.nginx_access_log (or access_log)."""
        path = self.nginx_dir / "access.log"
        if not path.exists():
            return 0
        count = 0
        for line in path.read_text("utf-8", "replace").splitlines():
            upstreams = line.partition(" up=")[2].partition(" upstatus=")[0]
            count += "," in upstreams
        return count

    def nginx_log(self, tail: int = 8000) -> str:
        parts = []
        for name in ("error.log", "access.log", "stderr.log"):
            path = self.nginx_dir / name
            if path.exists():
                parts.append(f"-- nginx {name}\n" + path.read_text("utf-8", "replace")[-tail:])
        return "\n".join(parts)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start everything; ClusterUnavailable if a real component is missing."""
        spec = self.spec
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        if nginx is None:
            raise ClusterUnavailable("Debian nginx is not installed (apt-get install nginx)")
        helpers = _test_helpers()
        if shutil.which("node") is None or not (helpers.IDP_DIR / "node_modules").is_dir():
            raise ClusterUnavailable("node and tests/idp/node_modules are needed (npm ci there)")
        if spec.workdir is not None:
            self.workdir = spec.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = make_workdir("tabiji-cluster-")
            if not spec.keep_workdir:
                self._stack.callback(shutil.rmtree, self.workdir, True)
        self.redis_url = self._claim_redis()
        self.postgres_url = self._fresh_database()
        self.lb_port = free_port()
        self._start_upstream()
        self.ca = helpers.make_ca(self.workdir / "ca")
        jwks_url = self._start_jwks() if spec.bearer else None
        self._start_idp(helpers)
        self._write_shared()
        ports = self._replica_ports(spec.replicas)
        for index, port in enumerate(ports):
            directory = self.workdir / f"replica-{index}"
            directory.mkdir(parents=True, exist_ok=True)
            config_path = directory / "gateway.yaml"
            config = self._config(port, directory, jwks_url)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
            self.replicas.append(
                Replica(index, port, directory, config_path, public_host=self.public_host)
            )
        # Replica 0 first: it creates the shared keys (assertion, audit checkpoint, device CA)
        # and the database tables; the others then find them instead of racing to create them.
        self.replicas[0].start()
        for replica in self.replicas[1:]:
            replica.start(wait=False)
        for replica in self.replicas[1:]:
            replica.wait_ready()
        self._start_nginx(nginx)

    def close(self) -> None:
        """Stop every process we started (by PID), drop the database, free the Redis DB."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self._nginx is not None:
            _stop(self._nginx, signal.SIGQUIT)
        for replica in self.replicas:
            try:
                replica.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"replica {replica.index}: {exc}")
        if self._upstream is not None:
            _stop(self._upstream, signal.SIGTERM)
            if self._upstream.stdout is not None:
                self._upstream.stdout.close()
        try:
            self._stack.close()
        except Exception as exc:
            errors.append(str(exc))
        if errors:
            raise ClusterError("; ".join(errors))

    # -- the shared services --------------------------------------------------------------------

    def _claim_redis(self) -> str:
        """An empty Redis DB (1-15) of our own: claimed with SET NX, emptied and freed at exit."""
        import redis

        base = self.spec.redis_url
        try:
            probe = redis.Redis.from_url(base, socket_timeout=2, socket_connect_timeout=2)
            probe.ping()
            try:
                databases = int(str(probe.config_get("databases").get("databases", 16)))
            except redis.ResponseError:  # CONFIG may be disabled: assume the default 16
                databases = 16
            probe.close()
        except (redis.RedisError, OSError, ValueError) as exc:
            raise ClusterUnavailable(f"Redis is not reachable at {base}: {exc}") from exc
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        for db in range(1, databases):
            url = _with_path(base, f"/{db}")
            client = redis.Redis.from_url(url, socket_timeout=2)
            if client.set(REDIS_CLAIM_KEY, token, nx=True, ex=6 * 3600):
                if client.dbsize() == 1:
                    self._stack.callback(_free_redis, url, token)
                    client.close()
                    return url
                client.delete(REDIS_CLAIM_KEY)  # in use by something that does not claim
            client.close()
        raise ClusterUnavailable(f"no empty Redis database left at {base} (1-{databases - 1})")

    def _fresh_database(self) -> str:
        import psycopg

        base = self.spec.postgres_url
        name = f"tabiji_cluster_{secrets.token_hex(6)}"
        try:
            with psycopg.connect(base, autocommit=True, connect_timeout=3) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise ClusterUnavailable(f"PostgreSQL at {base} is unusable: {exc}") from exc
        self._stack.callback(_drop_database, base, name)
        return _with_path(base, "/" + name)

    def _start_upstream(self) -> None:
        script = REPO / "tests" / "integration" / "upstream_app.py"
        log = (self.workdir / "upstream.log").open("wb")
        self._stack.callback(log.close)
        process = subprocess.Popen(
            [sys.executable, str(script), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=_clean_env(),
            start_new_session=True,
        )
        self._upstream = process
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.isdigit():
            raise ClusterError(f"the test upstream did not start: {line!r}")
        self.upstream_url = f"http://127.0.0.1:{int(line)}"

    def _start_jwks(self) -> str:
        import importlib.util
        import ssl

        path = REPO / "tests" / "gateway" / "jwks_server.py"
        module = sys.modules.get("jwks_server")
        if module is None:
            loader_spec = importlib.util.spec_from_file_location("jwks_server", path)
            assert loader_spec is not None
            assert loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules["jwks_server"] = module
            loader_spec.loader.exec_module(module)
        self._bearer_key = module.ec_key("cluster-1")
        cert, key = self.ca.issue(["127.0.0.1"], self.workdir / "jwks-tls")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        state = module.JwksState(document=module.jwks_of(self._bearer_key))
        server = self._stack.enter_context(module.serve_jwks(state, context))
        return str(server.url)

    def _start_idp(self, helpers: Any) -> None:
        p = self.public_url
        client = helpers.IdpClient(
            CLIENT_ID,
            CLIENT_SECRET,
            redirect_uris=(f"{p}/.tabiji/oidc/callback",),
            post_logout_redirect_uris=(f"{p}/.tabiji/logged-out",),
            backchannel_logout_uri=f"{p}/.tabiji/oidc/backchannel-logout/town",
        )
        users = tuple(self.spec.users) if self.spec.users is not None else helpers.DEFAULT_USERS
        self.idp = helpers.start_idp(
            self.workdir / "idp", self.ca, name="op", clients=[client], users=users, plain_http=True
        )
        self._stack.callback(self.idp.stop)

    def _write_shared(self) -> None:
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        document = dict(self.spec.policies or DEFAULT_POLICIES)
        (self.policy_dir / "policies.yaml").write_text(
            yaml.safe_dump(document, sort_keys=False, allow_unicode=True), "utf-8"
        )
        (self.shared_dir / "client.secret").write_text(CLIENT_SECRET)

    @staticmethod
    def _replica_ports(count: int) -> list[int]:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return ports

    def _config(self, port: int, directory: Path, jwks_url: str | None) -> dict[str, Any]:
        spec = self.spec
        p = self.public_url
        up = self.upstream_url
        shared = self.shared_dir
        identity: dict[str, Any] = {
            "providers": [
                {
                    "name": "town",
                    "display_name": {"ja": "役場", "en": "Town hall"},
                    "issuer": self.idp.issuer,
                    "client_id": CLIENT_ID,
                    "client_secret_file": str(shared / "client.secret"),
                    "scopes": ["openid", "email", "profile", "groups"],
                }
            ],
            "session": {"store": self.redis_url},
            # Every test client comes from 127.0.0.1: a town's per-address limit would throttle
            # the bench's logins, which is not what is measured here.
            "rate_limit": {"per_minute": 100_000, "burst": 10_000},
        }
        if jwks_url is not None:
            identity["bearer"] = [
                {
                    "name": "api",
                    "issuer": BEARER_ISSUER,
                    "audiences": [BEARER_AUDIENCE],
                    "jwks_uri": jwks_url,
                    "algorithms": ["ES256"],
                    "ca_bundle": str(self.ca.ca_path),
                }
            ]
        routes: list[dict[str, Any]] = [
            {
                "name": "app",
                "from": p + "/app",
                "to": up,
                "policy": "signed-in",
                "websockets": True,
            },
            {"name": "staff", "from": p + "/staff", "to": up, "policy": "staff"},
            {"name": "public", "from": p + "/public", "to": up, "public": True, "websockets": True},
        ]
        if spec.devices:
            routes += [
                {"name": "own", "from": p + "/own", "to": up, "policy": "own-device"},
                {"name": "enc", "from": p + "/enc", "to": up, "policy": "encrypted-device"},
            ]
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": port},
            "public_url": p,
            "trusted_proxies": [f"{PROXY_SOURCE}/32"],
            "server": {"workers": spec.workers},
            "logging": {"level": spec.log_level, "access_log": spec.access_log},
            "policies": {
                "dir": str(self.policy_dir),
                "watch": spec.policy_watch,
                "poll_interval": spec.policy_poll_interval,
            },
            "identity": identity,
            "assertion": {"key_dir": str(shared / "assertion-keys")},
            "audit": {
                "enabled": spec.audit,
                "store": self.postgres_url,
                "durability": spec.audit_mode,
                "flush_interval": spec.flush_interval,
                "spool_dir": str(directory / "audit-spool"),
                "key_file": str(shared / "audit-key.pem"),
                "checkpoint_interval": spec.checkpoint_interval,
            },
            "routes": routes,
        }
        if spec.devices:
            config["devices"] = {
                "store": self.postgres_url,
                "ca_dir": str(shared / "device-ca"),
                "registry_poll_interval": spec.registry_poll_interval,
            }
        return _merge(config, spec.extra_config)

    def _start_nginx(self, nginx: str) -> None:
        directory = self.nginx_dir
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        servers = "\n".join(
            f"        server 127.0.0.1:{r.port} max_fails=1 fail_timeout=2s;" for r in self.replicas
        )
        wanted = self.spec.nginx_access_log
        if wanted is None:
            wanted = self.spec.access_log
        access = f"{directory}/access.log upstreams" if wanted else "off"
        conf = directory / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                workers=self.spec.nginx_workers,
                dir=directory,
                servers=servers,
                port=self.lb_port,
                source=PROXY_SOURCE,
                tries=len(self.replicas),
                access_log=access,
            )
        )
        command = [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")]
        with (directory / "stderr.log").open("wb") as stderr:
            self._nginx = subprocess.Popen(
                command, stdout=stderr, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while not _listening(self.lb_port):
            if self._nginx.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"nginx did not start:\n{self.nginx_log()}")
            time.sleep(0.05)

    # -- driving it -----------------------------------------------------------------------------

    def client(self, replica: int | None = None, **options: Any) -> httpx.Client:
        """An httpx client for c.lb_url…; with `replica`, its requests go to that replica only."""
        options.setdefault("timeout", 10)
        options.setdefault("follow_redirects", False)
        if replica is not None:
            mounts = dict(options.pop("mounts", {}))
            mounts[self.lb_url] = _Pinned(self.replicas[replica].port)
            options["mounts"] = mounts
        return httpx.Client(**options)

    def pin(self, client: httpx.Client, replica: int | None) -> httpx.Client:
        """A new client with `client`'s cookies, sent to `replica` (None: through nginx)."""
        return self.client(replica, cookies=client.cookies)

    def login(
        self,
        user: str,
        password: str | None = None,
        *,
        replica: int | None = None,
        path: str = "/app/",
    ) -> httpx.Client:
        """Sign `user` in (every gateway hop through nginx, or pinned to `replica`); returns the
        cookie-keeping client, already back at `path`."""
        helpers = _test_helpers()
        person = self.idp.user(user)
        client = self.client(replica)
        try:
            authorize = self._follow(client, path)
            if authorize is None:
                raise ClusterError(f"{path} did not send an anonymous browser to the provider")
            otp = person.otp if person.mfa else None
            callback = helpers.login_with_httpx(
                client, authorize, person.username, password or person.password, otp
            )
            if self._follow(client, callback) is not None:
                raise ClusterError("the gateway sent the browser away after the callback")
        except BaseException:
            client.close()
            raise
        return client

    def _follow(self, client: httpx.Client, url: str) -> str | None:
        """Follow redirects on the public origin; the first URL elsewhere, or None."""
        target = url if url.startswith("http") else self.url(url)
        headers = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        for _ in range(12):
            response = client.get(target, headers=headers)
            location = response.headers.get("location")
            if not response.is_redirect or location is None:
                return None
            target = urljoin(str(response.url), str(location))
            if not target.startswith(self.lb_url + "/"):
                return target
        raise ClusterError(f"too many redirects from {url}")

    def cli(
        self, *args: str, replica: int = 0, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`python -m gateway.cli ARGS --config <replica's config>`, as an operator runs it."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                *args,
                "--config",
                str(self.replicas[replica].config_path),
            ],
            cwd=REPO,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def set_policies(self, document: Mapping[str, Any]) -> str:
        """Replace the shared policy file atomically (a rename: a watcher never reads half a
        file); returns the new set's content hash as the gateways will report it."""
        from policies.loader import load_policy_dir

        temporary = self.policy_dir / ".policies.yaml.tmp"  # dot files are not watched
        temporary.write_text(
            yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True), "utf-8"
        )
        os.replace(temporary, self.policy_dir / "policies.yaml")
        return str(load_policy_dir(self.policy_dir).content_hash)

    def bearer_token(
        self,
        subject: str = "u-api-0001",
        email: str = "api@town.example.jp",
        groups: Sequence[str] = ("staff",),
        lifetime: int = 300,
    ) -> str:
        """A JWT from the cluster's bearer issuer (spec.bearer), valid for `lifetime` seconds."""
        if self._bearer_key is None:
            raise ClusterError("start the cluster with ClusterSpec(bearer=True)")
        now = int(time.time())
        claims = {
            "iss": BEARER_ISSUER,
            "aud": BEARER_AUDIENCE,
            "sub": subject,
            "email": email,
            "email_verified": True,
            "groups": list(groups),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
        }
        return str(self._bearer_key.sign(claims))

    def summary(self) -> dict[str, Any]:
        """Where everything is, for a person's terminal or a bench's JSON."""
        return {
            "lb_url": self.lb_url,
            "replicas": [{"index": r.index, "url": r.url, "pid": r.pid} for r in self.replicas],
            "redis": self.redis_url,
            "postgres": self.postgres_url.rsplit("@", 1)[-1],
            "policy_dir": str(self.policy_dir),
            "idp": self.idp.issuer if self.idp is not None else None,
            "upstream": self.upstream_url,
            "workdir": str(self.workdir),
        }


def _stop(process: subprocess.Popen[Any], sig: int, timeout: float = STOP_TIMEOUT) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _free_redis(url: str, token: str) -> None:
    """Empty our claimed DB (only the gateways' keys and our claim) and release it."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        if client.get(REDIS_CLAIM_KEY) != token.encode():
            return  # not ours any more (expired and claimed by another run): leave it alone
        batch: list[bytes] = []
        for key in client.scan_iter(match="tabiji:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
        client.delete(REDIS_CLAIM_KEY)
    finally:
        client.close()


def _drop_database(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running(spec: ClusterSpec | None = None) -> Iterator[Cluster]:
    """`with running(spec) as c:` — the same as `with Cluster(spec) as c:`."""
    with Cluster(spec) as cluster:
        yield cluster


def main(argv: list[str]) -> int:
    """`python -m bench cluster [--replicas N] [--workers N] [--durable]`: start a cluster and
    keep it up until Ctrl-C, printing where everything is."""
    import argparse

    from bench.common import log, signals_as_interrupt

    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=main.__doc__)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--durable", action="store_true", help="audit durability: durable")
    args = parser.parse_args(argv)
    spec = ClusterSpec(
        replicas=args.replicas,
        workers=args.workers,
        audit_mode="durable" if args.durable else "batched",
        access_log=True,
    )
    with signals_as_interrupt(), Cluster(spec) as cluster:
        print(json.dumps(cluster.summary(), indent=2))
        log("users: tanaka / tanaka-pw-1 (OTP 246810), suzuki / suzuki-pw-2; Ctrl-C stops it all")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0
