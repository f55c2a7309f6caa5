"""AuditWriter: takes events from the request path and group-commits them off it, chained,
with a local spool when the store is down and signed checkpoints. Must not import settings.

Two honest modes: "batched" (submit() returns at once; a crash loses at most the records of the
last flush interval) and "durable" (submit_durable() returns once the record is committed — to
the store, or fsynced to the spool while the store is down; concurrent requests share a commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Final, Literal

from gateway.audit.chain import Chain, new_chain_id
from gateway.audit.checkpoint import Checkpointer
from gateway.audit.record import AuditEvent, AuditRecord
from gateway.audit.redact import Redactor
from gateway.audit.spool import Spool, orphans, spool_path
from gateway.audit.store import AuditStore

log = logging.getLogger("tabiji.audit")
Mode = Literal["batched", "durable"]
MAX_BACKLOG: Final = 1_000_000  # sealed records kept in memory while store AND spool fail
MAX_PENDING: Final = 200_000  # unsealed events: beyond this the writer cannot keep up


class AuditWriter:
    """One per worker process; owns one chain."""

    def __init__(
        self,
        store: AuditStore,
        *,
        chain_id: str | None = None,
        mode: Mode = "batched",
        flush_interval: float = 0.1,
        max_batch: int = 5000,
        spool_dir: Path | None = None,
        fail_closed: bool = False,
        checkpointer: Checkpointer | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        if mode not in ("batched", "durable"):
            raise ValueError("audit mode must be 'batched' or 'durable'")
        self.store = store
        self.mode: Mode = mode
        self.fail_closed = fail_closed
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._chain = Chain(chain_id or new_chain_id())
        self._checkpointer = checkpointer
        self._redactor = redactor or Redactor()
        self._spool_dir = spool_dir
        self._spool: Spool | None = None
        self._pending: list[AuditEvent] = []
        self._waiters: list[asyncio.Future[bool]] = []
        self._backlog: list[AuditRecord] = []  # sealed, persisted nowhere yet
        self._presealed: list[AuditRecord] = []  # sealed during a commit; next in line
        self._preseal_waiters: list[asyncio.Future[bool]] = []
        self._committed: tuple[int, str] | None = None  # last (seq, hash) in the store
        self._store_ok = True
        self._persist_ok = True
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stopping = False
        self.dropped = 0  # records lost because store, spool and memory all failed
        self.committed_records = 0

    # ---------------------------------------------------------------- the request path

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    @property
    def healthy(self) -> bool:
        """False while records cannot be written durably (neither store nor spool takes them)."""
        return self._persist_ok and not self._closed and len(self._pending) < MAX_PENDING

    @property
    def store_ok(self) -> bool:
        """False while the store is unreachable (records are being spooled)."""
        return self._store_ok

    def submit(self, event: AuditEvent) -> None:
        """Queue an event; hashing and I/O happen in the flush task. Never raises for I/O.
        Past MAX_PENDING queued events the writer is unhealthy (fail_closed refuses requests)
        but still keeps every event: memory is the last spool."""
        self._pending.append(event)
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    async def submit_durable(self, event: AuditEvent) -> bool:
        """Queue an event and wait until its batch is committed (store or fsynced spool).
        False when it could not be written durably (the caller refuses if fail_closed)."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(event)
        self._waiters.append(fut)
        self._wake.set()
        if self._task is None:  # not started (tests, CLI): flush inline
            await self.flush()
        return await fut

    async def record(self, event: AuditEvent) -> bool:
        """The pipeline's one call: per `mode`, queue (True) or wait for durability."""
        if self.mode == "durable":
            return await self.submit_durable(event)
        self.submit(event)
        return self.healthy

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the spool, drain orphans of dead writers, start the flush task."""
        if self._spool_dir is not None:
            spool = Spool(spool_path(self._spool_dir, self.chain_id))
            await asyncio.to_thread(spool.open)
            self._spool = spool
            await self._drain_orphans()
        self._task = asyncio.create_task(self._run(), name=f"audit-writer {self.chain_id}")

    async def flush(self) -> None:
        """Persist everything submitted so far (and checkpoint if one is due)."""
        async with self._lock:
            await self._flush_locked()

    async def close(self) -> None:
        """Flush everything, write the closing checkpoint, stop. Idempotent."""
        if self._closed:
            return
        if self._task is not None:
            # Never cancel a flush midway: its records would be sealed but stored nowhere.
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        async with self._lock:
            await self._flush_locked()
            if self._checkpointer is not None and self._committed is not None:
                seq, head = self._committed
                if seq == self._chain.seq:  # everything is in the store: nothing may follow
                    try:
                        await self._checkpointer.write(
                            self.store, self.chain_id, seq, head, "close"
                        )
                    except Exception as exc:  # shutdown must finish; logged
                        log.error("audit closing checkpoint failed: %s", exc)
            if self._spool is not None:
                await asyncio.to_thread(self._spool.close)
        if self._checkpointer is not None:
            await self._checkpointer.aclose()
        self._closed = True

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # the loop must survive anything; flush errors never reach requests
                log.exception("audit flush failed")

    # ---------------------------------------------------------------- flushing

    async def _flush_locked(self) -> None:
        events, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        # Chain order: records that failed before, then those sealed during the last commit,
        # then the events that arrived since.
        records = self._backlog + self._presealed
        waiters = self._preseal_waiters + waiters
        self._backlog, self._presealed, self._preseal_waiters = [], [], []
        ok = False
        try:
            seal, redact = self._chain.seal, self._redactor.apply
            records.extend(seal(redact(e)) for e in events)
            try:
                ok = await self._persist_overlapped(records)
            except Exception:  # a bug, not an outage: keep the records and retry next flush
                log.exception("audit persist failed")
            if not ok:
                self._keep_backlog(records)
        finally:
            self._persist_ok = ok or not records
            for fut in waiters:
                if not fut.done():
                    fut.set_result(ok)
        await self._maybe_checkpoint()

    async def _persist_overlapped(self, records: list[AuditRecord]) -> bool:
        """Persist, and while the store works (SQLite and psycopg release the GIL), seal the
        events that keep arriving, so hashing and committing overlap. The presealed records
        follow `records` in the chain and go out with the next flush."""
        task = asyncio.ensure_future(self._persist(records))
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.005)
            if done:
                return task.result()
            if self._pending:
                events, waiters = self._pending, self._waiters
                self._pending, self._waiters = [], []
                seal, redact = self._chain.seal, self._redactor.apply
                self._presealed.extend(seal(redact(e)) for e in events)
                self._preseal_waiters.extend(waiters)

    def _keep_backlog(self, records: list[AuditRecord]) -> None:
        if len(records) > MAX_BACKLOG:
            lost = len(records) - MAX_BACKLOG
            self.dropped += lost
            log.error("audit: store and spool failing; %d records lost (chain gap)", lost)
            records = records[lost:]
        self._backlog = records

    async def _persist(self, records: list[AuditRecord]) -> bool:
        """Store, else spool; always in chain order (older spooled records first)."""
        spool = self._spool
        if spool is not None and not spool.empty and not await self._drain(spool):
            return await self._spool_append(records)
        if not records:
            return True
        try:
            await self.store.append_batch(records)
        except Exception as exc:  # any store failure means: spool and retry
            if self._store_ok:
                log.error("audit store unavailable, spooling: %s", exc)
            self._store_ok = False
            return await self._spool_append(records)
        self._store_ok = True
        self._committed = (records[-1].seq, records[-1].hash)
        self.committed_records += len(records)
        return True

    async def _spool_append(self, records: list[AuditRecord]) -> bool:
        if self._spool is None:
            return False
        if not records:
            return True
        try:
            await asyncio.to_thread(self._spool.append, records)
        except OSError as exc:
            log.error("audit spool write failed: %s", exc)
            return False
        return True

    async def _drain(self, spool: Spool) -> bool:
        """Move the spool into the store; True when it is empty afterwards."""
        last: AuditRecord | None = None
        try:
            for batch in await asyncio.to_thread(lambda: list(spool.read(self.max_batch))):
                await self.store.append_batch(batch, ignore_existing=True)
                last = batch[-1]
                self.committed_records += len(batch)
            await asyncio.to_thread(spool.clear)
        except Exception as exc:  # still down: keep spooling
            self._store_ok = False
            log.debug("audit spool drain deferred: %s", exc)
            return False
        if last is not None and last.chain_id == self.chain_id:
            self._committed = (last.seq, last.hash)
        if not self._store_ok:
            log.warning("audit store back; spool drained")
        self._store_ok = True
        return True

    async def _drain_orphans(self) -> None:
        """Drain spools of writers that died (no one holds their lock) and remove them."""
        if self._spool_dir is None:
            return
        own = self._spool.path if self._spool is not None else None
        for path in orphans(self._spool_dir, own):
            other = Spool(path)
            if not await asyncio.to_thread(other.open, block=False):
                continue  # a live writer owns it
            try:
                if await self._drain(other):
                    await asyncio.to_thread(other.close, remove_if_empty=True)
                else:
                    await asyncio.to_thread(other.close, remove_if_empty=False)
            except Exception:  # try again at the next start
                await asyncio.to_thread(other.close, remove_if_empty=False)

    async def _maybe_checkpoint(self) -> None:
        cp = self._checkpointer
        if cp is None or self._committed is None:
            return
        seq, head = self._committed
        if not cp.due(self.chain_id, seq):
            return
        try:
            await cp.write(self.store, self.chain_id, seq, head)
        except Exception as exc:  # next flush retries; records are safe
            log.warning("audit checkpoint failed: %s", exc)


def now_us() -> int:
    """UTC microseconds since the epoch (for building AuditEvents)."""
    return time.time_ns() // 1000
