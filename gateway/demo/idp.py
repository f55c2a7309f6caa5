"""The demo OpenID Provider behind `tabiji demo`: authlib's server components on Starlette.

For the README demo ONLY (users from a YAML file, plain demo passwords, loopback only) — never a
real identity provider. The one module besides gateway/identity/oidc.py that imports authlib;
must not import gateway.settings, gateway.app or gateway.cli.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jinja2
import uvicorn
import yaml

# authlib ships no type information (no py.typed): its classes are Any to mypy.
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped, unused-ignore]
from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped, unused-ignore]
    AuthorizationServer,
    ClientMixin,
    InvalidGrantError,
    InvalidRequestError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
    ResourceProtector,
    TokenMixin,
)
from authlib.oauth2.rfc6749.grants import (  # type: ignore[import-untyped, unused-ignore]
    AuthorizationCodeGrant,
)
from authlib.oauth2.rfc6750 import (  # type: ignore[import-untyped, unused-ignore]
    BearerTokenGenerator,
    BearerTokenValidator,
)
from authlib.oauth2.rfc7636 import CodeChallenge  # type: ignore[import-untyped, unused-ignore]
from authlib.oauth2.rfc9207 import IssuerParameter  # type: ignore[import-untyped, unused-ignore]
from authlib.oidc.core import (  # type: ignore[import-untyped, unused-ignore]
    AuthorizationCodeMixin,
    OpenIDCode,
    UserInfo,
)
from authlib.oidc.rpinitiated import (  # type: ignore[import-untyped, unused-ignore]
    EndSessionEndpoint,
    EndSessionRequest,
)
from joserfc.jwk import ECKey, KeySet
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("tabiji.demo.idp")

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_USERS_FILE = Path(__file__).parent / "users.yaml"
LOGIN_COOKIE = "tabiji-demo-idp"  # never `_session`: cookies are per host, not per port
CSRF_COOKIE = "tabiji-demo-idp-csrf"
SCOPES = ("openid", "profile", "email", "groups")
CODE_LIFETIME = 60  # seconds; RFC 6749 §4.1.2 recommends at most 10 minutes
TOKEN_LIFETIME = 600
ID_TOKEN_LIFETIME = 600
LOGIN_LIFETIME = 8 * 3600
MAX_FORM_BYTES = 64 * 1024
ALGORITHM = "ES256"
CLAIMS_SUPPORTED = (
    "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "sid",
    "name", "preferred_username", "email", "email_verified", "groups",
)  # fmt: skip
ACR_PASSWORD = "urn:tabiji:demo:acr:password"  # noqa: S105 — an acr URI, not a secret
ACR_MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"
# The OAuth 2.0 / OIDC authorization request parameters the login form carries through.
AUTHORIZE_PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "max_age",
    "login_hint",
    "ui_locales",
    "response_mode",
)


class DemoIdpError(Exception):
    """The demo provider cannot start: a bad users file, address or client setting."""


# -- users and the one client -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoUser:
    """One demo account from users.yaml."""

    username: str
    subject: str
    name: str
    email: str
    groups: tuple[str, ...]
    password: str
    otp: str | None = None
    email_verified: bool = True

    def password_matches(self, password: str, otp: str) -> bool:
        """Constant-time checks of the password and, for an MFA user, the one-time code."""
        ok = hmac.compare_digest(password.encode(), self.password.encode())
        if self.otp is not None:
            ok = hmac.compare_digest(otp.strip().encode(), self.otp.encode()) and ok
        return ok


def load_users(path: Path) -> tuple[DemoUser, ...]:
    """Read users.yaml (`users:` list); every problem names the file and the entry."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise DemoIdpError(f"{path}: cannot read the demo users: {error}") from None
    entries = document.get("users") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DemoIdpError(f"{path}: write a non-empty `users:` list")
    users: list[DemoUser] = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise DemoIdpError(f"{path}: user #{number} must be a mapping")
        try:
            groups = entry.get("groups") or []
            otp = entry.get("otp")
            user = DemoUser(
                username=str(entry["username"]),
                subject=str(entry["subject"]),
                name=str(entry["name"]),
                email=str(entry["email"]),
                groups=tuple(str(group) for group in groups),
                password=str(entry["password"]),
                otp=None if otp is None else str(otp),
                email_verified=bool(entry.get("email_verified", True)),
            )
        except KeyError as missing:
            raise DemoIdpError(f"{path}: user #{number} needs {missing}") from None
        if not user.password:
            raise DemoIdpError(f"{path}: user #{number} needs a password")
        users.append(user)
    names = [user.username for user in users] + [user.subject for user in users]
    if len(set(names)) != len(names):
        raise DemoIdpError(f"{path}: user names and subjects must be unique")
    return tuple(users)


class DemoClient(ClientMixin):  # type: ignore[misc]  # authlib is untyped (Any)
    """The one relying party (the gateway): a confidential client with exact redirect URIs."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: Sequence[str],
        post_logout_redirect_uris: Sequence[str],
    ) -> None:
        self.client_id = client_id
        self._secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.post_logout_redirect_uris = tuple(post_logout_redirect_uris)
        # authlib's EndSessionEndpoint reads the registered post-logout URIs from here.
        self.client_metadata = {"post_logout_redirect_uris": list(post_logout_redirect_uris)}

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None  # OIDC Core §3.1.2.1: redirect_uri is required; never guess one

    def get_allowed_scope(self, scope: str | None) -> str:
        asked = (scope or "").split()
        return " ".join(item for item in asked if item in SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # RFC 9700 §4.1.1 / OIDC Core §3.1.2.1: exact string match, no prefix or pattern.
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self._secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        # A confidential client: never `none`, so PKCE never stands in for client authentication.
        return method in {"client_secret_basic", "client_secret_post"}

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


# -- server-side records -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login:
    """A signed-in browser at the provider: who, when, how (the `sid` of the ID tokens)."""

    user: DemoUser
    sid: str
    auth_time: int
    amr: tuple[str, ...]
    acr: str


@dataclass(frozen=True, slots=True)
class AuthCode(AuthorizationCodeMixin):  # type: ignore[misc]  # authlib is untyped (Any)
    """An issued authorization code and everything bound to it."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    login: Login
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.login.auth_time

    def get_acr(self) -> str:
        return self.login.acr

    def get_amr(self) -> list[str]:
        return list(self.login.amr)


@dataclass(slots=True)
class AccessToken(TokenMixin):  # type: ignore[misc]  # authlib is untyped (Any)
    """An issued access token (opaque), good for /userinfo only."""

    client: DemoClient
    login: Login
    scope: str
    expires_at: float
    revoked: bool = False

    def check_client(self, client: DemoClient) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))

    def is_expired(self) -> bool:
        return time.time() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> Login:
        return self.login

    def get_client(self) -> DemoClient:
        return self.client


@dataclass
class ProviderState:
    """Everything the demo provider remembers, in memory (it dies with the process)."""

    codes: dict[str, AuthCode] = field(default_factory=dict)
    spent_codes: dict[str, list[str]] = field(default_factory=dict)  # code → tokens it bought
    tokens: dict[str, AccessToken] = field(default_factory=dict)
    logins: dict[str, Login] = field(default_factory=dict)  # sid → login
    nonces: set[tuple[str, str]] = field(default_factory=set)

    def login_for(self, sid: str | None) -> Login | None:
        login = self.logins.get(sid or "")
        if login is None or time.time() > login.auth_time + LOGIN_LIFETIME:
            return None
        return login

    def end_login(self, sid: str | None) -> None:
        login = self.logins.pop(sid or "", None)
        if login is None:
            return
        for token in self.tokens.values():
            if token.login.sid == login.sid:
                token.revoked = True


def user_claims(login: Login, scope: str) -> dict[str, Any]:
    """The user's claims for the granted scopes (ID token and /userinfo alike)."""
    scopes = set(scope.split())
    user = login.user
    claims: dict[str, Any] = {"sub": user.subject}
    if "profile" in scopes:
        claims["name"] = user.name
        claims["preferred_username"] = user.username
    if "email" in scopes:
        claims["email"] = user.email
        claims["email_verified"] = user.email_verified
    if "groups" in scopes or "profile" in scopes:
        claims["groups"] = list(user.groups)
    return claims


# -- the Starlette adapter for authlib ---------------------------------------------------------


class _Payload(OAuth2Payload):  # type: ignore[misc]  # authlib is untyped (Any)
    """Query and form parameters; the first value of a repeated name, all values in datalist."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._data: dict[str, str] = {}
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for name, value in pairs:
            self._datalist[name].append(value)
            self._data.setdefault(name, value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class StarletteOAuth2Request(OAuth2Request):  # type: ignore[misc]  # authlib is untyped (Any)
    """authlib's request type, built from a Starlette request whose body was already read.

    authlib's server code is synchronous, so the adapter reads the form first (async), then hands
    authlib this plain value. The URI is the configured issuer's, not the Host header's.
    """

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers,
        query: Sequence[tuple[str, str]],
        form: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(method=method, uri=uri, headers=headers)
        self._args = dict(reversed(query))  # first value wins, as in _Payload
        self._form = dict(reversed(form))
        self.payload = _Payload([*query, *form])

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _IssuerParameter(IssuerParameter):  # type: ignore[misc]  # authlib is untyped (Any)
    """RFC 9207: every authorization response (errors included) carries `iss`."""

    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def get_issuer(self) -> str:
        return self._issuer

    def add_issuer_parameter(self, authorization_server: Any, response: Response) -> None:
        location = response.headers.get("location")
        if location:
            response.headers["location"] = add_params_to_uri(location, {"iss": self._issuer})


class _S256Required(CodeChallenge):  # type: ignore[misc]  # authlib is untyped (Any)
    """PKCE with S256 on every authorization request, for confidential clients too (RFC 9700
    §2.1.1); `plain` is refused (RFC 7636 §4.2 leaves it only for clients that cannot hash)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012 — authlib's class attribute

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        # With the method required, authlib itself refuses a missing challenge.
        if grant.request.payload.data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE with code_challenge_method=S256 is required")
        super().validate_code_challenge(grant, redirect_uri)

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            # The code had a challenge (always, see above): a missing verifier is refused.
            raise InvalidGrantError("'code_verifier' is required")
        super().validate_code_verifier(grant, result)


class DemoProvider(AuthorizationServer):  # type: ignore[misc]  # authlib is untyped (Any)
    """authlib's AuthorizationServer with the Starlette glue and the demo's in-memory stores."""

    def __init__(self, issuer: str, client: DemoClient, users: Sequence[DemoUser]) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.issuer = issuer
        self.client = client
        self.users = {user.username: user for user in users}
        self.users.update({user.email.lower(): user for user in users})
        self.state = ProviderState()
        kid = "demo-" + secrets.token_hex(4)
        self.key = ECKey.generate_key(
            "P-256", parameters={"kid": kid, "use": "sig", "alg": ALGORITHM}, private=True
        )
        self.jwks = {"keys": [self.key.as_dict(private=False)]}
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                lambda **_: secrets.token_urlsafe(32), None, lambda *_: TOKEN_LIFETIME
            ),
        )
        self.register_grant(_CodeGrant, [_S256Required(), _OpenIDCode(self, require_nonce=True)])
        self.register_extension(_IssuerParameter(issuer))
        self.register_endpoint(_EndSession(self))
        self.resources = ResourceProtector()
        self.resources.register_token_validator(_TokenValidator(self.state))

    def query_client(self, client_id: str) -> DemoClient | None:
        known = self.client.client_id.encode()
        return self.client if hmac.compare_digest(client_id.encode(), known) else None

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        login: Login = request.user
        self.state.tokens[token["access_token"]] = AccessToken(
            client=request.client,
            login=login,
            scope=token.get("scope", ""),
            expires_at=time.time() + int(token.get("expires_in", TOKEN_LIFETIME)),
        )
        code = request.authorization_code
        if code is not None:
            self.state.spent_codes.setdefault(code.code, []).append(token["access_token"])

    def create_oauth2_request(self, request: Any) -> StarletteOAuth2Request:
        if isinstance(request, StarletteOAuth2Request):
            return request
        raise TypeError("read the request with DemoProvider.read_request first")

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("the demo provider has no JSON endpoints")

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        content = json.dumps(body) if isinstance(body, dict) else (body or "")
        response = Response(content, status_code=status)
        for name, value in headers:
            response.headers[name] = value
        return response

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """authlib's signal hook; the demo has no listeners."""

    async def read_request(self, request: Request) -> StarletteOAuth2Request:
        """Read the body (url-encoded forms only, at most 64 KiB) and build authlib's type."""
        form: list[tuple[str, str]] = []
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    break
            if kind == "application/x-www-form-urlencoded" and len(body) <= MAX_FORM_BYTES:
                try:
                    form = parse_qsl(
                        body.decode("utf-8"),
                        keep_blank_values=True,
                        strict_parsing=False,
                        max_num_fields=100,
                    )
                except (UnicodeDecodeError, ValueError):
                    form = []
        query = list(request.query_params.multi_items())
        return StarletteOAuth2Request(
            request.method, self.issuer + request.url.path, request.headers, query, form
        )

    def new_login(self, user: DemoUser) -> Login:
        mfa = user.otp is not None
        login = Login(
            user=user,
            sid=secrets.token_urlsafe(16),
            auth_time=int(time.time()),
            # RFC 8176 §2: pwd + otp, and `mfa` because two factors were used.
            amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
            acr=ACR_MFA if mfa else ACR_PASSWORD,
        )
        self.state.logins[login.sid] = login
        return login

    def discovery(self) -> dict[str, Any]:
        """OIDC Discovery 1.0 §3 metadata (plus RFC 9207 and RP-initiated logout)."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "userinfo_endpoint": self.issuer + "/userinfo",
            "end_session_endpoint": self.issuer + "/end_session",
            "scopes_supported": list(SCOPES),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": list(CLAIMS_SUPPORTED),
            "authorization_response_iss_parameter_supported": True,
            "frontchannel_logout_supported": False,
            "backchannel_logout_supported": False,
        }


class _CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]  # authlib is untyped (Any)
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

    server: DemoProvider

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        if data.get("nonce"):
            self.server.state.nonces.add((request.client.client_id, data["nonce"]))
        self.server.state.codes[code] = AuthCode(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope,
            login=request.user,
            nonce=data.get("nonce"),
            code_challenge=data["code_challenge"],
            code_challenge_method=data["code_challenge_method"],
            expires_at=time.time() + CODE_LIFETIME,
        )

    def query_authorization_code(self, code: str, client: DemoClient) -> AuthCode | None:
        state = self.server.state
        # RFC 6749 §4.1.2 / §10.5: single use. Taken out on the first try, whatever follows, and
        # a replayed code revokes the tokens it bought.
        found = state.codes.pop(code, None)
        if found is None:
            for token in state.spent_codes.get(code, []):
                if token in state.tokens:
                    state.tokens[token].revoked = True
            return None
        if found.client_id != client.client_id or time.time() > found.expires_at:
            return None
        state.spent_codes.setdefault(code, [])
        return found

    def delete_authorization_code(self, authorization_code: AuthCode) -> None:
        self.server.state.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthCode) -> Login | None:
        return self.server.state.login_for(authorization_code.login.sid)


class _OpenIDCode(OpenIDCode):  # type: ignore[misc]  # authlib is untyped (Any)
    """ID tokens signed with the provider's ES256 key (OIDC Core §2, §3.1.3.6)."""

    def __init__(self, provider: DemoProvider, *, require_nonce: bool) -> None:
        super().__init__(require_nonce=require_nonce)
        self.provider = provider

    def exists_nonce(self, nonce: str, request: Any) -> bool:
        # A nonce already bound to an issued code is a replayed authorization request.
        return (request.payload.client_id or "", nonce) in self.provider.state.nonces

    def resolve_client_private_key(self, client: DemoClient) -> ECKey:
        return self.provider.key

    def get_client_algorithm(self, client: DemoClient) -> str:
        return ALGORITHM

    def get_encode_header(self, client: DemoClient) -> dict[str, str]:
        return {"alg": ALGORITHM, "kid": str(self.provider.key.kid), "typ": "JWT"}

    def get_client_claims(self, client: DemoClient) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.provider.issuer,
            "aud": client.client_id,
            "exp": now + ID_TOKEN_LIFETIME,
        }

    def generate_user_info(self, user: Login, scope: str) -> UserInfo:
        return UserInfo(sid=user.sid, **user_claims(user, scope))


class _TokenValidator(BearerTokenValidator):  # type: ignore[misc]  # authlib is untyped (Any)
    def __init__(self, state: ProviderState) -> None:
        super().__init__()
        self.state = state

    def authenticate_token(self, token_string: str) -> AccessToken | None:
        return self.state.tokens.get(token_string)


class _EndSession(EndSessionEndpoint):  # type: ignore[misc]  # authlib is untyped (Any)
    """OIDC RP-Initiated Logout 1.0: redirects only to a registered post-logout URI (§3)."""

    def __init__(self, provider: DemoProvider) -> None:
        super().__init__(provider)
        self.provider = provider

    def get_server_jwks(self) -> KeySet:
        return KeySet([self.provider.key])

    def get_algorithms(self) -> list[str]:
        return [ALGORITHM]

    def end_session(self, end_session_request: Any) -> None:
        claims = end_session_request.id_token_claims or {}
        if claims.get("iss") == self.provider.issuer:
            self.provider.state.end_login(claims.get("sid"))


# -- pages and endpoints -----------------------------------------------------------------------


class _Pages:
    """The provider's two HTML pages, with a strict CSP (no scripts; the one stylesheet pinned)."""

    def __init__(self, form_targets: Iterable[str]) -> None:
        environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.login = environment.get_template("login.html")
        self.notice = environment.get_template("notice.html")
        self.css = (TEMPLATES / "idp.css").read_text(encoding="utf-8")
        digest = base64.b64encode(hashlib.sha256(self.css.encode()).digest()).decode()
        # Browsers apply form-action to the redirect that follows a form post, so the client's
        # registered origins are allowed as well.
        targets = " ".join(sorted({_origin(target) for target in form_targets}))
        self.headers = {
            "content-security-policy": (
                f"default-src 'none'; style-src 'sha256-{digest}'; base-uri 'none'; "
                f"form-action 'self' {targets}; frame-ancestors 'none'"
            ),
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
        }

    def render(self, template: jinja2.Template, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(
            template.render(css=self.css, **context), status_code=status, headers=self.headers
        )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


NOTICES = {
    "bad-request": (
        "リクエストを処理できません",
        "Cannot process this request",
        "ログインを依頼したアプリからやり直してください。",
        "Start again from the application that sent you here.",
    ),
    "logged-out": (
        "ログアウトしました",
        "Signed out",
        "デモ ID プロバイダからログアウトしました。",
        "You are signed out of the demo identity provider.",
    ),
    "confirm-logout": (
        "ログアウトしますか",
        "Sign out?",
        "デモ ID プロバイダからログアウトします。",
        "This signs you out of the demo identity provider.",
    ),
}


class _Endpoints:
    """The provider's HTTP endpoints: read the request, let authlib decide, answer."""

    def __init__(self, provider: DemoProvider, pages: _Pages) -> None:
        self.provider = provider
        self.pages = pages
        self.issuer = provider.issuer
        self.secure = provider.issuer.startswith("https://")

    # helpers

    def notice(self, kind: str, status: int, detail: str = "", **extra: Any) -> HTMLResponse:
        title_ja, title_en, text_ja, text_en = NOTICES[kind]
        return self.pages.render(
            self.pages.notice,
            status,
            title_ja=title_ja,
            title_en=title_en,
            text_ja=text_ja,
            text_en=text_en,
            detail=detail,
            confirm=extra.get("confirm", False),
            action=extra.get("action", ""),
            hidden=extra.get("hidden", []),
            csrf=extra.get("csrf", ""),
        )

    @staticmethod
    def csrf_token(request: Request) -> str:
        return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)

    @staticmethod
    def csrf_ok(request: Request, oauth_request: StarletteOAuth2Request) -> bool:
        # Double-submit: the form's token must equal the SameSite=Lax cookie's, which a
        # cross-site post never carries.
        cookie = request.cookies.get(CSRF_COOKIE, "")
        sent = oauth_request.form.get("csrf", "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), sent.encode())

    def set_csrf(self, response: Response, token: str) -> None:
        response.set_cookie(
            CSRF_COOKIE, token, max_age=3600, httponly=True, samesite="lax", secure=self.secure
        )

    def authorize_error(
        self, error: OAuth2Error, oauth_request: StarletteOAuth2Request
    ) -> Response:
        """Errors go back to the client only once its redirect URI is known good (RFC 6749
        §4.1.2.1); otherwise the user sees a page and nobody is redirected anywhere."""
        if error.redirect_uri:
            error.state = oauth_request.payload.state
            response: Response = self.provider.handle_error_response(oauth_request, error)
            _IssuerParameter(self.issuer).add_issuer_parameter(self.provider, response)
            return response
        return self.notice("bad-request", 400, f"{error.error}: {error.description or ''}")

    def login_form(
        self,
        request: Request,
        oauth_request: StarletteOAuth2Request,
        current: Login | None,
        *,
        error: bool = False,
        username: str = "",
    ) -> Response:
        token = self.csrf_token(request)
        data = oauth_request.payload.data
        hidden = [(name, data[name]) for name in AUTHORIZE_PARAMETERS if name in data]
        response = self.pages.render(
            self.pages.login,
            401 if error else 200,
            error=error,
            current=None if current is None else current.user,
            hidden=hidden,
            csrf=token,
            action="/authorize",
            username=username,
        )
        self.set_csrf(response, token)
        return response

    def finish(
        self, grant: Any, oauth_request: StarletteOAuth2Request, login: Login, *, new: bool
    ) -> Response:
        """Issue the code: redirect to the client with code, state and iss (RFC 9207)."""
        response: Response = self.provider.create_authorization_response(
            oauth_request, grant_user=login, grant=grant
        )
        if new:
            response.set_cookie(
                LOGIN_COOKIE,
                login.sid,
                max_age=LOGIN_LIFETIME,
                httponly=True,
                samesite="lax",
                secure=self.secure,
            )
        return response

    # endpoints

    async def authorize(self, request: Request) -> Response:
        oauth_request = await self.provider.read_request(request)
        form: dict[str, str] = {}
        if request.method == "POST":
            # Only the authorization parameters count; the credentials never reach authlib.
            form = oauth_request.form
            oauth_request = StarletteOAuth2Request(
                "POST",
                self.issuer + "/authorize",
                request.headers,
                [(n, form[n]) for n in AUTHORIZE_PARAMETERS if n in form],
                [(n, form[n]) for n in ("csrf",) if n in form],
            )
        current = self.provider.state.login_for(request.cookies.get(LOGIN_COOKIE))
        try:
            # Validates client, exact redirect URI, response type, scope, PKCE, nonce and
            # prompt (prompt=none without a login → login_required back to the client).
            grant = self.provider.get_consent_grant(oauth_request, end_user=current)
        except OAuth2Error as error:
            return self.authorize_error(error, oauth_request)
        if oauth_request.payload.data.get("response_mode", "query") != "query":
            # Discovery promises query only; form_post would need a script this CSP forbids.
            refused = InvalidRequestError(
                "only response_mode=query", redirect_uri=grant.redirect_uri
            )
            return self.authorize_error(refused, oauth_request)
        prompts = oauth_request.payload.data.get("prompt", "").split()
        if request.method == "POST":
            return self.sign_in(
                request, oauth_request, form=form, grant=grant, current=current, prompts=prompts
            )
        if "none" in prompts and current is not None:
            # OIDC Core §3.1.2.1: no UI at all; answer from the existing login.
            return self.finish(grant, oauth_request, current, new=False)
        return self.login_form(request, oauth_request, current)

    def sign_in(
        self,
        request: Request,
        oauth_request: StarletteOAuth2Request,
        *,
        form: dict[str, str],
        grant: Any,
        current: Login | None,
        prompts: list[str],
    ) -> Response:
        """The login form's post: one click for a signed-in user, else the credentials."""
        if not self.csrf_ok(request, oauth_request):
            return self.notice("bad-request", 403, "csrf")
        if form.get("continue") == "1" and current is not None and "login" not in prompts:
            return self.finish(grant, oauth_request, current, new=False)
        username = form.get("username", "").strip()
        users = self.provider.users
        user = users.get(username) or users.get(username.lower())
        password, otp = form.get("password", ""), form.get("otp", "")
        if user is None:
            # Spend a comparison as for a known user, so timing does not tell names apart.
            hmac.compare_digest(password.encode(), password.encode()[::-1])
        if user is None or not user.password_matches(password, otp):
            return self.login_form(request, oauth_request, current, error=True, username=username)
        self.provider.state.end_login(request.cookies.get(LOGIN_COOKIE))  # new sid every login
        return self.finish(grant, oauth_request, self.provider.new_login(user), new=True)

    async def token(self, request: Request) -> Response:
        oauth_request = await self.provider.read_request(request)
        response: Response = self.provider.create_token_response(oauth_request)
        return response

    async def userinfo(self, request: Request) -> Response:
        oauth_request = await self.provider.read_request(request)
        try:
            access = self.provider.resources.validate_request(["openid"], oauth_request)
        except OAuth2Error as error:
            status, body, headers = error()
            return JSONResponse(body, status_code=status, headers=dict(headers))
        return JSONResponse(
            user_claims(access.login, access.scope), headers={"cache-control": "no-store"}
        )

    async def end_session(self, request: Request) -> Response:
        oauth_request = await self.provider.read_request(request)
        try:
            validated: EndSessionRequest = self.provider.validate_endpoint_request(
                "end_session", oauth_request
            )
        except OAuth2Error as error:
            # OIDC RP-Initiated Logout 1.0 §4: on errors, never redirect.
            return self.notice("bad-request", 400, f"{error.error}: {error.description or ''}")
        # §6: without a valid id_token_hint, ask the user (and check the post is theirs).
        if validated.needs_confirmation and (
            request.method == "GET" or not self.csrf_ok(request, oauth_request)
        ):
            return self.confirm_logout(request, oauth_request)
        self.provider.state.end_login(request.cookies.get(LOGIN_COOKIE))
        result = self.provider.create_endpoint_response("end_session", validated)
        response: Response = result if result is not None else self.notice("logged-out", 200)
        response.delete_cookie(LOGIN_COOKIE, httponly=True, samesite="lax", secure=self.secure)
        return response

    def confirm_logout(self, request: Request, oauth_request: StarletteOAuth2Request) -> Response:
        token = self.csrf_token(request)
        data = oauth_request.payload.data
        response = self.notice(
            "confirm-logout",
            200,
            confirm=True,
            action="/end_session",
            hidden=[(name, value) for name, value in data.items() if name != "csrf"],
            csrf=token,
        )
        self.set_csrf(response, token)
        return response

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(self.provider.discovery())

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.provider.jwks, media_type="application/jwk-set+json")


def build_demo_idp_app(
    issuer: str,
    client_id: str,
    client_secret: str,
    redirect_uris: Sequence[str],
    post_logout_redirect_uris: Sequence[str],
    *,
    users_file: Path = DEFAULT_USERS_FILE,
) -> Starlette:
    """The demo provider as a Starlette app (tests drive it in-process; `main` serves it)."""
    if not client_secret:
        raise DemoIdpError("the demo client needs a secret")
    client = DemoClient(client_id, client_secret, redirect_uris, post_logout_redirect_uris)
    provider = DemoProvider(issuer.rstrip("/"), client, load_users(users_file))
    endpoints = _Endpoints(provider, _Pages([*redirect_uris, *post_logout_redirect_uris]))
    app = Starlette(
        routes=[
            Route("/.well-known/openid-configuration", endpoints.discovery),
            Route("/authorize", endpoints.authorize, methods=["GET", "POST"]),
            Route("/token", endpoints.token, methods=["POST"]),
            Route("/jwks", endpoints.jwks),
            Route("/userinfo", endpoints.userinfo, methods=["GET", "POST"]),
            Route("/end_session", endpoints.end_session, methods=["GET", "POST"]),
        ]
    )
    app.state.provider = provider
    return app


# -- serving -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_demo_idp(
    host: str,
    port: int,
    *,
    issuer: str,
    client_id: str,
    client_secret: str,
    redirect_uris: Sequence[str],
    post_logout_redirect_uris: Sequence[str],
    users_file: Path = DEFAULT_USERS_FILE,
    allow_non_loopback: bool = False,
    fd: int | None = None,
) -> None:
    """Serve the demo provider until stopped. Refuses a non-loopback address unless allowed.

    With `fd`, serve on that inherited listening socket (`tabiji demo` binds the port itself, so
    no other process can take it between the check and the start); `host` is then its address.
    """
    if fd is not None:
        with socket.socket(fileno=os.dup(fd)) as inherited:
            host, port = inherited.getsockname()[:2]
    if not is_loopback(host):
        if not allow_non_loopback:
            raise DemoIdpError(
                f"the demo identity provider listens on loopback only (127.0.0.1, ::1, "
                f"localhost), not {host!r}: it has demo passwords anyone could use. "
                "For a container demo only, add --demo-allow-non-loopback."
            )
        log.warning(
            "DEMO IDENTITY PROVIDER LISTENING ON %s — demo users with published passwords can "
            "sign in from the network. Never run this outside a throw-away demo.",
            host,
        )
        if urlsplit(issuer).scheme == "http":
            # authlib refuses plain http except on loopback; the container demo runs without TLS.
            os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
    app = build_demo_idp_app(
        issuer,
        client_id,
        client_secret,
        redirect_uris,
        post_logout_redirect_uris,
        users_file=users_file,
    )
    if fd is not None:
        uvicorn.run(app, fd=fd, log_level="warning", access_log=False)
    else:
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.demo.idp`: the demo provider for `tabiji demo` (loopback only)."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.idp",
        description="Tabiji's demo OpenID Provider, for the README demo only (loopback only).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--issuer", help="the issuer URL (default http://HOST:PORT)")
    parser.add_argument("--client-id", default="tabiji-demo")
    parser.add_argument("--client-secret-file", required=True, type=Path)
    parser.add_argument("--redirect-uri", action="append", required=True, default=[])
    parser.add_argument("--post-logout-redirect-uri", action="append", default=[])
    parser.add_argument("--users", type=Path, default=DEFAULT_USERS_FILE)
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    parser.add_argument(
        "--demo-allow-non-loopback",
        action="store_true",
        help="DEMO ONLY (containers): listen on a non-loopback address",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    host_for_url = f"[{args.host}]" if ":" in args.host else args.host
    issuer = args.issuer or f"http://{host_for_url}:{args.port}"
    try:
        secret = args.client_secret_file.read_text(encoding="utf-8").strip()
        run_demo_idp(
            args.host,
            args.port,
            issuer=issuer,
            client_id=args.client_id,
            client_secret=secret,
            redirect_uris=args.redirect_uri,
            post_logout_redirect_uris=args.post_logout_redirect_uri,
            users_file=args.users,
            allow_non_loopback=args.demo_allow_non_loopback,
            fd=args.fd,
        )
    except (DemoIdpError, OSError) as error:
        print(f"tabiji demo idp: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
