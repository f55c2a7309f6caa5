"""One hash chain per writer process: seals events into AuditRecords (seq, prev_hash, hash).

Why one chain per writer: several uvicorn workers and several replicas each append without
coordinating (no shared sequence, no lock on the hot path, no single point of failure); each
chain is strictly ordered by its own seq, and `verify` walks every chain. Pure; no settings.
"""

from __future__ import annotations

import os
import socket
import time

from gateway.audit.record import AuditEvent, AuditRecord, chain_hash, genesis_hash


def new_chain_id(start_us: int | None = None) -> str:
    """`hostname:pid:start_us` — unique per writer process even when a pid is reused."""
    start = time.time_ns() // 1000 if start_us is None else start_us
    host = socket.gethostname().replace(":", "_") or "localhost"
    return f"{host}:{os.getpid()}:{start}"


class Chain:
    """The running state of one chain: the last seq and hash. Not thread-safe (one owner)."""

    def __init__(self, chain_id: str, *, seq: int = 0, head: str | None = None) -> None:
        self.chain_id = chain_id
        self.seq = seq
        self.head = head if head is not None else genesis_hash(chain_id)

    def seal(self, event: AuditEvent) -> AuditRecord:
        """Append one event: seq + 1, hash over the previous head and the canonical bytes."""
        seq = self.seq + 1
        digest = chain_hash(self.head, self.chain_id, seq, event)
        record = AuditRecord(
            event=event, chain_id=self.chain_id, seq=seq, prev_hash=self.head, hash=digest
        )
        self.seq, self.head = seq, digest
        return record
