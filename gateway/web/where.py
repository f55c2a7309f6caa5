"""Where a request to the gateway's own endpoints comes from: the origin the client reached and
the client's address — the pipeline's trusted-proxy-aware Peer when the request came through it,
else what the socket says.

Must not import gateway.settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from gateway.routing import canonical_authority


@dataclass(frozen=True, slots=True)
class Where:
    """The request's origin as the client reached it, and the client's address."""

    scheme: str
    authority: str
    client_ip: str

    @property
    def https(self) -> bool:
        return self.scheme == "https"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.authority}"


def where_of(request: Request) -> Where:
    """The pipeline's Peer (trusted-proxy aware) when present, else the socket's view."""
    peer = request.scope.get("tabiji.peer")
    if peer is not None:
        return Where(peer.scheme, peer.authority, peer.client_ip)
    scheme = request.url.scheme
    host = request.headers.get("host", "")
    client = request.client.host if request.client else "-"
    return Where(scheme, canonical_authority(host, scheme), client)
