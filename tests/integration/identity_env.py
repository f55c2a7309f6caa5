"""A whole identity deployment for end-to-end tests: the real test OpenID Provider and the gateway
over TLS (certificates from a test CA), with the public URL P = https://127.0.0.1:PORT and a
second route host H = https://localhost:PORT (cookies are per host, not per port).

`identity_env(...)` starts both; `IdentityEnv` drives logins (`login`), reads the gateway's JWKS,
verifies identity assertions and runs `tabiji sessions …`. Test helper only (no tests here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import jwt
import pytest
import yaml

from .conftest import _LIVE, REPO, Gateway, Upstream, free_port, route, wait_healthy
from .idp_fixture import Idp, IdpClient, IdpUser, login_with_httpx, make_ca, start_idp


def load_test_helper(name: str) -> ModuleType:
    """tests/gateway/<name>.py (shared by basename there; tests/gateway is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "gateway" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PROVIDER = "town"
SECOND_PROVIDER = "contractors"
CLIENT_ID = "tabiji"
CLIENT_SECRET = "gateway-client-secret-0123456789abcdef"  # made up, test only
REDIS_URL = os.environ.get("TABIJI_TEST_REDIS_URL", "redis://127.0.0.1:6379")

ACR_MFA = "urn:tabiji:test:acr:mfa"  # tests/idp/server.mjs: the acr of an OTP login
# Policies of the test deployment (policies/README.md): any signed-in person; staff with a
# second factor (the test provider's amr for an OTP login is ["pwd","otp"]); a verified e-mail.
POLICIES = {
    "policies": [
        {"name": "signed-in", "allow": {"authenticated": True}},
        {
            "name": "staff-mfa",
            "allow": {
                "name": "staff-with-otp",
                "all": [{"group": "staff"}, {"mfa": {"amr": ["otp"], "acr": [ACR_MFA]}}],
            },
        },
        {
            "name": "verified-email",
            "allow": {
                "name": "known-address",
                "email": {"matches": r".+@(town\.example\.jp|contractor\.example\.com)"},
            },
        },
    ]
}


def redis_available() -> None:
    """Skip (fail when CI=true) unless Redis answers at TABIJI_TEST_REDIS_URL."""
    import socket

    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            return
    except OSError as error:
        reason = f"Redis is not reachable at {REDIS_URL}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Hop:
    """One response of a scripted browser journey."""

    url: str
    status: int
    location: str | None
    set_cookies: list[str]


@dataclass
class IdentityEnv:
    """A running test provider + gateway (TLS) + the test upstream."""

    idp: Idp | None
    gateway: Gateway
    upstream: Upstream
    ca: Any  # tls_ca.TestCA
    directory: Path
    extra: dict[str, Any] = field(default_factory=dict)

    # -- places ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def p(self) -> str:
        """The gateway's public URL (where logins happen)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def h(self) -> str:
        """A second route host (its own host-only cookies)."""
        return f"https://localhost:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.ca_path))

    def client(self, **options: Any) -> httpx.Client:
        """A cookie-keeping 'browser' trusting the test CA; it follows no redirects by itself."""
        return httpx.Client(
            verify=self.ssl_context(), timeout=10, follow_redirects=False, **options
        )

    # -- journeys -------------------------------------------------------------------------------

    def _ours(self, url: str) -> bool:
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        return origin in {self.p, self.h}

    def follow(
        self, client: httpx.Client, url: str, hops: list[Hop] | None = None, **headers: str
    ) -> tuple[httpx.Response, str | None]:
        """Follow redirects while they stay on the gateway (P or H); returns the last response
        and, when a redirect leaves the gateway (to the provider), that URL."""
        response = client.get(url, headers=headers or None)
        for _ in range(12):
            location = response.headers.get("location")
            if hops is not None:
                hops.append(
                    Hop(
                        str(response.url),
                        response.status_code,
                        location,
                        response.headers.get_list("set-cookie"),
                    )
                )
            if not response.is_redirect or location is None:
                return response, None
            target = urljoin(str(response.url), location)
            if not self._ours(target):
                return response, target
            response = client.get(target, headers=headers or None)
        raise AssertionError(f"too many redirects from {url}")

    def start_login(self, client: httpx.Client, url: str, hops: list[Hop] | None = None) -> str:
        """From a page of a route host to the provider's authorization URL."""
        response, away = self.follow(client, url, hops)
        assert away is not None, f"no redirect to the provider: {response.status_code} {url}"
        return away

    def login(
        self,
        client: httpx.Client,
        url: str,
        user: str,
        *,
        otp: bool | None = None,
        hops: list[Hop] | None = None,
    ) -> httpx.Response:
        """A whole login as `user` starting from `url`; returns the final response (at `url`)."""
        assert self.idp is not None
        authorize = self.start_login(client, url, hops)
        person = self.idp.user(user)
        code = person.otp if (otp if otp is not None else person.mfa) else None
        callback = login_with_httpx(client, authorize, person.username, person.password, code)
        response, away = self.follow(client, callback, hops)
        assert away is None, f"left the gateway after the callback: {away}"
        return response

    def callback_url(self, client: httpx.Client, url: str, user: str) -> str:
        """Log in at the provider but stop before the gateway's callback; returns its URL."""
        assert self.idp is not None
        person = self.idp.user(user)
        authorize = self.start_login(client, url)
        code = person.otp if person.mfa else None
        return login_with_httpx(client, authorize, person.username, person.password, code)

    # -- the assertion --------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        with self.client() as client:
            response = client.get(self.p + "/.tabiji/jwks.json")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def verify_assertion(self, token: str, audience: str) -> dict[str, Any]:
        """Verify X-Tabiji-Assertion as an upstream would (README): ES256, iss = P, aud."""
        header = jwt.get_unverified_header(token)
        keys = {key["kid"]: key for key in self.jwks()["keys"]}
        key = jwt.PyJWK(keys[header["kid"]])
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            issuer=self.p,
            audience=audience,
            options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"]},
        )
        return claims

    # -- the command line -----------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m gateway.cli ARGS --config <this gateway's config>`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            *args,
            "--config",
            str(self.gateway.config_path),
        ]
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
        )


def echo_of(response: httpx.Response) -> dict[str, Any]:
    """The test upstream's echo (method, path, headers) of a forwarded request."""
    assert response.status_code == 200, (response.status_code, response.text[:400])
    result: dict[str, Any] = response.json()
    return result


def header_of(echo: Mapping[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def standard_identity_routes(port: int, upstream_port: int) -> list[dict[str, Any]]:
    """H: / (signed-in, WebSockets, convenience headers), /mfa (staff-mfa), /verified
    (verified-email); P: /papp (signed-in), /public (public)."""
    h = f"https://localhost:{port}"
    p = f"https://127.0.0.1:{port}"
    up = f"http://127.0.0.1:{upstream_port}"
    return [
        route("mfa", h + "/mfa", up, policy="staff-mfa"),
        route("verified", h + "/verified", up, policy="verified-email"),
        route("app", h, up, policy="signed-in", websockets=True, identity_headers=True),
        route("papp", p + "/papp", up, policy="signed-in", websockets=True),
        route("public", p + "/public", up, public=True),
    ]


def gateway_clients(port: int, name: str = PROVIDER) -> list[IdpClient]:
    """The gateway registered at the provider: its real callback, logout and back-channel URIs."""
    p = f"https://127.0.0.1:{port}"
    return [
        IdpClient(
            CLIENT_ID,
            CLIENT_SECRET,
            redirect_uris=(f"{p}/.tabiji/oidc/callback",),
            post_logout_redirect_uris=(f"{p}/.tabiji/logged-out",),
            backchannel_logout_uri=f"{p}/.tabiji/oidc/backchannel-logout/{name}",
        )
    ]


@contextlib.contextmanager
def identity_env(
    directory: Path,
    upstream: Upstream,
    *,
    store: str = "sqlite",
    with_idp: bool = True,
    second_provider: bool = False,
    bearer: Sequence[Mapping[str, Any]] = (),
    rate_limit: Mapping[str, int] | None = None,
    session: Mapping[str, Any] | None = None,
    routes: Callable[[int, int], list[dict[str, Any]]] = standard_identity_routes,
    users: Sequence[IdpUser] | None = None,
) -> Iterator[IdentityEnv]:
    """Start the provider (unless `with_idp` is false) and the gateway over TLS; stop both.

    `second_provider` adds an independent provider `contractors` (its own issuer and keys, the
    same default users) beside `town`, reachable as `env.extra["idp_b"]`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory / "ca")
    port = free_port()
    idp: Idp | None = None
    if with_idp:
        options: dict[str, Any] = {} if users is None else {"users": users}
        idp = start_idp(directory / "idp", ca, name="op", clients=gateway_clients(port), **options)
    idp_b: Idp | None = None
    try:
        if second_provider:
            idp_b = start_idp(
                directory / "idp-b", ca, name="opb", clients=gateway_clients(port, SECOND_PROVIDER)
            )
        cert, key = ca.issue(["127.0.0.1", "localhost"], directory / "gw-tls")
        policy_dir = directory / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "policies.yaml").write_text(yaml.safe_dump(POLICIES, allow_unicode=True))
        secret = directory / "client.secret"
        secret.write_text(CLIENT_SECRET)
        store_url = "sqlite:///state.db"
        if store == "redis":
            # One database per run would be neater; a random key prefix is not configurable, so
            # the tests only ever look for sessions they created themselves.
            store_url = REDIS_URL
        identity: dict[str, Any] = {
            "session": {"store": store_url, **(session or {})},
            "rate_limit": dict(rate_limit or {"per_minute": 600, "burst": 200}),
        }
        if idp is not None:
            identity["providers"] = [
                {
                    "name": PROVIDER,
                    "display_name": {"ja": "役場", "en": "Town hall"},
                    "issuer": idp.issuer,
                    "client_id": CLIENT_ID,
                    "client_secret_file": str(secret),
                    "scopes": ["openid", "email", "profile", "groups"],
                    "ca_bundle": str(ca.ca_path),
                }
            ]
        if idp_b is not None:
            identity.setdefault("providers", []).append(
                {
                    "name": SECOND_PROVIDER,
                    "display_name": {"ja": "委託事業者", "en": "Contractors"},
                    "issuer": idp_b.issuer,
                    "client_id": CLIENT_ID,
                    "client_secret_file": str(secret),
                    "scopes": ["openid", "email", "profile", "groups"],
                    "ca_bundle": str(ca.ca_path),
                }
            )
        if bearer:
            identity["bearer"] = [dict(b) for b in bearer]
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "public_url": f"https://127.0.0.1:{port}",
            "tls": {"cert": str(cert), "key": str(key)},
            "policies": {"dir": str(policy_dir), "watch": "poll"},
            "identity": identity,
            "assertion": {"key_dir": str(directory / "keys")},
            "audit": {"enabled": False},
            "routes": routes(port, upstream.port),
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
            yield IdentityEnv(idp, gateway, upstream, ca, directory, extra={"idp_b": idp_b})
        finally:
            gateway.stop()
            _LIVE.remove(gateway)
    finally:
        for provider in (idp, idp_b):
            if provider is not None:
                provider.stop()
