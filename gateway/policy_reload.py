"""Hot reload of the policy directory in each worker: watch it, lint the new set, swap it in whole.

A new set replaces the one in force only if it loads clean and still holds every policy a route
names; otherwise the last good set stays, and the error is logged, counted and shown in readyz.
Must not import gateway.settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import watchfiles

from gateway.decide import PolicyHolder
from policies.engine import PolicySet
from policies.loader import load_policy_dir
from policies.yaml_source import SourceErrors

log = logging.getLogger("tabiji.policy")
RELOAD_STAMP = ".tabiji-reload"  # `tabiji reload` touches it; every worker's watcher sees it
# Kubernetes mounts a ConfigMap as symlinks into `..data`, which kubelet swaps atomically (a
# rename of `..data_tmp`): the policy files' own names never see an event, only `..data` does.
KUBELET_DATA_LINK = "..data"
_WATCHED_SUFFIXES = (".yaml", ".yml")


def _relevant(change: watchfiles.Change, path: str) -> bool:
    name = Path(path).name
    if name in (RELOAD_STAMP, KUBELET_DATA_LINK):
        return True
    return name.endswith(_WATCHED_SUFFIXES) and not name.startswith(".")


class PolicyReloader:
    """Keeps `holder.current` in step with the directory; one instance per worker process."""

    def __init__(
        self,
        *,
        directory: Path,
        holder: PolicyHolder,
        required: frozenset[str],
        poll_interval: float,
        use_events: bool = True,
        count: Callable[[str], None],
        loader: Callable[[Path], PolicySet] = load_policy_dir,
        audit: Callable[[str, Mapping[str, object]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.holder = holder
        self.required = required
        self.poll_interval = poll_interval
        self.use_events = use_events
        self._count = count
        self._loader = loader
        self._audit = audit
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def reload(self) -> bool:
        """Load the directory again; swap it in if clean. True when the set in force is current."""
        try:
            candidate = await asyncio.to_thread(self._loader, self.directory)
        except SourceErrors as errors:
            return self._reject("; ".join(str(error) for error in errors.errors[:5]))
        except Exception as error:  # any failure keeps the last good set (fail safe, not open)
            log.exception("policy reload failed")
            return self._reject(f"{type(error).__name__}: {error}")
        missing = self.required - set(candidate.names())
        if missing:
            lacking = ", ".join(sorted(missing))
            return self._reject(f"routes name policies the new set lacks: {lacking}")
        previous = self.holder.current
        self.last_error = None
        if candidate.content_hash == previous.content_hash:
            self._count("unchanged")
            return True
        self.holder.current = candidate
        self._count("applied")
        # A change of the policy set is an audit record: which hash decided from when on.
        self._record(
            "policy.reload",
            {"old_hash": previous.content_hash, "new_hash": candidate.content_hash},
        )
        log.info(
            "policy set reloaded",
            extra={"old_hash": previous.content_hash, "new_hash": candidate.content_hash},
        )
        return True

    def _record(self, action: str, detail: Mapping[str, object]) -> None:
        if self._audit is not None:
            try:
                self._audit(action, {**detail, "directory": str(self.directory)})
            except Exception:
                log.exception("could not record %s", action)

    def _reject(self, message: str) -> bool:
        self.last_error = message
        self._count("rejected")
        self._record(
            "policy.reload-refused",
            {"error": message[:500], "hash": self.holder.current.content_hash},
        )
        log.error(
            "policy reload refused; the last good set stays in force",
            extra={"error": message, "hash": self.holder.current.content_hash},
        )
        return False

    def readiness(self) -> tuple[bool, str]:
        """Ready with the last good set even after a refused reload (the error is shown)."""
        current = self.holder.current.content_hash[:16]
        if self.last_error:
            return True, f"serving {current}; last reload refused: {self.last_error}"
        return True, f"serving {current}"

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._watch(), name="tabiji-policy-watch")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        if not self.use_events:
            await self._poll()
            return
        try:
            async for _ in watchfiles.awatch(
                self.directory,
                watch_filter=_relevant,
                debounce=300,
                stop_event=self._stop,
                recursive=False,
            ):
                await self.reload()
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. out of inotify watches: fall back to polling, never stop watching
            log.warning("file events unavailable; polling the policy directory instead")
            await self._poll()

    async def _poll(self) -> None:
        seen = self._fingerprint()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.poll_interval)
            now = self._fingerprint()
            if now != seen:
                seen = now
                await self.reload()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = [
                (entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                for entry in self.directory.iterdir()
                if _relevant(watchfiles.Change.modified, str(entry))
            ]
        except OSError:
            return ()
        return tuple(sorted(entries))
