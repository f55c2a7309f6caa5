"""Redaction a town configures (fields it may not keep), applied before a record is hashed.

Always applied: the session hash is hashed again with an audit-only prefix, so the audit DB
cannot be joined to the live session store. Pure; must not import gateway.settings.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from gateway.audit.record import AuditEvent

IpMode = Literal["keep", "truncate", "hash", "drop"]
ValueMode = Literal["keep", "hash", "drop"]
_SESSION_PREFIX: Final = "audit:"


# Cached: a session sends many requests, and the request path re-hashes its hash for each one.
@functools.lru_cache(maxsize=4096)
def audit_session_hash(value: str) -> str:
    """First 32 hex of sha256("audit:" + session hash)."""
    return hashlib.sha256((_SESSION_PREFIX + value).encode()).hexdigest()[:32]


def pseudonym(field: str, value: str) -> str:
    """A stable pseudonym ("h:" + 32 hex): the same person gets the same value across records
    (auditors can still count and follow), and a known value can be looked up by hashing it."""
    digest = hashlib.sha256(f"tabiji-audit-redact:{field}:{value}".encode()).hexdigest()
    return "h:" + digest[:32]


def truncate_ip(ip: str) -> str:
    """IPv4 to its /24, IPv6 to its /48 (the network, not the household)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass(frozen=True, slots=True)
class Redactor:
    """What to keep of the personal fields. Defaults keep everything a town normally keeps."""

    client_ip: IpMode = "keep"
    user_email: ValueMode = "keep"
    user_subject: ValueMode = "keep"
    device_id: ValueMode = "keep"
    country: Literal["keep", "drop"] = "keep"
    query: Literal["keep", "drop"] = "keep"
    posture: Literal["keep", "drop"] = "keep"

    def apply(self, event: AuditEvent) -> AuditEvent:
        """The event as it may be stored."""
        changes: dict[str, object] = {}
        if event.session_hash:
            changes["session_hash"] = audit_session_hash(event.session_hash)
        if self.client_ip != "keep" and event.client_ip:
            changes["client_ip"] = {
                "truncate": truncate_ip(event.client_ip),
                "hash": pseudonym("client_ip", event.client_ip),
                "drop": "",
            }[self.client_ip]
        for name in ("user_email", "user_subject", "device_id"):
            mode = getattr(self, name)
            value = getattr(event, name)
            if mode != "keep" and value is not None:
                changes[name] = pseudonym(name, value) if mode == "hash" else None
        for name in ("country", "query", "posture"):
            if getattr(self, name) == "drop":
                changes[name] = None
        # Every value set here is clean by construction (hex, pseudonyms, networks, None).
        return event.evolve(**changes) if changes else event

    def user_key(self, user: str) -> list[str]:
        """The stored forms a filter for `user` (e-mail or subject) must look for."""
        out = [user]
        if self.user_email == "hash":
            out.append(pseudonym("user_email", user))
        if self.user_subject == "hash":
            out.append(pseudonym("user_subject", user))
        return out
