"""What the ledger knows of each dimension besides its samples: the collector's last value and
errors, late samples dropped, an hour that cannot be sealed, and usage a collector found unread
(`Reading.unread`, one row per event, stored with the reading that found it: samples.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.ledger.database import Database


@dataclass(frozen=True)
class DimensionStatus:
    dimension: str
    last_t: float | None
    last_value: str | None
    last_error: str | None
    error_t: float | None
    errors: int
    dropped: int


@dataclass(frozen=True)
class UnreadUsage:
    """A dimension's usage found lost for good (`Reading.unread`), over the events asked for:
    how many, the amount known lost (an event of unknown amount adds 0), and the newest one."""

    dimension: str
    events: int
    amount: int
    t: float  # the newest event's reading instant
    what: str
    fix: str


class Dimensions(Database):
    """Per dimension: its collector's errors, an hour it cannot seal, and usage found unread."""

    def record_seal_error(self, dimension: str, hour: int, error: str) -> bool:
        """Note that `dimension`'s hour could not be sealed; True if this error is new."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT seal_error, seal_error_hour FROM dimension_status WHERE dimension = ?",
                (dimension,),
            ).fetchone()
            db.execute(
                "INSERT INTO dimension_status (dimension, seal_error, seal_error_hour) "
                "VALUES (?, ?, ?) ON CONFLICT (dimension) DO UPDATE SET "
                "seal_error = excluded.seal_error, seal_error_hour = excluded.seal_error_hour",
                (dimension, error, hour),
            )
        return row is None or (row[0], row[1]) != (error, hour)

    def clear_seal_error(self, dimension: str) -> bool:
        """Forget a dimension's sealing error (its hours seal again); True if there was one."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE dimension_status SET seal_error = NULL, seal_error_hour = NULL "
                "WHERE dimension = ? AND seal_error IS NOT NULL",
                (dimension,),
            )
            return cur.rowcount > 0

    def seal_errors(self) -> list[tuple[str, int, str]]:
        """(dimension, hour, error) for every dimension with an hour that cannot be sealed."""
        with self._lock:
            try:
                rows = self.db.execute(
                    "SELECT dimension, seal_error_hour, seal_error FROM dimension_status "
                    "WHERE seal_error IS NOT NULL ORDER BY seal_error_hour, dimension"
                ).fetchall()
            except sqlite3.OperationalError:  # read-only look at a ledger not yet migrated
                return []
        return [(str(d), int(h), str(e)) for d, h, e in rows]

    def record_collector_error(self, dimension: str, t: float, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO dimension_status (dimension, last_error, error_t, errors) "
                "VALUES (?, ?, ?, 1) ON CONFLICT (dimension) DO UPDATE SET "
                "last_error = excluded.last_error, error_t = excluded.error_t, "
                "errors = errors + 1",
                (dimension, error, t),
            )

    def dimension_status(self) -> list[DimensionStatus]:
        with self._lock:
            rows = self.db.execute(
                "SELECT dimension, last_t, last_value, last_error, error_t, errors, dropped "
                "FROM dimension_status ORDER BY dimension"
            ).fetchall()
        return [DimensionStatus(*row) for row in rows]

    def unread_usage(self, since: float | None = None) -> list[UnreadUsage]:
        """Per dimension, its usage found unread after `since` (health: the last 24 h), else all
        that is kept (status); the dimension with the newest event first, then by name."""
        where, args = ("WHERE t > ?", [since]) if since is not None else ("", [])
        with self._lock:
            try:
                rows = self.db.execute(
                    "SELECT dimension, n, amount, t, what, fix FROM (SELECT dimension, t, what, "
                    "fix, COUNT(*) OVER (PARTITION BY dimension) AS n, "
                    "SUM(amount) OVER (PARTITION BY dimension) AS amount, "
                    "ROW_NUMBER() OVER (PARTITION BY dimension ORDER BY t DESC, id DESC) AS newest "
                    f"FROM unread {where}) WHERE newest = 1 ORDER BY t DESC, dimension",
                    args,
                ).fetchall()
            except sqlite3.OperationalError:  # read-only look at a ledger not yet migrated
                return []
        return [UnreadUsage(str(d), int(n), int(a), float(t), w, f) for d, n, a, t, w, f in rows]
