"""TABIJI_AGENT_FACTS_FILE: a test and diagnostic hook that replaces probed facts.

When the environment variable names a JSON file, every collection reads it again and its members
replace the probed facts (`{"disk_encrypted": false}`; `null` makes a fact unknown). This is how
the end-to-end test turns a device's posture bad and good again under a real `tabiji-agent run`,
and how IT can reproduce what a policy does with a given fact.

It grants nothing: posture is self-reported by software on a machine its user controls (README,
threat model). The gateway's signature check proves *which* device sent a report, never that the
machine told the truth, so anyone able to set this variable could as well patch the agent or the
probed commands. The hook cannot make a device more trusted than its own software already could;
hardware-bound, attested keys are what policies should lean on. To keep it visible, every
collection under an override logs a warning naming the file.

The file is validated strictly (PostureFacts.from_json). A member with a bad value makes the
facts it names unknown; a file that cannot be read or is not a JSON object makes every fact
unknown — an override that went wrong must never report a healthier device than the probes did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from device_agent.probes.base import Prober
from device_agent.report import PostureFacts, ReportInvalid

FACTS_FILE_ENV: Final = "TABIJI_AGENT_FACTS_FILE"
MAX_OVERRIDE_BYTES: Final = 64 * 1024

log = logging.getLogger("device_agent.probes")

_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(PostureFacts))


def read_overrides(path: Path) -> dict[str, object] | None:
    """The file's members, or None when it is unreadable, too large, or not a JSON object."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_OVERRIDE_BYTES + 1)
        if len(data) > MAX_OVERRIDE_BYTES:
            return None
        document = json.loads(data)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def apply_overrides(facts: PostureFacts, overrides: Mapping[str, object] | None) -> PostureFacts:
    """The probed facts with the overridden members replaced (see the module docstring)."""
    if overrides is None:
        return PostureFacts()
    named = [name for name in overrides if name in _FIELDS]
    try:
        replacement = PostureFacts.from_json(
            {name: value for name, value in overrides.items() if value is not None}
        )
    except ReportInvalid as error:
        log.warning("%s is invalid (%s): the facts it names are unknown", FACTS_FILE_ENV, error)
        return dataclasses.replace(facts, **dict.fromkeys(named))
    return dataclasses.replace(facts, **{name: getattr(replacement, name) for name in named})


class OverridingProber:
    """A prober whose facts the TABIJI_AGENT_FACTS_FILE file may replace, read afresh each time."""

    def __init__(self, inner: Prober, environ: Mapping[str, str] | None = None) -> None:
        self.inner = inner
        self._environ = environ

    def collect(self, timeout: float) -> PostureFacts:
        facts = self.inner.collect(timeout)
        environ = os.environ if self._environ is None else self._environ
        name = environ.get(FACTS_FILE_ENV)
        if not name:
            return facts
        log.warning(
            "posture facts overridden from %s (%s): a test/diagnostic hook, not for production",
            name,
            FACTS_FILE_ENV,
        )
        return apply_overrides(facts, read_overrides(Path(name)))
