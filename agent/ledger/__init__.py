"""The ledger: the only SQLite user. Each module stores one kind of thing through one connection
(database.py) and `Ledger` puts them together:

- samples.py: unsealed usage (samples, collector positions, usage held for an unknown customer)
- dimensions.py: per dimension, collector errors, seal errors and usage found unread
- hours.py: sealed records, and which are pending
- transitions.py: a sealed record's send transitions
- send_state.py: the send state machine
- customers.py: SaaS mode's customers
- migrations.py: the schema, one `user_version` step at a time
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from agent.host.ownership import adopt
from agent.ledger.customers import Customers
from agent.ledger.database import LEDGER_FILE, Database
from agent.ledger.dimensions import Dimensions
from agent.ledger.hours import Hours
from agent.ledger.migrations import migrate
from agent.ledger.samples import Samples
from agent.ledger.send_state import SendStates
from agent.ledger.transitions import Transitions


class Ledger(Samples, Dimensions, Hours, Transitions, SendStates, Customers, Database):
    """One SQLite database in `state_dir`; thread-safe through one lock around one connection."""

    def __init__(self, state_dir: Path, readonly: bool = False) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                self._create()
            self.db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a transaction that returned is on disk, even across power loss.
            self.db.execute("PRAGMA synchronous=FULL")
            migrate(self)
            adopt(Path(state_dir), *(Path(f"{self.path}{x}") for x in ("", "-wal", "-shm")))
        self.db.execute("PRAGMA busy_timeout=30000")

    def _create(self) -> None:
        """A new ledger appears whole: built and migrated under a temporary name, then linked into
        place (another process that made one first wins). No reader ever sees a ledger file that
        exists but has no schema yet."""
        tmp = self.path.with_name(f".{LEDGER_FILE}.{os.getpid()}.{threading.get_ident()}.new")
        tmp.unlink(missing_ok=True)
        self.db = sqlite3.connect(tmp, isolation_level=None, timeout=30)
        try:
            self.db.execute("PRAGMA synchronous=FULL")
            migrate(self)
        finally:
            self.db.close()
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
