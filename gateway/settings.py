"""The whole gateway configuration: one frozen pydantic-settings model, read from a YAML file.

`load_settings(path)` reports every problem with file:line:column and a hint; environment variables
(`TABIJI_…`, nested with `__`) override the file. Only gateway.app and gateway.cli import it.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.loader import load_policy_dir
from policies.yaml_source import Position, SourceError, SourceErrors, YamlDocument, read_yaml

CONFIG_ENV = "TABIJI_CONFIG"
_ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(value: object) -> object:
    """'500ms', '5s', '15m', '12h', '1d' or a number of seconds → seconds as float."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("a duration looks like 500ms, 5s, 15m, 12h or 1d")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
# Validation runs inside the config file's directory, so resolving makes relative paths absolute.
File = Annotated[FilePath, AfterValidator(Path.resolve)]
Directory = Annotated[DirectoryPath, AfterValidator(Path.resolve)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Section):
    """A socket to listen on."""

    host: str = "127.0.0.1"
    port: Port = 8080

    @field_validator("host")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("give an IP address such as 127.0.0.1 or 0.0.0.0") from None
        return value


class Tls(_Section):
    """TLS terminated by the gateway itself (otherwise plain HTTP behind a trusted proxy)."""

    cert: File
    key: File


class Server(_Section):
    """Limits that protect the gateway from slow or oversized clients."""

    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_head_bytes: Annotated[ByteSize, Field(ge=1024, le=1024 * 1024)] = ByteSize(16 * 1024)
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 100
    head_timeout: Duration = 5.0
    keep_alive_timeout: Duration = 5.0
    graceful_shutdown: Duration = 30.0
    max_body_bytes: ByteSize = ByteSize(100 * 1024 * 1024)
    max_concurrency: Annotated[int, Field(ge=1)] | None = None


class Policies(_Section):
    """Where IT's YAML policies live, and how changes are picked up without a restart."""

    dir: Directory
    watch: Literal["events", "poll"] = "events"  # events fall back to polling when unavailable
    poll_interval: Duration = 2.0  # how often to look when polling


class GeoIPConfig(_Section):
    """A MaxMind-format (mmdb) country database for the policies' `country` criterion."""

    database: File


class Metrics(_Section):
    """Prometheus metrics on their own listener (never on the public one)."""

    listen: Listen | None = None


class Logging(_Section):
    """Structured JSON logs on stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


NewPath = Annotated[Path, AfterValidator(Path.resolve)]  # may not exist yet (created at start)
_NAME_HINT = "a name is 1-63 lower-case letters, digits, '-' or '_'"
_ALGORITHMS = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]  # asymmetric only: never `none`, never HMAC (a public key must not become an HMAC secret)


def _plain_name(value: str) -> str:
    if not _ROUTE_NAME.fullmatch(value):
        raise ValueError(_NAME_HINT)
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]


def _local_store_url(value: str, schemes: tuple[str, ...]) -> str:
    """Check a store URL's scheme; make a relative sqlite path absolute (config dir)."""
    scheme = value.split(":", 1)[0].lower()
    if scheme not in schemes:
        raise ValueError(
            f"the store URL must start with one of {', '.join(s + '://' for s in schemes)}"
        )
    if scheme == "sqlite":
        if not value.startswith("sqlite:///") or len(value) <= len("sqlite:///"):
            raise ValueError("write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return "sqlite:///" + str(Path(value[len("sqlite:///") :]).resolve())
    return value


def _here(url: str) -> str:
    """A default sqlite URL, resolved against the config file's directory."""
    return "sqlite:///" + str(Path(url[len("sqlite:///") :]).resolve())


def _issuer_url(value: str) -> str:
    parts = urlsplit(value)
    loopback = parts.hostname in {"127.0.0.1", "::1", "localhost"}
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError("an issuer must be https:// (plain http only on a loopback address)")
    if parts.query or parts.fragment or parts.username:
        raise ValueError("an issuer has no query, fragment or user name (OIDC Discovery §3)")
    return value.rstrip("/") if value.endswith("/") and parts.path not in {"", "/"} else value


IssuerUrl = Annotated[str, AfterValidator(_issuer_url)]


class DisplayName(_Section):
    """How a provider is named on the chooser page, in both languages."""

    ja: str
    en: str


class ProviderConfig(_Section):
    """An OpenID Provider staff (or contractors) log in with."""

    name: PlainName
    display_name: DisplayName | None = None
    issuer: IssuerUrl
    client_id: str
    client_secret_file: File | None = None  # absent: a public client (PKCE only)
    scopes: list[str] = ["openid", "email", "profile"]
    groups_claim: str = "groups"
    algorithms: list[_ALGORITHMS] = ["RS256", "ES256"]
    ca_bundle: File | None = None
    end_session: bool = True  # RP-initiated logout at the provider when it offers it
    graph_groups_url: str | None = None  # Entra ID group overage: Microsoft Graph memberOf URL

    @field_validator("scopes")
    @classmethod
    def _openid_scope(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("the scopes must include 'openid'")
        return value


class BearerIssuerConfig(_Section):
    """An issuer whose JWT access tokens programs may present as `Authorization: Bearer`."""

    name: PlainName
    issuer: IssuerUrl
    audiences: Annotated[list[str], Field(min_length=1)]
    jwks_uri: str | None = None  # default: from the issuer's discovery document
    algorithms: list[_ALGORITHMS] = ["RS256", "ES256"]
    groups_claim: str = "groups"
    ca_bundle: File | None = None


class SessionConfig(_Section):
    """Browser sessions: lifetimes and the shared store (which also holds single-use values)."""

    lifetime: Duration = 12 * 3600.0
    idle_timeout: Duration = 3600.0
    refresh_interval: Duration = 900.0  # how often the provider is asked again (token refresh)
    store: str = Field(default_factory=lambda: _here("sqlite:///state.db"))

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return _local_store_url(value, ("sqlite", "redis", "rediss"))


class RateLimitConfig(_Section):
    """Per client address, for login, callback and logout."""

    per_minute: Annotated[int, Field(ge=1)] = 30
    burst: Annotated[int, Field(ge=1)] = 10


class IdentityConfig(_Section):
    """Who is asking: OIDC providers for browsers, bearer issuers for programs, sessions."""

    providers: list[ProviderConfig] = []
    bearer: list[BearerIssuerConfig] = []
    session: SessionConfig = Field(default_factory=SessionConfig)
    rate_limit: RateLimitConfig = RateLimitConfig()

    @model_validator(mode="after")
    def _distinct_names(self) -> IdentityConfig:
        names = [p.name for p in self.providers] + [b.name for b in self.bearer]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two identity providers are named '{name}'")
        return self


class AssertionConfig(_Section):
    """The signed identity assertion (X-Tabiji-Assertion) sent to upstreams."""

    key_dir: NewPath = Field(default_factory=lambda: Path("assertion-keys").resolve())
    lifetime: Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, le=300)] = 120.0


class AuditRedaction(_Section):
    """What the audit trail keeps of personal fields a town may not keep (README: Audit)."""

    client_ip: Literal["keep", "truncate", "hash", "drop"] = "keep"  # truncate: /24 or /48
    user_email: Literal["keep", "hash", "drop"] = "keep"  # hash: a stable pseudonym
    user_subject: Literal["keep", "hash", "drop"] = "keep"
    device_id: Literal["keep", "hash", "drop"] = "keep"
    country: Literal["keep", "drop"] = "keep"
    query: Literal["keep", "drop"] = "keep"
    posture: Literal["keep", "drop"] = "keep"


class AuditConfig(_Section):
    """The tamper-evident audit trail (see README: Audit)."""

    store: str = Field(default_factory=lambda: _here("sqlite:///audit.db"))
    durability: Literal["batched", "durable"] = "batched"
    flush_interval: Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, le=0.1)] = 0.1
    spool_dir: NewPath = Field(default_factory=lambda: Path("audit-spool").resolve())
    fail_closed: bool = False  # refuse requests while records cannot be written durably
    # The Ed25519 checkpoint key (created when missing); its public half verifies checkpoints.
    key_file: NewPath = Field(default_factory=lambda: Path("audit-key.pem").resolve())
    checkpoint_interval: Duration = 60.0
    checkpoint_export: NewPath | None = None  # a file the auditors keep (off the box)
    checkpoint_url: str | None = None
    tsa_url: str | None = None  # RFC 3161 time-stamping authority
    enabled: bool = True
    redact: AuditRedaction = Field(default_factory=AuditRedaction)
    retention_days: Annotated[int, Field(ge=1)] | None = None
    view_policy: str | None = None  # the policy that guards /.tabiji/audit (e.g. auditors)

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return _local_store_url(value, ("sqlite", "postgresql", "postgres"))


_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# Headers the gateway writes or interprets itself: a client certificate can never arrive in one.
_RESERVED_HEADERS = frozenset(
    {"host", "cookie", "authorization", "dpop", "forwarded", "x-forwarded-for", "x-request-id"}
)


class DeviceRateLimits(_Section):
    """Abuse limits for the device endpoints, per client address and per user (issue #6 §11)."""

    enrol_per_address: RateLimitConfig = RateLimitConfig(per_minute=10, burst=5)
    enrol_per_user: RateLimitConfig = RateLimitConfig(per_minute=5, burst=3)
    report_per_address: RateLimitConfig = RateLimitConfig(per_minute=60, burst=20)
    report_per_user: RateLimitConfig = RateLimitConfig(per_minute=30, burst=10)


def _default_loopback_ports() -> list[int]:
    return list(range(47801, 47806))


class DevicesConfig(_Section):
    """Device trust: the registry, the device CA, enrolment, posture and binding (issue #6).

    Off unless configured: a `devices:` section with any key turns it on (`enabled: false`
    turns it off again). Without it no device is ever known, so policies' device rules deny.
    """

    enabled: bool = False
    store: str = Field(default_factory=lambda: _here("sqlite:///devices.db"))
    ca_dir: NewPath = Field(default_factory=lambda: Path("device-ca").resolve())
    certificate_lifetime: Duration = 30 * 86400.0
    # The policy that approves an enrolment at once (None: every enrolment waits for IT).
    auto_approve_policy: str | None = None
    # The policy that guards the IT admin page /.tabiji/devices/admin (None: no admin page).
    admin_policy: str | None = None
    enrolment_code_ttl: Duration = 900.0  # an unconfirmed enrolment code expires
    pending_ttl: Duration = 7 * 86400.0  # a confirmed enrolment waits this long for IT
    binding_max_age: Duration = 8 * 3600.0  # a browser session re-attests its device after this
    report_interval: Duration = 300.0  # the agent reports this often (told in every answer)
    max_clock_skew: Duration = 300.0  # laptop clock vs gateway clock, for reports
    posture_max_age: Duration = 3600.0  # shown as "stale" on the admin page (policies decide)
    proof_max_age: Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, le=600)] = 60.0
    proof_max_skew: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, le=60)] = 5.0
    challenge_ttl: Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, le=600)] = 120.0
    # A header a trusted ingress (nginx) puts the verified client certificate in (URL-encoded
    # PEM, nginx $ssl_client_escaped_cert); honoured only from `trusted_proxies`.
    client_cert_header: str | None = None
    # CAs of TPM endorsement certificates (swtpm_setup's local CA in tests). Empty: TPM
    # attestation can never verify, so a TPM key counts as "tpm-claimed".
    attestation_ca_files: list[File] = []
    loopback_ports: Annotated[list[Port], Field(min_length=1, max_length=16)] = Field(
        default_factory=_default_loopback_ports
    )
    rate_limit: DeviceRateLimits = Field(default_factory=DeviceRateLimits)
    registry_poll_interval: Duration = 0.5  # how often the registry cache follows the store
    # The cache could not refresh for this long: every device is unknown (fail closed).
    registry_stale_after: Duration = 10.0

    @model_validator(mode="before")
    @classmethod
    def _on_when_configured(cls, data: object) -> object:
        if isinstance(data, dict) and data and "enabled" not in data:
            return {**data, "enabled": True}
        return data

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return _local_store_url(value, ("sqlite", "postgresql", "postgres"))

    @field_validator("client_cert_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower()
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError("a header name is letters, digits and '-', e.g. X-Client-Cert")
        if name in _RESERVED_HEADERS:
            raise ValueError(f"'{value}' is a header the gateway reads itself: choose another")
        return name

    @field_validator("loopback_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        if any(port < 1024 for port in value):
            raise ValueError("the agent listens without privileges: ports from 1024 up")
        if len(set(value)) != len(value):
            raise ValueError("each loopback port once")
        return value

    @model_validator(mode="after")
    def _stale_after_poll(self) -> DevicesConfig:
        if self.registry_stale_after <= self.registry_poll_interval:
            raise ValueError("registry_stale_after must be longer than registry_poll_interval")
        return self


def _split_url(value: str, what: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"}:
        raise ValueError(f"{what} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{what} needs a host name")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry a user name or password")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query (?…) or fragment (#…)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} has an invalid port") from None
    return parts.scheme, parts.hostname.lower(), port, parts.path


def _clean_prefix(path: str, what: str) -> str:
    if not path or path == "/":
        return "/"
    if "%" in path or "\\" in path or "//" in path or ";" in path:
        raise ValueError(f"the path of {what} must be plain: no %, \\, ; or //")
    segments = PurePosixPath(path).parts
    if any(segment in {".", ".."} for segment in segments):
        raise ValueError(f"the path of {what} must not contain . or .. segments")
    return "/" + "/".join(segment for segment in segments if segment != "/")


class RouteConfig(_Section):
    """One published system: who reaches it at `from`, where it lives at `to`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    from_: Annotated[str, Field(alias="from")]
    to: str
    preserve_host: bool = False
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0
    max_body_bytes: ByteSize | None = None
    websockets: bool = False
    public: bool = False
    policy: str | None = None
    tls_ca_bundle: File | None = None
    providers: list[str] | None = None  # who may log in for this route (default: every provider)
    identity_headers: bool = False  # also send unsigned X-Tabiji-User/-Email/-Groups
    audit_query: bool = False  # keep the query string in audit records (secrets still redacted)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _ROUTE_NAME.fullmatch(value):
            raise ValueError(
                "a route name is 1-63 lower-case letters, digits, '-' or '_', e.g. 'groupware'"
            )
        return value

    @field_validator("from_")
    @classmethod
    def _from_url(cls, value: str) -> str:
        _, _, _, path = _split_url(value, "'from'")
        _clean_prefix(path, "'from'")
        return value

    @field_validator("to")
    @classmethod
    def _to_url(cls, value: str) -> str:
        _, _, _, path = _split_url(value, "'to'")
        _clean_prefix(path, "'to'")
        return value

    @model_validator(mode="after")
    def _access_is_explicit(self) -> RouteConfig:
        if self.public and self.policy is not None:
            raise ValueError("set either 'public: true' or 'policy:', not both")
        if self.tls_ca_bundle is not None and not self.to.startswith("https://"):
            raise ValueError("'tls_ca_bundle' only applies to an https:// upstream")
        return self

    @property
    def from_parts(self) -> tuple[str, str, str]:
        """(scheme, canonical authority, path prefix) of `from`."""
        scheme, host, port, path = _split_url(self.from_, "'from'")
        default = 443 if scheme == "https" else 80
        authority = host if port in (None, default) else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port in (None, default) else f"[{host}]:{port}"
        return scheme, authority, _clean_prefix(path, "'from'")


class GatewaySettings(BaseSettings):
    """The gateway's whole configuration (see deploy/gateway.example.yaml for every key)."""

    model_config = SettingsConfigDict(
        env_prefix="TABIJI_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    listen: Listen = Listen()
    public_url: str
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    tls: Tls | None = None
    server: Server = Server()
    metrics: Metrics = Metrics()
    logging: Logging = Logging()
    policies: Policies | None = None
    geoip: GeoIPConfig | None = None
    # Built while the config file is read (its directory is the working directory then), so
    # relative default paths land beside the config file.
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    assertion: AssertionConfig = Field(default_factory=AssertionConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    routes: Annotated[list[RouteConfig], Field(min_length=1)]

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        _, _, _, path = _split_url(value, "'public_url'")
        if path not in {"", "/"}:
            raise ValueError("'public_url' is an origin only, e.g. https://gateway.town.example")
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if isinstance(value, list):
            return [ipaddress.ip_network(str(item), strict=False) for item in value]
        return value

    @model_validator(mode="after")
    def _routes_are_distinct(self) -> GatewaySettings:
        names: set[str] = set()
        places: dict[tuple[str, str], str] = {}
        for route in self.routes:
            if route.name in names:
                raise ValueError(f"two routes are named '{route.name}'; names must be unique")
            names.add(route.name)
            _, authority, prefix = route.from_parts
            other = places.setdefault((authority, prefix), route.name)
            if other != route.name:
                raise ValueError(
                    f"routes '{other}' and '{route.name}' both claim {authority}{prefix}"
                )
        known = {provider.name for provider in self.identity.providers}
        for route in self.routes:
            for name in route.providers or ():
                if name not in known:
                    raise ValueError(
                        f"route '{route.name}' names provider '{name}', which is not configured"
                        f" under identity.providers ({', '.join(sorted(known)) or 'none'})"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (12-factor deployments); no .env files are read.
        return (env_settings, init_settings)


_HINTS = {
    "missing": "add it",
    "extra_forbidden": "remove it",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "int_parsing": "write a whole number",
    "path_not_file": "give the path of an existing file",
    "list_type": "write a list (- item, or [a, b])",
    "model_type": "write a mapping (key: value)",
    "string_type": "write text",
    "less_than_equal": "use a smaller value",
    "less_than": "use a smaller value",
    "greater_than_equal": "use a larger value",
    "greater_than": "use a larger value",
    "float_parsing": "write a number, or a duration such as 5s",
    "url_parsing": "write a full URL such as https://gateway.town.example",
    "too_short": "add at least one",
    "literal_error": "choose one of the allowed values",
}


def _field_names(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class whose field set applies at `loc` (for did-you-mean hints)."""
    model: type[BaseModel] = GatewaySettings
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if part in {name, f.alias}), None)
        if field is None:
            return model
        inner = _inner_model(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _to_source_error(error: Any, document: YamlDocument) -> SourceError:
    loc: tuple[str | int, ...] = tuple(p for p in error["loc"] if not str(p).startswith("function"))
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    dotted = ".".join(str(part) for part in loc)
    hint = _HINTS.get(kind, "")
    if kind == "extra_forbidden" and loc:
        model = _model_at(loc[:-1])
        choices = _field_names(model) if model else []
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        message = f"unknown key '{loc[-1]}'"
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(choices)}"
        position = document.position_of(loc, key=True)
    elif kind == "missing":
        message = f"'{loc[-1]}' is required" if loc else message
        position = document.position_of(loc[:-1])
    else:
        message = f"{dotted}: {message}" if dotted else message
        position = document.position_of(loc)
    if dotted and document.position_of(loc) == Position(document.source, 1, 1):
        env_name = "TABIJI_" + "__".join(str(p).upper() for p in loc[:1])
        if env_name in os.environ:
            hint = f"{hint}; the value comes from the environment variable {env_name}".lstrip("; ")
    return SourceError(position, message, hint)


def load_settings(path: Path) -> GatewaySettings:
    """Read, validate and freeze the gateway configuration; SourceErrors lists every problem."""
    document = read_yaml(path)
    data = document.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SourceErrors(
            [SourceError(Position(document.source, 1, 1), "the config must be a mapping of keys")]
        )
    try:
        # Relative file paths in the config are relative to the config file, not the CWD.
        settings = _with_base_dir(path.parent, lambda: GatewaySettings(**data))
    except ValidationError as error:
        found = [_to_source_error(item, document) for item in error.errors(include_url=False)]
        found.sort(key=lambda e: (e.position.line, e.position.column))  # in reading order
        raise SourceErrors(found) from None
    problems = policy_reference_errors(settings, document)
    if problems:
        raise SourceErrors(problems)
    return settings


def policy_reference_errors(
    settings: GatewaySettings, document: YamlDocument | None = None
) -> list[SourceError]:
    """Every route's `policy:` must name a policy of a policy set that lints clean."""
    named: list[tuple[int, str]] = [
        (i, route.policy) for i, route in enumerate(settings.routes) if route.policy
    ]
    # Negative indexes: the gateway's own pages' policies, at these places in the file.
    places: dict[int, tuple[str, ...]] = {
        -1: ("audit", "view_policy"),
        -2: ("devices", "admin_policy"),
        -3: ("devices", "auto_approve_policy"),
    }
    if settings.audit.view_policy:
        named.append((-1, settings.audit.view_policy))
    if settings.devices.enabled and settings.devices.admin_policy:
        named.append((-2, settings.devices.admin_policy))
    if settings.devices.enabled and settings.devices.auto_approve_policy:
        named.append((-3, settings.devices.auto_approve_policy))
    source = document.source if document else "config"

    def where(index: int) -> Position:
        if document is None:
            return Position(source, 1, 1)
        if index < 0:
            return document.position_of(places[index])
        return document.position_of(("routes", index, "policy"))

    if settings.policies is None:
        return [
            SourceError(
                where(i),
                f"route policy '{name}' needs a policy directory",
                "add `policies: {dir: PATH}`",
            )
            for i, name in named
        ]
    try:
        policy_set = load_policy_dir(settings.policies.dir)
    except SourceErrors as errors:
        return errors.errors
    known = policy_set.names()
    problems = []
    for index, name in named:
        if policy_set.policy(name) is None:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
            problems.append(SourceError(where(index), f"unknown policy '{name}'", hint))
    return problems


def _with_base_dir(base: Path, build: Any) -> GatewaySettings:
    previous = Path.cwd()
    try:
        os.chdir(base)
        settings: GatewaySettings = build()
    finally:
        os.chdir(previous)
    return settings
