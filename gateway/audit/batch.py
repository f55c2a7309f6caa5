"""A flush's sealed records as the writer makes them: canonical bytes and raw hashes, one chain.

What the SQLite log stores (one row per batch) and what both stores turn into indexed rows.
Pure (hashlib, orjson); must not import gateway.settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.audit.record import EVENT_FIELDS, AuditRecord, canonical, event_from_values

_JSON_AT: Final = frozenset(i for i, f in enumerate(EVENT_FIELDS) if f in ("groups", "reasons"))
_DETAIL_AT: Final = EVENT_FIELDS.index("detail")
HASH_BYTES: Final = 32
# Canonical bytes never contain a raw newline (orjson escapes it inside strings, and writes no
# whitespace): the log stores a batch's records joined by it.
SEP: Final = b"\n"


@dataclass(frozen=True, slots=True)
class SealedBatch:
    """Consecutive records of one chain: seq first_seq … first_seq + len - 1."""

    chain_id: str
    first_seq: int
    prev_hash: str  # hex hash before the first record (genesis or the previous batch's head)
    canon: Sequence[bytes]  # each record's canonical bytes
    digests: Sequence[bytes]  # each record's raw sha256(prev || canonical)

    def __len__(self) -> int:
        return len(self.canon)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.canon) - 1

    @property
    def head(self) -> str:
        return self.digests[-1].hex()

    def links(self) -> Iterator[tuple[int, str, str, bytes]]:
        """(seq, prev_hash, hash, canonical bytes) of each record, in order."""
        prev = self.prev_hash
        for i, (c, d) in enumerate(zip(self.canon, self.digests, strict=True)):
            h = d.hex()
            yield self.first_seq + i, prev, h, c
            prev = h

    def rows(self) -> list[tuple[Any, ...]]:
        """The records as audit_records rows (store.COLUMNS order), decoded from their bytes."""
        loads, dumps = orjson.loads, orjson.dumps
        out = []
        for seq, prev, h, c in self.links():
            values = loads(c)
            event = values[3:]
            for i in _JSON_AT:
                event[i] = dumps(event[i]).decode()
            event[_DETAIL_AT] = dumps(event[_DETAIL_AT], option=orjson.OPT_SORT_KEYS).decode()
            out.append((values[1], seq, prev, h, *event))
        return out

    def records(self) -> list[AuditRecord]:
        """The records as AuditRecords (the spool's and the writer's slow paths)."""
        return [record_from_canonical(c, prev, h) for _, prev, h, c in self.links()]


def record_from_canonical(data: bytes, prev_hash: str, hash_hex: str) -> AuditRecord:
    """Rebuild the AuditRecord whose canonical bytes are `data`."""
    values = orjson.loads(data)
    event = event_from_values(dict(zip(EVENT_FIELDS, values[3:], strict=True)))
    return AuditRecord(
        event=event, chain_id=values[1], seq=int(values[2]), prev_hash=prev_hash, hash=hash_hex
    )


def batches_of(records: Sequence[AuditRecord]) -> list[SealedBatch]:
    """Records (in chain order, possibly several chains) as batches of consecutive records; the
    records' own hashes are kept as given (verify checks them)."""
    out: list[SealedBatch] = []
    cur: list[AuditRecord] = []

    def close() -> None:
        if cur:
            out.append(
                SealedBatch(
                    cur[0].chain_id,
                    cur[0].seq,
                    cur[0].prev_hash,
                    [canonical(r.chain_id, r.seq, r.event) for r in cur],
                    [bytes.fromhex(r.hash) for r in cur],
                )
            )

    for r in records:
        last = cur[-1] if cur else None
        if last is not None and (
            r.chain_id != last.chain_id or r.seq != last.seq + 1 or r.prev_hash != last.hash
        ):
            close()
            cur = []
        cur.append(r)
    close()
    return out


def link_hash(prev_hash: str, data: bytes) -> str:
    """sha256(prev_hash bytes || canonical bytes), hex: what a record's hash must be."""
    h = hashlib.sha256(bytes.fromhex(prev_hash))
    h.update(data)
    return h.hexdigest()
