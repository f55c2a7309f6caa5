"""AuditWriter: takes events from the request path and group-commits them off it, chained,
with a local spool when the store is down and signed checkpoints. Must not import settings.

Two honest modes: "batched" (submit() returns at once; a crash loses at most the records of the
last flush interval) and "durable" (submit_durable() returns once the record is committed — to
the store, or fsynced to the spool while the store is down; concurrent requests share a commit).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from gateway.audit.batch import SEP, SealedBatch
from gateway.audit.chain import Chain, new_chain_id
from gateway.audit.checkpoint import Checkpointer
from gateway.audit.record import AuditEvent, AuditRecord, canonical
from gateway.audit.redact import Redactor
from gateway.audit.request_facts import RequestEncoder
from gateway.audit.spool import Spool, orphans, spool_path
from gateway.audit.store import AuditStore

log = logging.getLogger("tabiji.audit")
Mode = Literal["batched", "durable"]
MAX_BACKLOG: Final = 1_000_000  # sealed records kept in memory while store AND spool fail
MAX_PENDING: Final = 200_000  # unsealed events: beyond this the writer cannot keep up
# Deferred indexing (SQLite) runs while the machine had at least this many CPUs idle in the
# last interval (its own indexing counted as idle: it would be), a step at a time, and not
# while many events (or a durable request) wait to be sealed. Spare CPU, not saved CPU: README
# "Performance". Without /proc/stat: while requests used less than 1 - this of our CPU.
IDLE_SPARE_CPUS: Final = 0.3
# While the store is known to be down, flushes go straight to the spool and the store is tried
# again at most this often, each try bounded by STORE_PROBE_BUDGET: an unreachable server (a pool
# waiting out its connect timeout) must not hold records in memory, or durable requests, for
# seconds per flush.
STORE_RETRY_INTERVAL: Final = 1.0
STORE_PROBE_BUDGET: Final = 0.5
IDLE_MAX_PENDING: Final = 2000  # past this many unsealed events, indexing waits for the flush
IDLE_STEP: Final = 500  # records per idle indexing step (≈ 6 ms of the store's thread)


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
        on_backlog: Callable[[int], None] | None = None,
        store_retry_interval: float = STORE_RETRY_INTERVAL,
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
        self._on_backlog = on_backlog  # told the unindexed backlog after each write or step
        self._spool_dir = spool_dir
        self._spool: Spool | None = None
        # AuditEvents, or the pipeline's finished outcomes (encoded at flush time, no event
        # built per request: gateway.audit.request_facts).
        self._pending: list[Any] = []
        self._waiters: list[asyncio.Future[bool]] = []
        self._backlog: list[SealedBatch] = []  # sealed, persisted nowhere yet
        self._presealed: list[SealedBatch] = []  # sealed during a commit; next in line
        self._encoder = RequestEncoder(self._chain.chain_id, self._redactor)
        self._head_raw = bytes.fromhex(self._chain.head)
        self._preseal_waiters: list[asyncio.Future[bool]] = []
        self._committed: tuple[int, str] | None = None  # last (seq, hash) in the store
        self._store_ok = True
        self._store_retry_interval = store_retry_interval
        self._next_store_try = 0.0  # monotonic; only consulted while the store is known down
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
    def unindexed(self) -> int:
        """Records committed to the store's log but not indexed yet (SQLite; else 0)."""
        return int(getattr(self.store, "backlog", 0))

    def _report_backlog(self) -> None:
        if self._on_backlog is not None:
            self._on_backlog(self.unindexed)

    @property
    def store_ok(self) -> bool:
        """False while the store is unreachable (records are being spooled)."""
        return self._store_ok

    def submit_outcome(self, outcome: object) -> None:
        """Queue a finished request's outcome (batched mode): it is encoded at flush time, so
        it must not change after this call (the pipeline's Outcome is finished by then)."""
        self._pending.append(outcome)
        if len(self._pending) >= self.max_batch:
            self._wake.set()

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
        clock = _CpuClock(self.store)
        loop = asyncio.get_running_loop()
        wake = self._wake
        while not self._stopping:
            # A timer that sets the event, not wait_for(): that made a task and a cancellation
            # (an exception) on every idle tick, ten times a second.
            timer = loop.call_later(self.flush_interval, wake.set)
            await wake.wait()
            timer.cancel()
            wake.clear()
            try:
                await self.flush()
                await self._index_idle(clock)
                self._report_backlog()
            except Exception:  # the loop must survive anything; flush errors never reach requests
                log.exception("audit flush failed")

    def _behind(self) -> bool:
        """Events pile up (or a durable request waits): sealing them comes first."""
        return bool(self._waiters) or len(self._pending) >= IDLE_MAX_PENDING

    async def _index_idle(self, clock: _CpuClock) -> None:
        """Deferred indexing with spare CPU: judged over the last tick (≥ one flush interval,
        so the 10 ms resolution of /proc/stat matters little), then steps for as long as that
        spare CPU would have lasted, stopping early when events arrive."""
        index = getattr(self.store, "index_pending", None)
        if index is None or getattr(self.store, "backlog", 0) <= 0 or self._behind():
            clock.reset()
            return
        spare = clock.spare_cpus()
        if clock.elapsed() < self.flush_interval:
            return  # too short a window to judge: keep measuring
        clock.reset()
        if spare < IDLE_SPARE_CPUS:
            return
        budget = time.monotonic() + min(spare, 1.0) * self.flush_interval
        while not self._behind() and not self._stopping and time.monotonic() < budget:
            if not await index(IDLE_STEP):
                break

    # ---------------------------------------------------------------- flushing

    async def _flush_locked(self) -> None:
        if not (self._pending or self._waiters or self._backlog or self._presealed) and (
            self._spool is None or self._spool.empty
        ):
            await self._maybe_checkpoint()  # nothing to write: the idle tick stays cheap
            return
        events, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        # Chain order: batches that failed before, then those sealed during the last commit,
        # then the events that arrived since.
        batches = self._backlog + self._presealed
        waiters = self._preseal_waiters + waiters
        self._backlog, self._presealed, self._preseal_waiters = [], [], []
        ok = False
        try:
            if events:
                batches.append(self._seal(events))
            try:
                ok = await self._persist_overlapped(batches)
            except Exception:  # a bug, not an outage: keep the records and retry next flush
                log.exception("audit persist failed")
            if not ok:
                self._keep_backlog(batches)
        finally:
            self._persist_ok = ok or not batches
            for fut in waiters:
                if not fut.done():
                    fut.set_result(ok)
        await self._maybe_checkpoint()

    def _seal(self, items: list[Any]) -> SealedBatch:
        """Chain the items: each one's canonical bytes and sha256(prev || bytes), written into
        one buffer each (no object kept per record)."""
        chain = self._chain
        cid, first, prev_hex = chain.chain_id, chain.seq + 1, chain.head
        encode, redact, sha = self._encoder.encode, self._redactor.apply, hashlib.sha256
        head, seq = self._head_raw, chain.seq
        body = bytearray()
        hashes = bytearray()
        for item in items:
            seq += 1
            if type(item) is AuditEvent:
                data = canonical(cid, seq, redact(item))
            else:
                try:
                    data = encode(seq, item)
                except Exception:  # a bug in the fast encoder must not lose the record
                    log.exception("audit: request encoding failed; using the reference")
                    from gateway.audit.trail import request_event

                    data = canonical(cid, seq, redact(request_event(item)))
            h = sha(head)
            h.update(data)
            head = h.digest()
            if body:
                body += SEP
            body += data
            hashes += head
        chain.seq, chain.head, self._head_raw = seq, head.hex(), head
        return SealedBatch(cid, first, prev_hex, bytes(body), bytes(hashes), len(items))

    async def _persist_overlapped(self, batches: list[SealedBatch]) -> bool:
        """Persist, and while the store works (SQLite and psycopg release the GIL), seal the
        events that keep arriving, so hashing and committing overlap. The presealed batches
        follow `batches` in the chain and go out with the next flush."""
        task = asyncio.ensure_future(self._persist(batches))
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.005)
            if done:
                return task.result()
            if self._pending:
                events, waiters = self._pending, self._waiters
                self._pending, self._waiters = [], []
                self._presealed.append(self._seal(events))
                self._preseal_waiters.extend(waiters)

    def _keep_backlog(self, batches: list[SealedBatch]) -> None:
        total = sum(len(b) for b in batches)
        while total > MAX_BACKLOG and batches:
            lost = min(len(batches[0]), total - MAX_BACKLOG)
            self.dropped += lost
            log.error("audit: store and spool failing; %d records lost (chain gap)", lost)
            rest = batches[0].tail(lost)
            batches = batches[1:] if rest is None else [rest, *batches[1:]]
            total -= lost
        self._backlog = batches

    async def _persist(self, batches: list[SealedBatch]) -> bool:
        """Store, else spool; always in chain order (older spooled records first)."""
        spool = self._spool
        if spool is not None and not spool.empty:
            known_down = not self._store_ok
            if known_down and time.monotonic() < self._next_store_try:
                return await self._spool_append(batches)  # straight to local disk
            if not await self._drain(
                spool, probe_budget=STORE_PROBE_BUDGET if known_down else None
            ):
                self._next_store_try = time.monotonic() + self._store_retry_interval
                return await self._spool_append(batches)
        if not batches:
            return True
        try:
            # check=False: these batches continue this writer's own chain by construction.
            await self.store.append_log(batches, check=False)
        except Exception as exc:  # any store failure means: spool and retry
            if self._store_ok:
                log.error("audit store unavailable, spooling: %s", exc)
            self._store_ok = False
            self._next_store_try = time.monotonic() + self._store_retry_interval
            return await self._spool_append(batches)
        self._store_ok = True
        self._committed = (batches[-1].last_seq, batches[-1].head)
        self.committed_records += sum(len(b) for b in batches)
        return True

    async def _spool_append(self, batches: list[SealedBatch]) -> bool:
        if self._spool is None:
            return False
        if not batches:
            return True
        records: list[AuditRecord] = [r for b in batches for r in b.records()]
        try:
            await asyncio.to_thread(self._spool.append, records)
        except OSError as exc:
            log.error("audit spool write failed: %s", exc)
            return False
        return True

    async def _drain(self, spool: Spool, *, probe_budget: float | None = None) -> bool:
        """Move the spool into the store; True when it is empty afterwards. With `probe_budget`
        the first batch must be committed within it (is the store back at all?); the rest take
        as long as they need. A batch cut off by the budget is safe: a drain skips records
        already stored."""
        last: AuditRecord | None = None
        try:
            batches = await asyncio.to_thread(lambda: list(spool.read(self.max_batch)))
            for index, batch in enumerate(batches):
                append = self.store.append_batch(batch, ignore_existing=True)
                if index == 0 and probe_budget is not None:
                    await asyncio.wait_for(append, probe_budget)
                else:
                    await append
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


class _CpuClock:
    """Spare CPU since the last reset: the machine's idle CPUs (Linux /proc/stat) plus what
    this process spent indexing (it would have been idle), per wall second."""

    def __init__(self, store: object) -> None:
        self._store = store
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.reset()

    def _index_cpu(self) -> float:
        return float(getattr(self._store, "index_cpu_s", 0.0))

    def _machine_idle(self) -> float | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
        except OSError:
            return None
        return (int(fields[4]) + int(fields[5])) * self._tick  # idle + iowait, seconds

    def reset(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.process_time()
        self._idx = self._index_cpu()
        self._idle = self._machine_idle()

    def elapsed(self) -> float:
        return time.monotonic() - self._wall

    def spare_cpus(self) -> float:
        wall = time.monotonic() - self._wall
        if wall <= 0:
            return 0.0
        indexing = self._index_cpu() - self._idx
        idle = self._machine_idle()
        if idle is None or self._idle is None:
            requests = time.process_time() - self._cpu - indexing
            return max(0.0, 1.0 - requests / wall)
        return (idle - self._idle + indexing) / wall
