"""Factories for request facts and a one-line `decide(yaml, policy, request)` for policy tests."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from policies.engine import PolicySet, evaluate
from policies.loader import load_policy_dir
from policies.model import (
    AccessRequest,
    ClientCertificate,
    Decision,
    Device,
    Posture,
    Resource,
    Subject,
)

NOW = datetime(2025, 4, 1, 1, 0, tzinfo=UTC)  # Tuesday 2025-04-01 10:00 in Asia/Tokyo


def make_subject(**facts: Any) -> Subject:
    """A signed-in user; any field can be given."""
    facts.setdefault("issuer", "https://idp.example.jp")
    facts.setdefault("subject", "u1")
    for key in ("groups", "amr"):
        if key in facts:
            facts[key] = frozenset(facts[key])
    return Subject(**facts)


def make_posture(**facts: Any) -> Posture:
    """A fresh, healthy posture report; any field can be overridden."""
    values: dict[str, Any] = {
        "os": "windows",
        "os_version": "10.0.22631",
        "disk_encrypted": True,
        "firewall": True,
        "screen_lock_timeout": 300,
        "auto_update": True,
        "patch_age_days": 3,
        "agent_version": "0.3.1",
        "reported_at": NOW - timedelta(minutes=2),
    }
    values.update(facts)
    return Posture(**values)


def make_device(**facts: Any) -> Device:
    """An enrolled, approved device with a healthy posture; any field can be overridden."""
    facts.setdefault("id", "pc-1")
    facts.setdefault("approved", True)
    facts.setdefault("posture", make_posture())
    if "tags" in facts:
        facts["tags"] = frozenset(facts["tags"])
    return Device(**facts)


def make_certificate(**facts: Any) -> ClientCertificate:
    """A verified client certificate."""
    facts.setdefault("fingerprint_sha256", "ab" * 32)
    return ClientCertificate(**facts)


def make_request(**facts: Any) -> AccessRequest:
    """A request to GET / on app.example.jp; every fact optional, `path`/`method` shortcuts."""
    resource = Resource("app", "app.example.jp", facts.pop("path", "/"), facts.pop("method", "GET"))
    return AccessRequest(resource=resource, **facts)


def load_text(text: str, extra: dict[str, str] | None = None) -> PolicySet:
    """Load a policy set from YAML text (plus other files by name)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "policies.yaml").write_text(text, encoding="utf-8")
        for name, body in (extra or {}).items():
            Path(tmp, name).write_text(body, encoding="utf-8")
        return load_policy_dir(Path(tmp))


def decide(
    text: str, policy: str, request: AccessRequest, now: datetime = NOW, **kw: Any
) -> Decision:
    """Load `text`, then decide `request` under `policy` at `now`."""
    compiled = load_text(text).policy(policy)
    assert compiled is not None
    return evaluate(compiled, request, now, **kw)
