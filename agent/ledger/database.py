"""The ledger's connection: one SQLite file in state_dir, its transactions and its meta table.

Durability rules the ledger enforces:
- a sample and the collector position that produced it commit in one transaction;
- a sealed hour's request fields (quantity, Timestamp, ClientToken, ...) never change: a trigger
  aborts any UPDATE of them, so every retry after any restart sends the identical request;
- WAL mode, so `status` can read while the daemon writes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.db"


class Database:
    """One SQLite connection in `state_dir`, thread-safe through one lock around it; the meta table.

    The base of every part of the Ledger (samples.py, hours.py, ...): each part stores one kind of
    thing through this connection, and `agent.ledger.Ledger` puts them together.
    """

    path: Path
    readonly: bool
    db: sqlite3.Connection
    _lock: threading.RLock

    def close(self) -> None:
        self.db.close()

    def schema_version(self) -> int:
        """The schema this ledger file is at (a read-only open never migrates it)."""
        with self._lock:
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: writers (sampler, sealer, sender) are serialised."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None or row[0] is None else json.loads(row[0])

    def set_meta(self, db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def note_storage_works(self, now: float) -> None:
        """A small write; the first that succeeds ends a storage state."""
        self.update_meta(storage_checked=now)

    def update_meta(self, **values: Any) -> None:
        with self.transaction() as db:
            for key, value in values.items():
                self.set_meta(db, key, value)
