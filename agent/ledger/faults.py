"""The agent's own storage failing: which of three states an error means, and the ledger files that
must never be opened as if they were a ledger.

- `disk full`: SQLite's SQLITE_FULL, or ENOSPC / EDQUOT from the file system;
- `ledger damaged`: SQLITE_CORRUPT or SQLITE_NOTADB (a page that is not what SQLite wrote), a
  0-byte ledger file, or a ledger whose `-wal` was deleted while its `-shm` still counts frames
  in it (the last transactions are gone);
- `state dir gone`: the ledger's file (or its directory) no longer exists, or SQLITE_CANTOPEN.

A ledger file that exists but is empty or unreadable is never replaced by a new one silently: a
writable open raises LedgerDamaged, one line naming the file and `metering-agent reset-ledger
--yes`, which moves it aside on purpose.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
import time
from pathlib import Path

from agent.errors import AgentError

DISK_FULL = "disk full"
DAMAGED = "ledger damaged"
GONE = "state dir gone"

# SQLite's primary result codes (the low byte of sqlite_errorcode)
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

RESET = "metering-agent reset-ledger --yes"


class LedgerDamaged(AgentError):
    """A ledger file that exists but cannot be used: `run` exits 1 with this line."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        super().__init__(
            f"{path}: the ledger is damaged ({what}); it is not replaced silently: stop the agent, "
            f"keep a copy if you want to salvage it, then `{RESET}` moves it aside and the next "
            "`run` starts a new one"
        )


def damaged_name(path: Path, now: float) -> Path:
    """Where a damaged ledger is kept: `ledger.db.damaged-<UTC time>` beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return path.with_name(f"{path.name}.damaged-{stamp}")


def kind_of(error: BaseException) -> str | None:
    """Which storage state `error` means (DISK_FULL, DAMAGED, GONE), or None for anything else."""
    if isinstance(error, LedgerDamaged):
        return DAMAGED
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary == _SQLITE_FULL:
            return DISK_FULL
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return DAMAGED
        if primary == _SQLITE_CANTOPEN:
            return GONE
        return None
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL
        if error.errno == errno.ENOENT:
            return GONE
    return None


def refuse_damaged(path: Path) -> None:
    """Before a writable open: raise LedgerDamaged for a ledger file SQLite would silently take for
    a new, empty database (0 bytes), or whose committed transactions were in a `-wal` that is gone
    (the `-shm` left by a kill -9 still counts its frames). No file at all is a new ledger: fine."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        raise LedgerDamaged(path, "the file is empty (0 bytes)")
    frames = _wal_frames(Path(f"{path}-shm"))
    if frames and not Path(f"{path}-wal").exists():
        raise LedgerDamaged(
            path,
            f"its write-ahead log {path.name}-wal is gone while {path.name}-shm still counts "
            f"{frames} frame(s) in it: the newest transactions are lost",
        )


def _wal_frames(shm: Path) -> int:
    """The frames the WAL index says the write-ahead log holds (mxFrame: a 32-bit native integer
    at byte 16 of the index header, SQLite's wal.c), 0 when there is no readable index."""
    try:
        with open(shm, "rb") as f:
            header = f.read(48)
    except OSError:
        return 0
    if len(header) < 48:
        return 0
    (frames,) = struct.unpack_from("=I", header, 16)
    return int(frames)


def same_file(path: Path, inode: tuple[int, int] | None) -> bool:
    """Whether `path` is still the file opened as (device, inode); False once it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return inode is None or (st.st_dev, st.st_ino) == inode
