"""Walk every chain and every signed checkpoint; name the first record that does not hold.

Streams each chain in seq order keeping only the last two hashes. Must not import settings.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
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


async def verify(  # noqa: PLR0911, PLR0912  # one walk, one early return per kind of damage, in order
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
    for done, chain_id in enumerate(chain_ids):
        state = per_chain.get(chain_id) or _ChainCheckpoints()
        if state.retention is not None:
            expected_seq, prev = state.retention.seq + 1, state.retention.head_hash
        else:
            expected_seq, prev = 1, genesis_hash(chain_id)
        prev_prev: str | None = None
        async for rec in store.iter_chain(chain_id):
            if rec.seq < expected_seq:  # below a retention point: should have been deleted
                return report(
                    BadRecord(chain_id, rec.seq, "bad-start", PROBLEMS["bad-start"]), done
                )
            if rec.seq > expected_seq:
                what = "bad-start" if expected_seq == _start(state) else "missing"
                return report(
                    BadRecord(chain_id, expected_seq, what, f"next present seq is {rec.seq}"),
                    done,
                )
            if state.close is not None and rec.seq > state.close.seq:
                return report(
                    BadRecord(chain_id, rec.seq, "after-close", PROBLEMS["after-close"]), done
                )
            if rec.prev_hash != prev:
                if prev_prev is not None and rec.prev_hash == prev_prev:
                    return report(
                        BadRecord(chain_id, rec.seq - 1, "inserted", PROBLEMS["inserted"]), done
                    )
                what = "bad-start" if rec.seq == _start(state) else "out-of-order"
                return report(BadRecord(chain_id, rec.seq, what, PROBLEMS[what]), done)
            if rec.computed_hash() != rec.hash:
                return report(BadRecord(chain_id, rec.seq, "edited", PROBLEMS["edited"]), done)
            for source, cp in state.by_seq.pop(rec.seq, []):
                if cp.head_hash != rec.hash:
                    return report(
                        BadRecord(
                            chain_id,
                            rec.seq,
                            "rewritten",
                            f"{source} checkpoint of {cp.time_us} says {cp.head_hash}",
                        ),
                        done,
                    )
            records += 1
            prev_prev, prev = prev, rec.hash
            expected_seq = rec.seq + 1
        # Checkpoints left over name records past the end (or below a retention point).
        for seq in sorted(state.by_seq):
            if state.retention is not None and seq <= state.retention.seq:
                continue
            return report(
                BadRecord(
                    chain_id,
                    seq,
                    "truncated",
                    f"chain ends at seq {expected_seq - 1}; {PROBLEMS['truncated']}",
                ),
                done,
            )
    return report(None, len(chain_ids))


def _start(state: _ChainCheckpoints) -> int:
    return 1 if state.retention is None else state.retention.seq + 1
