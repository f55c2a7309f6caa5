"""Composition-root helpers: a worker's long-running services, periodic jobs, TLS contexts.

Part of the composition root (gateway.app and its wire_* modules); no stage imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tabiji.app")


@dataclass(frozen=True, slots=True)
class Service:
    """Something a worker starts after the forwarder and stops before it (stores, feeds, timers).

    Started in order, stopped in reverse; a start that fails stops the worker with its reason.
    """

    name: str
    start: Callable[[], Awaitable[None]]
    stop: Callable[[], Awaitable[None]]


async def periodic(
    stop: asyncio.Event, interval: float, job: Callable[[], object | Awaitable[object]]
) -> None:
    """Run `job` every `interval` s until `stop` is set; a failing run is logged, not fatal."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            return
        try:
            result = job()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("periodic job %s failed", getattr(job, "__qualname__", job))


def upstream_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """A verifying TLS context (system CAs, or the given bundle): never an unverified one."""
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    context.check_hostname = True  # never silently disabled
    context.verify_mode = ssl.CERT_REQUIRED
    return context
