"""The ledger's local spool: every row recorded is appended to a file in the data dir before it waits in memory
for the next flush, so a process killed (SIGKILL, OOM) or stopped while the store is down loses no usage row it
metered: the next process on the same data dir writes them.

A process appends to its own segment file, held under an exclusive `flock` for its life (the kernel drops the
lock when the process dies, however it dies). A flush first `seal`s the segment (later rows go to a new one) and,
once its write succeeded, `release`s every sealed segment: their rows are in the store. At start, `recover` reads
the segments no live process holds, hands their rows back to be recorded again, and removes them. A row written
before the kill and recovered is written once: the request id is the ledger's primary key, and the ledger skips a
repeat. `os.write` puts the bytes in the kernel at once, so a killed process loses none; a power cut can lose the
last unsynced moments, as it can for any file.

    >>> spool = Spool(data_dir / "spool" / "ledger")
    >>> spool.append({"request_id": "req_1"}); mark = spool.seal()  # then write the rows taken, and once written:
    >>> spool.release(mark)
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("keel.ledger")


class Spool:
    """Append-only segment files of one process; see the module's docstring."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder = folder
        self._sealed: list[tuple[int, Path, int]] = []  # (sequence, path, fd), oldest first
        self._seq = 0
        self._open()

    def _open(self) -> None:
        self._seq += 1
        self.path = self.folder / f"{os.getpid()}-{time.time_ns()}-{self._seq}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._rows = 0

    def append(self, row: dict[str, Any]) -> None:
        os.write(self._fd, orjson.dumps(row, default=str, option=orjson.OPT_APPEND_NEWLINE))
        self._rows += 1

    def seal(self) -> int:
        """Start a new segment for later rows; returns the mark `release` takes once the rows so far are written."""
        if self._rows:
            self._sealed.append((self._seq, self.path, self._fd))
            self._open()
        return self._seq - 1

    def release(self, mark: int) -> None:
        """Remove the segments sealed up to `mark`: every row in them is in the store."""
        while self._sealed and self._sealed[0][0] <= mark:
            _, path, fd = self._sealed.pop(0)
            path.unlink(missing_ok=True)
            os.close(fd)

    def recover(self) -> Iterator[list[dict[str, Any]]]:
        """The rows of each segment no live process holds, one segment at a time; a segment is removed once the
        caller asks for the next (by then it has recorded them again, into this process's own segment)."""
        own = {self.path, *(p for _, p, _ in self._sealed)}
        for path in sorted(self.folder.glob("*.jsonl")):
            if path in own:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's segment
                rows = list(_rows(path))
                if rows:
                    log.warning("recovering ledger rows a stopped process had not written",
                                extra={"rows": len(rows), "segment": path.name})
                    yield rows
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def close(self) -> None:
        """At a clean stop: drop this process's segment if it holds nothing unwritten (`seal`/`release` saw to the
        rest); a segment with rows stays for the next process."""
        if not self._rows and not self._sealed:
            self.path.unlink(missing_ok=True)
        for _, _, fd in self._sealed:
            os.close(fd)
        os.close(self._fd)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:  # a line cut short by the kill: its row was never recorded whole
                log.warning("skipped a torn ledger spool line", extra={"segment": path.name, "line": n})
                continue
            if isinstance(row.get("ts"), str):
                row["ts"] = datetime.fromisoformat(row["ts"])
            yield row
