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
    """Consecutive records of one chain: seq first_seq … first_seq + count - 1, kept as the log
    stores them: their canonical bytes joined by SEP, and their raw hashes end to end (one
    buffer each, not an object per record: measured, keeping ~20,000 small bytes objects alive
    per flush cost more than encoding them)."""

    chain_id: str
    first_seq: int
    prev_hash: str  # hex hash before the first record (genesis or the previous batch's head)
    body: bytes  # canonical bytes of each record, joined by SEP
    hashes: bytes  # each record's raw sha256(prev || canonical), HASH_BYTES each
    count: int

    @classmethod
    def of(
        cls,
        chain_id: str,
        first_seq: int,
        prev_hash: str,
        canon: Sequence[bytes],
        digests: Sequence[bytes],
    ) -> SealedBatch:
        """A batch from per-record bytes and raw hashes."""
        if len(canon) != len(digests) or any(len(d) != HASH_BYTES for d in digests):
            raise ValueError("a sealed batch needs one 32-byte hash per record")
        return cls(chain_id, first_seq, prev_hash, SEP.join(canon), b"".join(digests), len(canon))

    def __len__(self) -> int:
        return self.count

    @property
    def canon(self) -> list[bytes]:
        return self.body.split(SEP) if self.count else []

    @property
    def digests(self) -> list[bytes]:
        h = self.hashes
        return [h[i : i + HASH_BYTES] for i in range(0, len(h), HASH_BYTES)]

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1

    @property
    def head(self) -> str:
        return self.hashes[-HASH_BYTES:].hex()

    def tail(self, skip: int) -> SealedBatch | None:
        """The batch without its first `skip` records (None when nothing is left)."""
        if skip <= 0:
            return self
        if skip >= self.count:
            return None
        canon, digests = self.canon, self.digests
        return SealedBatch.of(
            self.chain_id,
            self.first_seq + skip,
            digests[skip - 1].hex(),
            canon[skip:],
            digests[skip:],
        )

    def links(self) -> Iterator[tuple[int, str, str, bytes]]:
        """(seq, prev_hash, hash, canonical bytes) of each record, in order."""
        prev = self.prev_hash
        canon, digests = self.canon, self.digests
        if len(canon) != len(digests):
            raise ValueError("audit log row: hashes and records do not pair up")
        for i, (c, d) in enumerate(zip(canon, digests, strict=True)):
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
                SealedBatch.of(
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
