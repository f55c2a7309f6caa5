"""Walk every chain and every signed checkpoint; name the first record that does not hold.

Streams each chain in seq order keeping only the last two hashes. Must not import settings.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.audit.checkpoint import Checkpoint, read_export, signature_ok_any
from gateway.audit.query import BadRecord, VerifyReport
from gateway.audit.record import genesis_hash

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gateway.audit.store import AuditStore

# The `what` codes of BadRecord, and what each means.
PROBLEMS: Final[dict[str, str]] = {
    "edited": "the record's contents no longer match its hash",
    "missing": "a record is missing: the sequence jumps past this seq",
    "out-of-order": "the record does not link to the one before it (reordered or replaced)",
    "inserted": "a record was inserted: the next record links past it",
    "after-close": "records follow the chain's signed closing checkpoint",
    "rewritten": "the record's hash differs from a signed checkpoint (history re-hashed)",
    "truncated": "a signed checkpoint names a record that no longer exists",
    "bad-start": "the chain's first record is neither genesis nor vouched for by retention",
    "bad-signature": "a checkpoint's signature does not verify with the audit public key",
    "unreadable-export": "a line of the checkpoint export does not parse",
    "no-key": "no audit public key configured: checkpoints cannot be checked",
    "log-differs": "the indexed record differs from the append-only log's (one was changed)",
    "not-in-log": "an indexed record is not in the append-only log",
    "not-indexed": "a record of the append-only log is missing from the index",
    "bad-log-row": "a row of the append-only log is malformed",
}


@dataclass(slots=True)
class _ChainCheckpoints:
    by_seq: dict[int, list[tuple[str, Checkpoint]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    retention: Checkpoint | None = None  # the newest retention checkpoint
    close: Checkpoint | None = None


def _now_us() -> int:
    return time.time_ns() // 1000


async def verify(
    store: AuditStore,
    public_key: Ed25519PublicKey | Mapping[str, Ed25519PublicKey] | None,
    export_path: Path | None = None,
) -> VerifyReport:
    """Check every chain and checkpoint (DB and export); stop at the first problem.
    `public_key`: one key, or a key ring by key id (current and retired keys, after rotation)."""
    records = checked_cps = 0
    stored = await store.checkpoints()
    exported = read_export(export_path) if export_path is not None else []
    last_cp = max((cp.time_us for cp in stored), default=None)

    def report(bad: BadRecord | None, chains: int) -> VerifyReport:
        return VerifyReport(
            ok=bad is None,
            records_checked=records,
            chains_checked=chains,
            checkpoints_checked=checked_cps,
            first_bad=bad,
            last_checkpoint_us=last_cp,
            checked_at_us=_now_us(),
        )

    no_key = public_key is None or (isinstance(public_key, Mapping) and not public_key)
    if no_key and (stored or exported):
        return report(BadRecord("", 0, "no-key", PROBLEMS["no-key"]), 0)

    # 1. Every checkpoint's signature, from both sources.
    per_chain: dict[str, _ChainCheckpoints] = defaultdict(_ChainCheckpoints)
    for source, cps in (("db", stored), ("export", exported)):
        for n, cp in enumerate(cps, 1):
            if cp is None:
                return report(BadRecord("", 0, "unreadable-export", f"{export_path} entry {n}"), 0)
            assert public_key is not None  # checked above: checkpoints need a key
            if not signature_ok_any(cp, public_key):
                return report(
                    BadRecord(
                        cp.chain_id,
                        cp.seq,
                        "bad-signature",
                        f"{source} {cp.kind} checkpoint at {cp.time_us}",
                    ),
                    0,
                )
            checked_cps += 1
            state = per_chain[cp.chain_id]
            if cp.kind == "retention":
                if state.retention is None or cp.seq > state.retention.seq:
                    state.retention = cp
            else:
                state.by_seq[cp.seq].append((source, cp))
                if cp.kind == "close" and (state.close is None or cp.seq < state.close.seq):
                    state.close = cp

    chain_ids = sorted(set(await store.chains()) | set(per_chain))
    iter_log = getattr(store, "iter_log", None)
    for done, chain_id in enumerate(chain_ids):
        state = per_chain.get(chain_id) or _ChainCheckpoints()
        expected_seq, prev = _origin(chain_id, state)
        bad, n = await _walk(
            chain_id, _copy(state), _index_links(store, chain_id), expected_seq, prev
        )
        records += n
        if bad is None and iter_log is not None:
            # The append-only log (SQLite): its records are checked the same way, and the
            # index must hold exactly what it holds.
            bad = await _check_log(store, chain_id, state)
        if bad is not None:
            return report(bad, done)
    return report(None, len(chain_ids))


# (seq, prev_hash, hash, the contents hash to `hash`)
Link = tuple[int, str, str, bool]


async def _index_links(store: AuditStore, chain_id: str) -> AsyncIterator[Link]:
    async for rec in store.iter_chain(chain_id):
        yield rec.seq, rec.prev_hash, rec.hash, rec.computed_hash() == rec.hash


class _BadLogRow(Exception):
    pass


async def _log_links(
    store: AuditStore, chain_id: str, after: int
) -> AsyncIterator[tuple[int, str, str, bytes, bool]]:
    """The chain's log records past `after` (a retention point). A malformed row: _BadLogRow."""
    it = store.iter_log(chain_id).__aiter__()  # type: ignore[attr-defined]  # SQLite only: checked by the caller
    while True:
        try:
            link = await it.__anext__()
        except StopAsyncIteration:
            return
        except ValueError as exc:
            raise _BadLogRow(str(exc)) from exc
        if link[0] > after:
            yield link


async def _check_log(  # noqa: PLR0911, PLR0912  # one early return per kind of damage
    store: AuditStore, chain_id: str, state: _ChainCheckpoints
) -> BadRecord | None:
    """Walk the chain in the log (like the index), then compare the two record by record."""
    from gateway.audit.store_sqlite import link_ok  # SQLite only; keeps verify import-light

    after = _start(state) - 1
    try:
        first: int | None = None
        async for link in _log_links(store, chain_id, after):
            first = link[0]
            break
        if first is None:
            return None  # no log for this chain: written before the log existed, or PostgreSQL
        expected_seq, prev = _origin(chain_id, state)
        if first > expected_seq:
            # Records written before the log existed: the log continues the indexed chain.
            below = await store.get(chain_id, first - 1)
            if below is None:
                return BadRecord(chain_id, expected_seq, "missing", "not in the log")
            expected_seq, prev = first, below.hash

        async def links() -> AsyncIterator[Link]:
            async for seq, prv, h, data, _ in _log_links(store, chain_id, after):
                prefix = _prefix(chain_id, seq)
                yield seq, prv, h, link_ok(prefix, prv, data, h)

        log_state = _copy(state)
        for seq in [s for s in log_state.by_seq if s < expected_seq]:
            del log_state.by_seq[seq]  # before the log: the index walk checked them
        bad, _ = await _walk(chain_id, log_state, links(), expected_seq, prev, source="log")
        if bad is not None:
            return bad
        # The index and the log, side by side in seq order.
        index = store.iter_chain(chain_id).__aiter__()
        pending = await anext(index, None)
        while pending is not None and pending.seq < first:
            pending = await anext(index, None)  # older than the log: checked by the index walk
        async for seq, _, h, _, indexed in _log_links(store, chain_id, after):
            if pending is not None and pending.seq < seq:
                return BadRecord(chain_id, pending.seq, "not-in-log", PROBLEMS["not-in-log"])
            if pending is not None and pending.seq == seq:
                if pending.hash != h:
                    return BadRecord(chain_id, seq, "log-differs", PROBLEMS["log-differs"])
                pending = await anext(index, None)
            elif indexed:
                return BadRecord(chain_id, seq, "not-indexed", PROBLEMS["not-indexed"])
        if pending is not None:
            return BadRecord(chain_id, pending.seq, "not-in-log", PROBLEMS["not-in-log"])
    except _BadLogRow as exc:
        return BadRecord(chain_id, 0, "bad-log-row", f"{PROBLEMS['bad-log-row']}: {exc}")
    return None


def _prefix(chain_id: str, seq: int) -> bytes:
    """How a record's canonical bytes begin: [version, chain_id, seq, …]."""
    import orjson

    from gateway.audit.record import CANONICAL_VERSION

    return orjson.dumps([CANONICAL_VERSION, chain_id, seq])[:-1] + b","


def _origin(chain_id: str, state: _ChainCheckpoints) -> tuple[int, str]:
    """Where the chain starts: after the newest retention point, else at genesis."""
    if state.retention is not None:
        return state.retention.seq + 1, state.retention.head_hash
    return 1, genesis_hash(chain_id)


def _copy(state: _ChainCheckpoints) -> _ChainCheckpoints:
    """A walk consumes the checkpoints it meets: each walk gets its own copy."""
    by_seq: dict[int, list[tuple[str, Checkpoint]]] = defaultdict(list)
    for seq, cps in state.by_seq.items():
        by_seq[seq] = list(cps)
    return replace(state, by_seq=by_seq)


async def _walk(  # noqa: PLR0911, PLR0917  # one early return per kind of damage, in order
    chain_id: str,
    state: _ChainCheckpoints,
    links: AsyncIterator[Link],
    expected_seq: int,
    prev: str,
    source: str = "",
) -> tuple[BadRecord | None, int]:
    """Walk one chain's records in seq order; the first problem, and how many records held."""
    records = 0
    prev_prev: str | None = None
    where = f" (in the {source})" if source else ""

    def bad(seq: int, what: str, detail: str | None = None) -> tuple[BadRecord, int]:
        return BadRecord(chain_id, seq, what, (detail or PROBLEMS[what]) + where), records

    async for seq, prev_hash, hash_hex, ok in links:
        if seq < expected_seq:  # below a retention point: should have been deleted
            return bad(seq, "bad-start")
        if seq > expected_seq:
            what = "bad-start" if expected_seq == _start(state) else "missing"
            return bad(expected_seq, what, f"next present seq is {seq}")
        if state.close is not None and seq > state.close.seq:
            return bad(seq, "after-close")
        if prev_hash != prev:
            if prev_prev is not None and prev_hash == prev_prev:
                return bad(seq - 1, "inserted")
            return bad(seq, "bad-start" if seq == _start(state) else "out-of-order")
        if not ok:
            return bad(seq, "edited")
        for cp_source, cp in state.by_seq.pop(seq, []):
            if cp.head_hash != hash_hex:
                return bad(
                    seq, "rewritten", f"{cp_source} checkpoint of {cp.time_us} says {cp.head_hash}"
                )
        records += 1
        prev_prev, prev = prev, hash_hex
        expected_seq = seq + 1
    # Checkpoints left over name records past the end (or below a retention point).
    for seq in sorted(state.by_seq):
        if state.retention is not None and seq <= state.retention.seq:
            continue
        return bad(
            seq, "truncated", f"chain ends at seq {expected_seq - 1}; {PROBLEMS['truncated']}"
        )
    return None, records


def _start(state: _ChainCheckpoints) -> int:
    return 1 if state.retention is None else state.retention.seq + 1
