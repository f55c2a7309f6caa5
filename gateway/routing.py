"""Routes and the route table: which upstream serves a (host, normalised path) pair.

Routes are our own frozen values (built from settings by `gateway.app`); matching is a dict lookup
by host, then a scan of that host's few path prefixes, longest first. Must not import settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route forwards to; `base_path` is prepended to the request path ("" for none)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    base_path: str
    ssl_context: ssl.SSLContext | None  # None for plain http; never an unverified context

    @property
    def origin(self) -> str:
        default = DEFAULT_PORTS[self.scheme]
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"

    @property
    def host_header(self) -> str:
        """The Host value an upstream expects when `preserve_host` is off."""
        return self.origin.split("://", 1)[1]


@dataclass(frozen=True, slots=True)
class Route:
    """One published system: requests for `scheme://host` + `path_prefix` go to `upstream`."""

    name: str
    scheme: str  # the scheme users reach it by ("https" in production)
    host: str  # lower-case authority as users type it; ":port" only when not the default
    path_prefix: str  # "/" or "/app" (no trailing slash); matched on segment boundaries
    upstream: Upstream
    preserve_host: bool
    connect_timeout: float
    read_timeout: float
    max_body_bytes: int
    websockets: bool
    public: bool
    policy: str | None
    providers: tuple[str, ...] | None = None  # who may log in for it (None: every provider)
    identity_headers: bool = False  # unsigned X-Tabiji-User/-Email/-Groups beside the assertion
    audit_query: bool = False  # the query string is kept in audit records

    @property
    def origin(self) -> str:
        """scheme://host[:port] as users reach it: the `aud` of the identity assertion."""
        return f"{self.scheme}://{self.host}"

    def covers(self, path: str) -> bool:
        """True when the normalised `path` lies under this route's prefix (segment-wise)."""
        prefix = self.path_prefix
        if prefix == "/":
            return True
        return path == prefix or path.startswith(prefix + "/")


def canonical_authority(authority: str, scheme: str) -> str:
    """Lower-case host[:port], dropping the port when it is the scheme's default."""
    authority = authority.strip().lower()
    if authority.endswith("]") or ":" not in authority.rsplit("]", 1)[-1]:
        return authority
    host, _, port = authority.rpartition(":")
    if port == str(DEFAULT_PORTS.get(scheme, -1)):
        return host
    return authority


class RouteTable:
    """Routes indexed by authority; each host's routes are kept longest prefix first."""

    def __init__(self, routes: list[Route]) -> None:
        by_host: dict[str, list[Route]] = {}
        for route in routes:
            by_host.setdefault(route.host, []).append(route)
        self._by_host = {
            host: tuple(sorted(found, key=lambda r: len(r.path_prefix), reverse=True))
            for host, found in by_host.items()
        }
        self.routes = tuple(routes)

    def match(self, authority: str, path: str) -> Route | None:
        """The route for a canonical authority and a normalised path, or None."""
        candidates = self._by_host.get(authority)
        if candidates is None:
            return None
        for route in candidates:
            if route.covers(path):
                return route
        return None
