"""The local append-only spool: sealed records (chain fields computed) as JSON lines, fsynced per
batch, used while the store is unreachable and drained into it in order when it returns.

Each writer holds an exclusive flock on its own file; a file nobody holds is an orphan of a
writer that died, and the next writer drains it. Must not import gateway.settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import orjson

from gateway.audit.record import AuditRecord, record_from_dict

SUFFIX: Final = ".spool.jsonl"


def spool_path(directory: Path, chain_id: str) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9._-]", "_", chain_id) + SUFFIX)


class Spool:
    """One chain's spool file. Blocking I/O: call from a thread (asyncio.to_thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.size = 0

    def open(self, *, block: bool = True) -> bool:
        """Open (create) and lock the file; False when another live writer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self.size = os.fstat(fd).st_size
        return True

    @property
    def empty(self) -> bool:
        return self.size == 0

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Write the records and fsync: once this returns they survive a crash."""
        if self._fd is None:
            raise OSError("spool not open")
        data = b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self.size += len(data)

    def read(self, batch: int) -> Iterator[list[AuditRecord]]:
        """The spooled records in order, `batch` at a time. A torn last line (a crash mid-write,
        before its fsync returned) is skipped: it was never acknowledged."""
        out: list[AuditRecord] = []
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                out.append(record_from_dict(orjson.loads(line)))
                if len(out) >= batch:
                    yield out
                    out = []
        if out:
            yield out

    def clear(self) -> None:
        """Everything was drained: empty the file (fsync so a crash cannot resurrect it)."""
        if self._fd is None:
            raise OSError("spool not open")
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.size = 0

    def close(self, *, remove_if_empty: bool = True) -> None:
        if self._fd is None:
            return
        if remove_if_empty and self.size == 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)  # releases the flock
        self._fd = None


def orphans(directory: Path, own: Path | None) -> list[Path]:
    """Spool files in `directory` other than `own` (candidates; locking tells live from dead)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*" + SUFFIX) if p != own)
