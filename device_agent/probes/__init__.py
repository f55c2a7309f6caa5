"""Posture probes, one module per OS: typed facts, where None means *unknown* (never *false*).

The agent's runner needs only this:

    prober = probe_for_platform()            # this OS's probes (+ the TABIJI_AGENT_FACTS_FILE hook)
    facts = prober.collect(DEFAULT_TIMEOUT)  # PostureFacts; never raises, never asks for elevation
"""

from device_agent.probes.base import (
    DEFAULT_TIMEOUT,
    PlatformProber,
    Prober,
    platform_prober,
    probe_for_platform,
)
from device_agent.probes.overrides import FACTS_FILE_ENV

__all__ = [
    "DEFAULT_TIMEOUT",
    "FACTS_FILE_ENV",
    "PlatformProber",
    "Prober",
    "platform_prober",
    "probe_for_platform",
]
