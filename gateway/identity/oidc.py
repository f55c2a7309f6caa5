"""The OIDC client: discovery, authorization code flow with PKCE, ID token, refresh, logout tokens.

The gateway's one home of authlib's client (ruff banned-api); the rest of the gateway sees only
the frozen types below. Must not import gateway.settings, gateway.app or gateway.cli.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import httpx2
from authlib.integrations.httpx_client import (  # type: ignore[import-untyped]  # authlib ships no types
    AsyncOAuth2Client,
    OAuthError,
)
from authlib.oauth2.rfc7636 import (  # type: ignore[import-untyped]  # authlib ships no types
    create_s256_code_challenge,
)

from gateway import jose

log = logging.getLogger("tabiji.oidc")

DEFAULT_SCOPES: Final = ("openid", "email", "profile")
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256")
BACKCHANNEL_LOGOUT_EVENT: Final = "http://schemas.openid.net/event/backchannel-logout"
LEEWAY: Final = 30.0  # seconds of clock skew tolerated on exp / iat / nbf
MAX_ID_TOKEN_AGE: Final = 600.0  # an ID token fresh from the token endpoint was issued just now
MAX_LOGOUT_TOKEN_AGE: Final = 600.0  # Back-Channel Logout 1.0 §2.6 step 3: a recent `iat`
MAX_DOCUMENT_BYTES: Final = 512 * 1024  # discovery, Graph pages
MAX_GRAPH_PAGES: Final = 20
# A provider that answered this recently is taken to be up when a login starts; older than that,
# its discovery document is fetched again first (see OidcProvider.begin).
REACHABLE_FOR: Final = 2.0
# RFC 6749 §5.2 errors after which trying again later can help; any other error response to a
# refresh means the provider refuses this grant (user disabled, consent withdrawn, session ended).
_TRANSIENT_OAUTH_ERRORS: Final = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


class OidcError(Exception):
    """A failed OIDC step. `code` is stable kebab-case (pages, audit); `detail` is for logs;
    `reason` is the JOSE code behind an invalid token (gateway/jose.py), when there is one."""

    def __init__(self, code: str, detail: str = "", *, reason: str | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.reason = reason


# -- our types -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One configured OpenID Provider; the gateway is a client (relying party) of it."""

    name: str
    issuer: str
    client_id: str
    # None: a public client (PKCE only, token_endpoint_auth_method none). Never in a repr or log.
    client_secret: str | None = field(repr=False)
    redirect_uri: str  # the gateway's callback at its public_url
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    groups_claim: str = "groups"
    # RFC 8725 §3.1: an explicit allow-list; jose refuses none and HS* whatever is listed here.
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    ca_bundle: Path | None = None  # None: the system trust store
    end_session: bool = True  # RP-initiated logout at the provider when it offers it
    extra_auth_params: tuple[tuple[str, str], ...] = ()  # e.g. (("prompt", "select_account"),)
    # Entra ID group overage: Microsoft Graph's memberOf URL, read with the access token, e.g.
    # https://graph.microsoft.com/v1.0/me/transitiveMemberOf/microsoft.graph.group?$select=id
    graph_member_of_url: str | None = None
    http_timeout: float = 5.0

    def __post_init__(self) -> None:
        if "openid" not in self.scopes:
            raise ValueError(f"provider {self.name}: scopes must include openid")
        bad = [a for a in self.algorithms if a not in jose.ASYMMETRIC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(
                f"provider {self.name}: algorithms must be asymmetric JWS algorithms, not {bad}"
            )
        if self.client_secret == "":
            raise ValueError(f"provider {self.name}: an empty client secret (use None: public)")
        _require_secure_url(self.issuer, f"provider {self.name} issuer")
        if self.graph_member_of_url is not None:
            _require_secure_url(self.graph_member_of_url, f"provider {self.name} graph URL")
        reserved = {"state", "nonce", "code_challenge", "code_challenge_method", "redirect_uri"}
        if reserved & {k for k, _ in self.extra_auth_params}:
            raise ValueError(f"provider {self.name}: extra_auth_params may not set {reserved}")


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What discovery told us (OpenID Connect Discovery 1.0 §3), checked."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    iss_parameter_supported: bool  # RFC 9207 §3: the provider always sends `iss`


@dataclass(frozen=True, slots=True)
class LoginStart:
    """A login in progress: the caller stores state, nonce and code_verifier (single use, bound
    to the browser) and sends the browser to `authorization_url`."""

    provider: str
    authorization_url: str
    state: str
    nonce: str
    code_verifier: str = field(repr=False)
    created: float = 0.0


class LoginExpectation(Protocol):
    """The stored values of a LoginStart, as the callback finds them again."""

    @property
    def state(self) -> str: ...
    @property
    def nonce(self) -> str: ...
    @property
    def code_verifier(self) -> str: ...


_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OidcLogin:
    """A verified login (or refresh): who the provider says this is, and the tokens we keep."""

    provider: str
    issuer: str
    subject: str
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    groups: frozenset[str] = frozenset()
    groups_overage: bool = False  # the groups did not fit in the token and were not looked up
    amr: tuple[str, ...] = ()
    acr: str | None = None
    sid: str | None = None  # the provider's session id, for back-channel logout
    auth_time: int | None = None
    # Raw tokens stay out of reprs (and so out of logs and tracebacks).
    id_token: str | None = field(default=None, repr=False)  # only ever the logout id_token_hint
    refresh_token: str | None = field(default=None, repr=False)
    access_token_expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS)  # all ID token claims


@dataclass(frozen=True, slots=True)
class LogoutToken:
    """A verified back-channel logout token. The caller must refuse a `jti` it has seen before
    (it holds the shared replay store), keeping it until `expires_at`."""

    issuer: str
    subject: str | None
    sid: str | None
    jti: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class _TokenResponse:
    id_token: str | None
    access_token: str | None
    refresh_token: str | None
    expires_at: float | None


# -- helpers -------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with suppress(ValueError):
        return ip_address(host).is_loopback
    return False


def _require_secure_url(url: str, what: str) -> None:
    """https only; plain http only for loopback hosts (tests, a provider on the same host)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http"):
        raise ValueError(f"{what} is not an absolute http(s) URL: {url!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ValueError(f"{what} must use https (plain http only on loopback): {url!r}")


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    if ca_bundle is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(ca_bundle))


def _opt_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def _str_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(item for item in value if isinstance(item, str))
    return ()


def _random() -> str:
    """256 random bits, URL-safe (RFC 7636 §4.1: a verifier of 43 characters is the minimum)."""
    return secrets.token_urlsafe(32)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


# -- the client ----------------------------------------------------------------------------------


class OidcProvider:
    """The relying party of one configured provider. Create once; share between requests."""

    def __init__(self, config: ProviderConfig, *, keys: jose.KeySource | None = None) -> None:
        """`keys` pins the verification keys instead of the discovered jwks_uri (tests; a
        provider whose keys are distributed out of band)."""
        self.config = config
        self._ssl = _ssl_context(config.ca_bundle)
        # One client for all requests of this provider. authlib keeps the last token response in
        # `client.token`; it sets and returns it without an await in between, and we read only
        # the value it returns, so concurrent logins never see each other's tokens.
        self._client: Any = AsyncOAuth2Client(
            client_id=config.client_id,
            client_secret=config.client_secret,
            token_endpoint_auth_method=(
                "client_secret_basic" if config.client_secret is not None else "none"
            ),
            scope=" ".join(config.scopes),
            redirect_uri=config.redirect_uri,
            code_challenge_method="S256",
            verify=self._ssl,
            timeout=config.http_timeout,
            follow_redirects=False,  # a provider endpoint that redirects is misconfigured
            trust_env=False,  # no proxy or CA bundle from the environment
        )
        self._metadata: ProviderMetadata | None = None
        self._answered_at = float("-inf")  # time.monotonic() of the provider's last answer
        self._pinned_keys = keys
        self._keys: jose.KeySource | None = None
        self._discover_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def metadata(self) -> ProviderMetadata | None:
        """The discovered metadata (None before a successful `discover()`)."""
        return self._metadata

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- discovery -------------------------------------------------------------------------------

    async def discover(self) -> ProviderMetadata:
        """Fetch and check the provider's metadata once; later calls return the cached value.

        Raises OidcError oidc-discovery-failed (nothing is cached then: the next call tries again).
        """
        metadata = self._metadata
        if metadata is not None:
            return metadata
        async with self._discover_lock:
            if self._metadata is None:
                metadata = self._parse_metadata(await self._get_json(self._discovery_url()))
                self._keys = self._pinned_keys or jose.JwksCache(
                    metadata.jwks_uri,
                    ssl_context=self._ssl,
                    http_timeout=self.config.http_timeout,
                )
                self._metadata = metadata
                self._answered_at = time.monotonic()
            return self._metadata

    def _discovery_url(self) -> str:
        # OIDC Discovery §4: remove a trailing "/" from the issuer, then append the well-known path.
        return self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"

    async def _get_json(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        try:
            async with self._client.stream(
                "GET", url, withhold_token=True, headers=dict(headers or {})
            ) as response:
                if response.status_code != 200:
                    raise OidcError("oidc-discovery-failed", f"{url}: HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise OidcError("oidc-discovery-failed", f"{url}: larger than 512 KiB")
            return json.loads(body)
        except (httpx2.HTTPError, ssl.SSLError, OSError, ValueError) as error:
            raise OidcError("oidc-discovery-failed", f"{url}: {error}") from None

    def _parse_metadata(self, document: object) -> ProviderMetadata:
        if not isinstance(document, dict):
            raise OidcError("oidc-discovery-failed", "the metadata is not a JSON object")
        # OIDC Discovery §4.3: the issuer in the metadata MUST be identical to the one we asked.
        # Anything else is a provider impersonating another (or a mix-up waiting to happen).
        if document.get("issuer") != self.config.issuer:
            raise OidcError(
                "oidc-discovery-failed",
                f"metadata issuer {document.get('issuer')!r} is not {self.config.issuer!r}",
            )
        urls: dict[str, str | None] = {}
        for name in (
            "authorization_endpoint",
            "token_endpoint",
            "jwks_uri",
            "end_session_endpoint",
        ):
            value = document.get(name)
            if value is None and name == "end_session_endpoint":
                urls[name] = None
                continue
            if not isinstance(value, str):
                raise OidcError("oidc-discovery-failed", f"metadata has no {name}")
            try:
                _require_secure_url(value, name)
            except ValueError as error:
                raise OidcError("oidc-discovery-failed", str(error)) from None
            urls[name] = value
        return ProviderMetadata(
            issuer=self.config.issuer,
            authorization_endpoint=str(urls["authorization_endpoint"]),
            token_endpoint=str(urls["token_endpoint"]),
            jwks_uri=str(urls["jwks_uri"]),
            end_session_endpoint=urls["end_session_endpoint"],
            iss_parameter_supported=document.get("authorization_response_iss_parameter_supported")
            is True,
        )

    def _keys_or_fail(self) -> jose.KeySource:
        if self._keys is None:
            raise OidcError("oidc-discovery-failed", "discover() has not succeeded yet")
        return self._keys

    # -- the authorization code flow ---------------------------------------------------------------

    async def begin(self, now: float, extra: Mapping[str, str] | None = None) -> LoginStart:
        """A new login: fresh state, nonce and PKCE verifier (256 bits each), and the URL."""
        metadata = await self.discover()
        await self._confirm_reachable()
        state, nonce, verifier = _random(), _random(), _random()
        params = {**dict(self.config.extra_auth_params), **dict(extra or {})}
        url, _ = self._client.create_authorization_url(
            metadata.authorization_endpoint,
            state=state,
            code_verifier=verifier,  # authlib adds code_challenge (S256) and its method
            nonce=nonce,
            **params,
        )
        # authlib computes the challenge with create_s256_code_challenge: make sure it did.
        if f"code_challenge={create_s256_code_challenge(verifier)}" not in url:
            raise OidcError("oidc-discovery-failed", "authorization URL lacks the PKCE challenge")
        return LoginStart(self.config.name, str(url), state, nonce, verifier, now)

    async def _confirm_reachable(self) -> None:
        """Raise OidcError oidc-discovery-failed unless the provider answers now.

        Discovery is cached for the life of the process, so without this a login would send the
        browser to a provider that is down, and the person would see the browser's connection
        error instead of the gateway's page saying the sign-in service cannot be reached. The
        check re-fetches the discovery document, at most once per REACHABLE_FOR seconds.
        """
        if time.monotonic() - self._answered_at < REACHABLE_FOR:
            return
        document = await self._get_json(self._discovery_url())
        # The same checks as at discovery: an impostor answering at the address is not "up".
        self._parse_metadata(document)
        self._answered_at = time.monotonic()

    async def finish(
        self, params: Mapping[str, str], expected: LoginExpectation, now: float | None = None
    ) -> OidcLogin:
        """Check the callback parameters, redeem the code, verify the ID token."""
        metadata = await self.discover()
        # RFC 6749 §10.12: the state ties this response to the browser that started the login.
        if not _same(params.get("state", ""), expected.state):
            raise OidcError("oidc-state-invalid", "state does not match the login")
        # RFC 9207 §2.4: `iss` must be the issuer we sent the user to (mix-up defence); a provider
        # that promises `iss` must send it (error responses included).
        iss = params.get("iss")
        if iss is not None:
            if iss != self.config.issuer:
                raise OidcError("oidc-iss-mismatch", f"iss {iss!r} is not {self.config.issuer!r}")
        elif metadata.iss_parameter_supported:
            raise OidcError("oidc-iss-mismatch", "the provider promises `iss` but sent none")
        if "error" in params:
            raise OidcError(
                "oidc-provider-error",
                f"{params['error']}: {params.get('error_description', '')}"[:300],
                reason=params["error"][:64],
            )
        code = params.get("code")
        if not code:
            raise OidcError("oidc-callback-invalid", "the callback has neither code nor error")
        tokens = await self._token_request(
            "oidc-code-exchange-failed",
            grant_type="authorization_code",
            code=code,
            code_verifier=expected.code_verifier,
            redirect_uri=self.config.redirect_uri,
        )
        if tokens.id_token is None:
            raise OidcError("oidc-code-exchange-failed", "the token response has no id_token")
        at = time.time() if now is None else now
        claims = await self.validate_id_token(tokens.id_token, expected.nonce, at)
        return await self._login(claims, tokens)

    async def validate_id_token(
        self, id_token: str, nonce: str | None, now: float | None = None
    ) -> Mapping[str, Any]:
        """Verify an ID token (OIDC Core §3.1.3.7); `nonce` None skips only the nonce check
        (refresh, OIDC Core §12.2). Returns the claims, read-only; raises OidcError."""
        await self.discover()
        at = time.time() if now is None else now
        try:
            claims = await jose.verify_jwt(
                id_token,
                keys=self._keys_or_fail(),
                issuer=self.config.issuer,  # §3.1.3.7 step 2: exactly our issuer
                audiences=(self.config.client_id,),  # step 3: aud contains our client_id
                algorithms=self.config.algorithms,  # steps 6-8: our allow-list, never none/HS*
                expected_typ=None,  # OIDC does not define a typ for ID tokens
                required=("iss", "sub", "aud", "exp", "iat"),  # OIDC Core §2
                leeway=LEEWAY,
                now=at,  # step 9 (exp) and 10 (iat) against our clock
            )
        except jose.TokenInvalid as error:
            raise OidcError("oidc-id-token-invalid", error.detail, reason=error.code) from None
        audiences = _str_list(claims.get("aud"))
        # §3.1.3.7 step 3: refuse audiences we do not trust (we trust only ourselves).
        if any(aud != self.config.client_id for aud in audiences):
            raise OidcError(
                "oidc-id-token-invalid", f"untrusted audiences {audiences}", reason="token-aud"
            )
        # Steps 4-5: with azp present (or several audiences), azp must be our client_id.
        azp = claims.get("azp")
        if (azp is not None or len(audiences) > 1) and azp != self.config.client_id:
            raise OidcError("oidc-id-token-invalid", f"azp {azp!r}", reason="token-azp")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255:  # OIDC Core §2: ≤ 255 ASCII
            raise OidcError("oidc-id-token-invalid", "sub is not a string", reason="token-sub")
        iat = float(claims["iat"])
        if iat < at - MAX_ID_TOKEN_AGE:
            raise OidcError("oidc-id-token-invalid", f"iat {iat:.0f} too old", reason="token-old")
        # Step 11: the nonce we stored for this browser's login, exactly.
        if nonce is not None:
            got = claims.get("nonce")
            if not isinstance(got, str) or not _same(got, nonce):
                raise OidcError("oidc-nonce-mismatch", "the ID token's nonce is not ours")
        return MappingProxyType(claims)

    async def _token_request(self, failure: str, **kwargs: str) -> _TokenResponse:
        metadata = await self.discover()
        try:
            if kwargs.get("grant_type") == "refresh_token":
                token = await self._client.refresh_token(
                    metadata.token_endpoint, refresh_token=kwargs["refresh_token"]
                )
            else:
                token = await self._client.fetch_token(metadata.token_endpoint, **kwargs)
        except OAuthError as error:
            code = str(error.error or "")
            # invalid_grant on a refresh: the IdP no longer honours this grant (RFC 6749 §5.2).
            if failure == "oidc-refresh-failed" and code not in _TRANSIENT_OAUTH_ERRORS:
                raise OidcError(
                    "oidc-refresh-rejected", f"{code}: {error.description}"[:300], reason=code
                ) from None
            raise OidcError(failure, f"{code}: {error.description}"[:300], reason=code) from None
        except (httpx2.HTTPError, ssl.SSLError, OSError, ValueError) as error:
            raise OidcError(failure, f"{type(error).__name__}: {error}"[:300]) from None
        return self._parse_tokens(dict(token), failure)

    @staticmethod
    def _parse_tokens(token: Mapping[str, Any], failure: str) -> _TokenResponse:
        token_type = token.get("token_type")
        # RFC 6749 §5.1: token_type is required; OIDC Core §3.1.3.3: it is Bearer (any case).
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise OidcError(failure, f"token_type {token_type!r}")
        expires_at = token.get("expires_at")
        return _TokenResponse(
            id_token=_opt_str(token, "id_token"),
            access_token=_opt_str(token, "access_token"),
            refresh_token=_opt_str(token, "refresh_token"),
            expires_at=(
                float(expires_at)
                if isinstance(expires_at, int | float) and not isinstance(expires_at, bool)
                else None
            ),
        )

    async def _login(self, claims: Mapping[str, Any], tokens: _TokenResponse) -> OidcLogin:
        groups_value = claims.get(self.config.groups_claim)
        groups = frozenset(_str_list(groups_value))
        overage = self._has_overage(claims)
        if overage and self.config.graph_member_of_url and tokens.access_token:
            looked_up = await self._graph_groups(tokens.access_token)
            if looked_up is not None:
                groups, overage = looked_up, False
        email_verified = claims.get("email_verified")
        auth_time = claims.get("auth_time")
        return OidcLogin(
            provider=self.config.name,
            issuer=self.config.issuer,
            subject=str(claims["sub"]),
            email=_opt_str(claims, "email"),
            # Only a JSON true (or the string some providers send) counts as verified.
            email_verified=email_verified is True or email_verified == "true",
            name=_opt_str(claims, "name"),
            groups=groups,
            groups_overage=overage,
            amr=_str_list(claims.get("amr")),
            acr=_opt_str(claims, "acr"),
            sid=_opt_str(claims, "sid"),
            auth_time=(
                int(auth_time)
                if isinstance(auth_time, int | float) and not isinstance(auth_time, bool)
                else None
            ),
            id_token=tokens.id_token,
            refresh_token=tokens.refresh_token,
            access_token_expires_at=tokens.expires_at,
            claims=claims,
        )

    def _has_overage(self, claims: Mapping[str, Any]) -> bool:
        """Entra ID leaves the groups out when there are too many (over 200 in a JWT) and says
        so with a distributed claim (`_claim_names`, OIDC Core §5.6.2) or `hasgroups`."""
        names = claims.get("_claim_names")
        if isinstance(names, dict) and self.config.groups_claim in names:
            return True
        return claims.get("hasgroups") is True

    async def _graph_groups(self, access_token: str) -> frozenset[str] | None:
        """The user's group ids from Microsoft Graph (memberOf), or None when the lookup fails."""
        url = self.config.graph_member_of_url
        if url is None:
            return None
        origin = urlsplit(url)[:2]
        found: set[str] = set()
        for _ in range(MAX_GRAPH_PAGES):
            try:
                page = await self._get_json(url, {"Authorization": f"Bearer {access_token}"})
            except OidcError as error:
                log.warning("%s: Graph group lookup failed: %s", self.config.name, error.detail)
                return None
            values = page.get("value") if isinstance(page, dict) else None
            if not isinstance(values, list):
                log.warning("%s: Graph answered without a value list", self.config.name)
                return None
            found.update(
                item["id"]
                for item in values
                if isinstance(item, dict) and isinstance(item.get("id"), str)
            )
            next_link = page.get("@odata.nextLink")
            if not isinstance(next_link, str):
                return frozenset(found)
            # The access token goes only to the configured Graph origin, never to a link's host.
            if urlsplit(next_link)[:2] != origin:
                log.warning("%s: Graph nextLink to another origin refused", self.config.name)
                return None
            url = next_link
        log.warning("%s: Graph group lookup: more than %d pages", self.config.name, MAX_GRAPH_PAGES)
        return None

    # -- refresh -----------------------------------------------------------------------------------

    async def refresh(self, refresh_token: str, previous: OidcLogin | None = None) -> OidcLogin:
        """Redeem a refresh token. OidcError oidc-refresh-rejected: the provider refuses the grant
        (the user or session is gone: end the session); oidc-refresh-failed: transient (network,
        5xx, temporarily_unavailable: keep the session, retry later); oidc-id-token-invalid."""
        tokens = await self._token_request(
            "oidc-refresh-failed", grant_type="refresh_token", refresh_token=refresh_token
        )
        # RFC 6749 §6: the provider may keep the old refresh token (no rotation).
        if tokens.refresh_token is None:
            tokens = _TokenResponse(
                tokens.id_token, tokens.access_token, refresh_token, tokens.expires_at
            )
        if tokens.id_token is None:
            if previous is None:
                raise OidcError("oidc-refresh-failed", "the refresh response has no id_token")
            # Some providers answer a refresh without an ID token: the identity stays as it was.
            return replace(
                previous,
                refresh_token=tokens.refresh_token,
                access_token_expires_at=tokens.expires_at,
            )
        # OIDC Core §12.2: a refreshed ID token is validated like the first, without the nonce;
        # iss and sub must stay the same (the session store checks the subject too).
        claims = await self.validate_id_token(tokens.id_token, None)
        if previous is not None and claims["sub"] != previous.subject:
            raise OidcError("oidc-id-token-invalid", "refresh for another sub", reason="token-sub")
        return await self._login(claims, tokens)

    # -- logout ----------------------------------------------------------------------------------

    def end_session_url(
        self, id_token: str | None, post_logout_redirect_uri: str, state: str | None = None
    ) -> str | None:
        """RP-Initiated Logout 1.0 §2: where to send the browser to log out at the provider, or
        None when the provider has no end_session_endpoint (or it is turned off, or discovery has
        not happened yet: the local logout goes ahead anyway)."""
        metadata = self._metadata
        if not self.config.end_session or metadata is None or not metadata.end_session_endpoint:
            return None
        params = {"client_id": self.config.client_id}
        if id_token:
            params["id_token_hint"] = id_token
        params["post_logout_redirect_uri"] = post_logout_redirect_uri
        if state:
            params["state"] = state
        endpoint = metadata.end_session_endpoint
        return endpoint + ("&" if urlsplit(endpoint).query else "?") + urlencode(params)

    async def verify_logout_token(self, token: str, now: float | None = None) -> LogoutToken:
        """Validate a back-channel logout token (OIDC Back-Channel Logout 1.0 §2.6). Replay of
        `jti` is NOT checked here: the caller holds the shared store and must refuse a seen jti."""
        await self.discover()
        at = time.time() if now is None else now
        try:
            claims = await jose.verify_jwt(
                token,
                keys=self._keys_or_fail(),
                issuer=self.config.issuer,
                audiences=(self.config.client_id,),
                algorithms=self.config.algorithms,
                # §2.4: typ "logout+jwt" is recommended; older providers send none.
                expected_typ=("logout+jwt", ""),
                required=("iss", "aud", "iat", "exp", "jti", "events"),  # §2.4
                leeway=LEEWAY,
                now=at,
            )
        except jose.TokenInvalid as error:
            raise OidcError("oidc-logout-token-invalid", error.detail, reason=error.code) from None
        # §2.6 step 4-5: the events claim holds the back-channel logout member, a JSON object.
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(
            events.get(BACKCHANNEL_LOGOUT_EVENT), dict
        ):
            raise OidcError("oidc-logout-token-invalid", "no back-channel logout event")
        # §2.6 step 6: sub or sid (or both).
        sub, sid = claims.get("sub"), claims.get("sid")
        if not (isinstance(sub, str) and sub) and not (isinstance(sid, str) and sid):
            raise OidcError("oidc-logout-token-invalid", "neither sub nor sid")
        # §2.6 step 7: a nonce means someone passes an ID token off as a logout token.
        if "nonce" in claims:
            raise OidcError("oidc-logout-token-invalid", "a logout token has no nonce")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise OidcError("oidc-logout-token-invalid", "jti is not a string")
        iat, exp = float(claims["iat"]), float(claims["exp"])
        # §2.6 step 3: iat recent enough (the jti replay window is bounded by it).
        if iat < at - MAX_LOGOUT_TOKEN_AGE:
            raise OidcError("oidc-logout-token-invalid", f"iat {iat:.0f} is too old")
        return LogoutToken(
            issuer=self.config.issuer,
            subject=sub if isinstance(sub, str) and sub else None,
            sid=sid if isinstance(sid, str) and sid else None,
            jti=jti,
            issued_at=iat,
            expires_at=max(exp, iat + MAX_LOGOUT_TOKEN_AGE),
        )


__all__ = [
    "BACKCHANNEL_LOGOUT_EVENT",
    "LoginExpectation",
    "LoginStart",
    "LogoutToken",
    "OidcError",
    "OidcLogin",
    "OidcProvider",
    "ProviderConfig",
    "ProviderMetadata",
]
