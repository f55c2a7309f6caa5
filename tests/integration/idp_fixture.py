"""A real OpenID Provider for integration tests: npm oidc-provider (tests/idp/server.mjs) over TLS.

`start_idp(...)` starts one on a free 127.0.0.1 port with certificates from a test CA; the
session fixtures `idp` and `idp_b` (a second, independent provider for mix-up tests) use it.
`login_with_httpx` drives the provider's login and consent pages and returns the callback URL.
Skips without node or tests/idp/node_modules, fails instead when CI=true (run `npm ci` there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
IDP_DIR = REPO / "tests" / "idp"
IDP_SCRIPT = IDP_DIR / "server.mjs"
IDP_START_TIMEOUT = 20.0
IDP_START_ATTEMPTS = 3
IDP_STOP_TIMEOUT = 10.0

# Where a relying party that is not running yet says it will take the code: login_with_httpx
# never follows the final redirect, so this name need not resolve.
DEFAULT_REDIRECT_URI = "https://rp.tabiji.test/.tabiji/callback"
DEFAULT_POST_LOGOUT_URI = "https://rp.tabiji.test/.tabiji/logged-out"
CLIENT_SECRET = "test-client-secret-0123456789abcdef"  # made up, test only


def _load_tls_ca() -> ModuleType:
    """tests/gateway/tls_ca.py, shared by basename with tests/gateway (not a package)."""
    if "tls_ca" in sys.modules:
        return sys.modules["tls_ca"]
    spec = importlib.util.spec_from_file_location(
        "tls_ca", REPO / "tests" / "gateway" / "tls_ca.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tls_ca"] = module
    spec.loader.exec_module(module)
    return module


tls_ca = _load_tls_ca()
TestCA = tls_ca.TestCA
make_ca = tls_ca.make_ca


# -- users and clients -------------------------------------------------------------------------


@dataclass(frozen=True)
class IdpUser:
    """A user of the test provider (tests log in as `username` with `password`, `otp` if mfa)."""

    sub: str
    username: str
    password: str
    email: str | None
    email_verified: bool
    name: str
    groups: tuple[str, ...] = ()
    mfa: bool = False
    otp: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "username": self.username,
            "password": self.password,
            "email": self.email,
            "email_verified": self.email_verified,
            "name": self.name,
            "groups": list(self.groups) or None,  # Entra ID leaves it out in an overage
            "mfa": self.mfa,
            "otp": self.otp,
            **self.extra,
        }


DEFAULT_USERS: tuple[IdpUser, ...] = (
    # Staff with a second factor enrolled: amr ["pwd","otp"] when the code is given.
    IdpUser(
        sub="u-0001-tanaka",
        username="tanaka",
        password="tanaka-pw-1",
        email="tanaka@town.example.jp",
        email_verified=True,
        name="田中 花子",
        groups=("staff", "juminka"),
        mfa=True,
        otp="246810",
    ),
    # Staff with a password only.
    IdpUser(
        sub="u-0002-suzuki",
        username="suzuki",
        password="suzuki-pw-2",
        email="suzuki@town.example.jp",
        email_verified=True,
        name="鈴木 一郎",
        groups=("staff",),
    ),
    # A contractor whose e-mail address the provider has not verified.
    IdpUser(
        sub="u-0003-sato",
        username="sato",
        password="sato-pw-3",
        email="sato@contractor.example.com",
        email_verified=False,
        name="佐藤 次郎",
        groups=("contractors",),
    ),
    # Entra-ID-like group overage: no `groups`, a distributed claim pointing at Graph instead.
    IdpUser(
        sub="u-0004-overage",
        username="overage",
        password="overage-pw-4",
        email="overage@town.example.jp",
        email_verified=True,
        name="Overage User",
        extra={
            "claim_names": {"groups": "src1"},
            "claim_sources": {
                "src1": {
                    "endpoint": "https://graph.microsoft.com/v1.0/users/u-0004/getMemberObjects"
                }
            },
        },
    ),
    # The implicit-flow form of the overage indicator (`hasgroups: true`).
    IdpUser(
        sub="u-0005-hasgroups",
        username="hasgroups",
        password="hasgroups-pw-5",
        email="hasgroups@town.example.jp",
        email_verified=True,
        name="Hasgroups User",
        extra={"hasgroups": True},
    ),
)


@dataclass(frozen=True)
class IdpClient:
    """A relying party registered at the test provider."""

    client_id: str
    client_secret: str | None  # None: a public client (token_endpoint_auth_method none)
    redirect_uris: tuple[str, ...] = (DEFAULT_REDIRECT_URI,)
    post_logout_redirect_uris: tuple[str, ...] = (DEFAULT_POST_LOGOUT_URI,)
    backchannel_logout_uri: str | None = None
    backchannel_logout_session_required: bool = True
    id_token_signed_response_alg: str = "RS256"

    @property
    def redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def as_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "client_id": self.client_id,
            "redirect_uris": list(self.redirect_uris),
            "post_logout_redirect_uris": list(self.post_logout_redirect_uris),
            "id_token_signed_response_alg": self.id_token_signed_response_alg,
        }
        if self.client_secret is None:
            result["token_endpoint_auth_method"] = "none"
        else:
            result["client_secret"] = self.client_secret
            result["token_endpoint_auth_method"] = "client_secret_basic"
        if self.backchannel_logout_uri is not None:
            result["backchannel_logout_uri"] = self.backchannel_logout_uri
            result["backchannel_logout_session_required"] = self.backchannel_logout_session_required
        return result


def default_clients(backchannel_logout_uri: str | None = None) -> tuple[IdpClient, ...]:
    """`tabiji` (confidential, RS256) and `tabiji-public` (PKCE-only public client, ES256)."""
    return (
        IdpClient("tabiji", CLIENT_SECRET, backchannel_logout_uri=backchannel_logout_uri),
        IdpClient(
            "tabiji-public",
            None,
            id_token_signed_response_alg="ES256",
            backchannel_logout_uri=backchannel_logout_uri,
        ),
    )


# -- the provider process ----------------------------------------------------------------------


def idp_available() -> None:
    """Skip (or fail when CI=true) unless node and tests/idp/node_modules are there."""
    problem = None
    if shutil.which("node") is None:
        problem = "node is not installed (Debian: apt-get install nodejs npm)"
    elif not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        problem = f"oidc-provider is not installed: run `npm ci` in {IDP_DIR}"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the test OpenID Provider cannot start: {problem}")
    pytest.skip(f"the test OpenID Provider cannot start: {problem}")


@dataclass
class Idp:
    """A running test provider."""

    name: str
    issuer: str
    port: int
    ca_path: Path
    process: subprocess.Popen[bytes]
    stderr_path: Path
    clients: dict[str, IdpClient]
    users: dict[str, IdpUser]  # by username

    @property
    def client(self) -> IdpClient:
        """The confidential client `tabiji`."""
        return self.clients["tabiji"]

    @property
    def public_client(self) -> IdpClient:
        return self.clients["tabiji-public"]

    def user(self, username: str) -> IdpUser:
        return self.users[username]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def http_client(self, **options: Any) -> httpx.Client:
        """A cookie-keeping httpx client that trusts the test CA and follows no redirects."""
        return httpx.Client(verify=self.ssl_context(), timeout=10, **options)

    def admin_logout(self, sub: str, *, notify: bool = True) -> dict[str, Any]:
        """End every session of `sub` at the provider and revoke its grants (refresh tokens);
        with `notify`, clients with a backchannel_logout_uri receive a real logout token."""
        with self.http_client() as client:
            response = client.post(
                self.issuer + "/_test/logout", json={"sub": sub, "notify": notify}
            )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM by PID, SIGKILL after a grace period."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(IDP_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return int(self.process.returncode)


def _read_ready_line(
    process: subprocess.Popen[bytes], deadline: float
) -> tuple[dict[str, Any] | None, str]:
    """The provider's ready line, or None and why not (for the failure message)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None, f"exited with {process.returncode}"
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None, "closed its output"
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            with contextlib.suppress(ValueError):
                parsed: dict[str, Any] = json.loads(line)
                if parsed.get("ready") is True:
                    return parsed, ""
    return None, f"no ready line within {IDP_START_TIMEOUT:.0f} s"


def start_idp(
    directory: Path,
    ca: Any,
    *,
    name: str = "op",
    clients: Sequence[IdpClient] | None = None,
    users: Sequence[IdpUser] = DEFAULT_USERS,
    id_token_ttl: int = 3600,
    server_cert: tuple[Path, Path] | None = None,
    plain_http: bool = False,
) -> Idp:
    """Start tests/idp/server.mjs on a free 127.0.0.1 port over TLS (cert from `ca`, a TestCA).

    The issuer is https://127.0.0.1:<port> (http://… with `plain_http`). Outgoing back-channel
    logout requests trust `ca` (NODE_EXTRA_CA_CERTS). Stop it with `Idp.stop()`.
    """
    idp_available()
    directory.mkdir(parents=True, exist_ok=True)
    clients = tuple(clients if clients is not None else default_clients())
    clients_path = directory / "clients.json"
    accounts_path = directory / "accounts.json"
    clients_path.write_text(json.dumps([c.as_json() for c in clients]))
    accounts_path.write_text(json.dumps([u.as_json() for u in users]))
    if plain_http:
        transport = ["--http"]
    else:
        cert_path, key_path = server_cert or ca.issue(["127.0.0.1", "localhost"], directory / "tls")
        transport = ["--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    stderr_path = directory / "stderr.log"
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(ca.ca_path), "NODE_NO_WARNINGS": "1"}
    why = ""
    # Node on a loaded 2-vCPU machine has been seen not to come up once in a while: a second and
    # third try, each reported, rather than a whole session of tests erroring on one bad start.
    for attempt in range(1, IDP_START_ATTEMPTS + 1):
        idp, why = _spawn_idp(
            name,
            directory,
            stderr_path,
            env,
            clients_path,
            accounts_path,
            id_token_ttl,
            transport,
            clients,
            users,
            ca,
        )
        if idp is not None:
            return idp
        print(f"test OpenID Provider start {attempt} failed: {why}", file=sys.stderr)
    pytest.fail(f"the test OpenID Provider did not start ({why}):\n{_read(stderr_path)}")


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def _spawn_idp(  # noqa: PLR0917 — start_idp's pieces, handed on as they are
    name: str,
    directory: Path,
    stderr_path: Path,
    env: dict[str, str],
    clients_path: Path,
    accounts_path: Path,
    id_token_ttl: int,
    transport: list[str],
    clients: Sequence[IdpClient],
    users: Sequence[IdpUser],
    ca: Any,
) -> tuple[Idp | None, str]:
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [
                "node",
                str(IDP_SCRIPT),
                "--name",
                name,
                "--port",
                "0",
                "--clients",
                str(clients_path),
                "--accounts",
                str(accounts_path),
                "--ttl-id-token",
                str(id_token_ttl),
                *transport,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=IDP_DIR,
            env=env,
        )
    ready, why = _read_ready_line(process, time.monotonic() + IDP_START_TIMEOUT)
    idp = Idp(
        name=name,
        issuer=str(ready["issuer"]) if ready else "",
        port=int(ready["port"]) if ready else 0,
        ca_path=Path(ca.ca_path),
        process=process,
        stderr_path=stderr_path,
        clients={c.client_id: c for c in clients},
        users={u.username: u for u in users},
    )
    if ready is None:
        idp.stop()
        return None, why
    return idp, ""


# -- a receiver for back-channel logout tokens ---------------------------------------------------


@dataclass
class LogoutReceiver:
    """An HTTPS endpoint on 127.0.0.1 that records the logout tokens POSTed to it."""

    url: str
    tokens: list[str]
    server: ThreadingHTTPServer
    thread: threading.Thread

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.tokens) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.tokens)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(5)
        self.server.server_close()


def start_logout_receiver(ca: Any, directory: Path) -> LogoutReceiver:
    """Start a TLS server (certificate from `ca`) that stores each POSTed `logout_token`."""
    tokens: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            tokens.extend(form.get("logout_token", []))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    cert_path, key_path = ca.issue(["127.0.0.1"], directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]
    return LogoutReceiver(f"https://127.0.0.1:{port}/backchannel-logout", tokens, server, thread)


# -- session fixtures --------------------------------------------------------------------------
#
# pytest registers an imported fixture once per importing module, so a session fixture imported
# by two test modules would run twice (two providers, two CAs). The servers are therefore kept
# here, once per test process, whichever module's fixture asks first; teardown is idempotent.

_SHARED: dict[str, Any] = {}


@pytest.fixture(scope="session")
def idp_ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A fresh test CA (TestCA) for the providers and anything else served over TLS."""
    if "ca" not in _SHARED:
        _SHARED["ca"] = make_ca(tmp_path_factory.mktemp("idp-ca"))
    return _SHARED["ca"]


@pytest.fixture(scope="session")
def idp_logout_receiver(
    idp_ca: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LogoutReceiver]:
    """Where the `idp` provider POSTs back-channel logout tokens (its clients register it)."""
    if "receiver" not in _SHARED:
        _SHARED["receiver"] = start_logout_receiver(
            idp_ca, tmp_path_factory.mktemp("logout-receiver")
        )
    receiver: LogoutReceiver = _SHARED["receiver"]
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def idp(
    idp_ca: Any, idp_logout_receiver: LogoutReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Idp]:
    """The test OpenID Provider A (name `op`), default users and clients, over TLS."""
    if "idp" not in _SHARED:
        _SHARED["idp"] = start_idp(
            tmp_path_factory.mktemp("idp-a"),
            idp_ca,
            name="op",
            clients=default_clients(idp_logout_receiver.url),
        )
    provider: Idp = _SHARED["idp"]
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def idp_b(idp_ca: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    """A second, independent provider (name `opb`, own keys and issuer) for mix-up tests."""
    if "idp_b" not in _SHARED:
        _SHARED["idp_b"] = start_idp(tmp_path_factory.mktemp("idp-b"), idp_ca, name="opb")
    provider: Idp = _SHARED["idp_b"]
    yield provider
    provider.stop()


# -- driving the login pages ---------------------------------------------------------------------


@dataclass
class _Form:
    id: str | None
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self.alert: list[str] = []
        self._in_alert = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(_Form(a.get("id"), a.get("action", ""), a.get("method", "get")))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif a.get("role") == "alert" or a.get("id") == "error":
            self._in_alert = True

    def handle_endtag(self, tag: str) -> None:
        self._in_alert = False

    def handle_data(self, data: str) -> None:
        if self._in_alert:
            self.alert.append(data)


class LoginFailed(AssertionError):
    """The provider refused the login (message: the page's error text)."""


def login_with_httpx(
    client: httpx.Client,
    authorize_url: str,
    user: str,
    password: str,
    otp: str | None = None,
    *,
    max_steps: int = 12,
) -> str:
    """Drive the provider from `authorize_url` through login and consent; return the redirect to
    the relying party's callback (not followed). `client` keeps the provider's cookies (an
    existing provider session skips the login form). Raises LoginFailed on a refused login."""
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    response = client.get(authorize_url, follow_redirects=False)
    for _ in range(max_steps):
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if not location.startswith(origin + "/"):
                return location
            response = client.get(location, follow_redirects=False)
            continue
        if response.status_code != 200:
            raise LoginFailed(f"{response.status_code} from {response.url}: {response.text[:500]}")
        parser = _FormParser()
        parser.feed(response.text)
        forms = {f.id: f for f in parser.forms}
        if "login" in forms:
            if parser.alert and response.request.method == "POST":
                raise LoginFailed("".join(parser.alert).strip())
            form = forms["login"]
            data = {**form.fields, "username": user, "password": password, "otp": otp or ""}
        elif "consent" in forms:
            form = forms["consent"]
            data = dict(form.fields)
        elif "op.logoutForm" in forms:
            raise LoginFailed("the provider shows its logout page, not a login")
        else:
            raise LoginFailed(f"no login or consent form at {response.url}: {response.text[:500]}")
        response = client.post(
            urljoin(str(response.url), form.action), data=data, follow_redirects=False
        )
    raise LoginFailed(f"no redirect to the relying party after {max_steps} steps")


def logout_with_httpx(client: httpx.Client, end_session_url: str, *, max_steps: int = 6) -> str:
    """Follow RP-initiated logout at the provider (confirming the sign-out form); return where
    the provider finally sends the browser (the post_logout_redirect_uri, not followed)."""
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(end_session_url))
    response = client.get(end_session_url, follow_redirects=False)
    for _ in range(max_steps):
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if not location.startswith(origin + "/"):
                return location
            response = client.get(location, follow_redirects=False)
            continue
        parser = _FormParser()
        parser.feed(response.text)
        forms = {f.id: f for f in parser.forms}
        if "op.logoutForm" not in forms:
            return str(response.url)
        form = forms["op.logoutForm"]
        response = client.post(
            urljoin(str(response.url), form.action),
            data={**form.fields, "logout": "yes"},
            follow_redirects=False,
        )
    raise LoginFailed(f"logout did not finish after {max_steps} steps")
