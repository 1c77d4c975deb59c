"""A sealed record's send transitions: an attempt counted before its request leaves, then the
answer (sent, rejected, expired, or pending with its error and next attempt), one transaction
each, or one per BatchMeterUsage call. Each raises unless the record is pending; a re-issue under
a corrected product code is the one change of a sealed request the trigger lets through.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

from agent.clock import iso
from agent.ledger.database import Database


class Record(Protocol):
    """What tells a sealed record apart (agent.ledger.hours.SealedHour has it)."""

    @property
    def dimension(self) -> str: ...

    @property
    def hour(self) -> int: ...

    @property
    def customer(self) -> str: ...


class Transitions(Database):
    """The send columns of the `hours` table, changed one named transition at a time."""

    def begin_attempt(self, dimension: str, hour: int, now: float, customer: str = "") -> None:
        """Count a request as leaving, before MeterUsage is called.

        Why before: a send child killed mid-request (stop, the send timeout) never records an
        answer, yet the service may have recorded the request. Counted first, that hour has
        more attempts than refusals and is never re-issued under another product code and
        ClientToken (a second bill); it is resent identically. Until an answer is recorded,
        last_error says none was.
        """
        with self.transaction() as db:
            self._update_pending(db, dimension, hour, customer,
                                 "attempts = attempts + 1, last_error = ?",
                                 f"no answer recorded for the request sent at {iso(now)}",
                                 )  # fmt: skip

    def begin_attempts(self, records: Sequence[Record], now: float) -> None:
        """begin_attempt for every record of one BatchMeterUsage call, in one transaction (a
        call of 25 records is one commit, not 25)."""
        with self.transaction() as db:
            for h in records:
                self._update_pending(db, h.dimension, h.hour, h.customer,
                                     "attempts = attempts + 1, last_error = ?",
                                     f"no answer recorded for the request sent at {iso(now)}",
                                     )  # fmt: skip

    def settle_records(
        self,
        now: float,
        sent: Sequence[tuple[Record, str | None]] = (),
        rejected: Sequence[tuple[Record, str]] = (),
        retry: Sequence[tuple[Record, str, float]] = (),
    ) -> None:
        """One BatchMeterUsage answer's per-record outcomes, in one transaction: `sent` with
        their MeteringRecordId, `rejected` with their error, `retry` pending with their error
        and next attempt (as mark_sent, reject and schedule_retry do one at a time)."""
        with self.transaction() as db:
            for h, record_id in sent:
                self._update_pending(db, h.dimension, h.hour, h.customer,
                                     "state = 'sent', record_id = ?, last_error = NULL, "
                                     "done_at = ?", record_id, now)  # fmt: skip
            for h, error in rejected:
                self._update_pending(db, h.dimension, h.hour, h.customer,
                                     "state = 'rejected', record_id = NULL, last_error = ?, "
                                     "done_at = ?", error, now)  # fmt: skip
            for h, error, at in retry:
                self._update_pending(db, h.dimension, h.hour, h.customer,
                                     "last_error = ?, next_attempt = ?", error, at)  # fmt: skip

    def _update_pending(
        self, db: sqlite3.Connection, dimension: str, hour: int, customer: str, sets: str,
        *args: Any,
    ) -> None:  # fmt: skip
        """UPDATE one pending record's send columns; raise if not pending (nothing changed)."""
        cur = db.execute(
            f"UPDATE hours SET {sets} "
            "WHERE customer = ? AND dimension = ? AND hour = ? AND state = 'pending'",
            (*args, customer, dimension, hour),
        )
        if cur.rowcount != 1:
            whose = f" customer {customer}" if customer else ""
            raise RuntimeError(f"hour {iso(hour)} dimension {dimension}{whose} is not pending")

    def _settle_hour(self, state: str, dimension: str, hour: int, now: float,
                     error: str | None, record_id: str | None = None, customer: str = "",
                     ) -> None:  # fmt: skip
        with self.transaction() as db:
            self._update_pending(db, dimension, hour, customer,
                                 "state = ?, record_id = ?, last_error = ?, done_at = ?",
                                 state, record_id, error, now)  # fmt: skip

    def mark_sent(
        self, dimension: str, hour: int, *, record_id: str | None, now: float, customer: str = ""
    ) -> None:
        """The service recorded the hour (its MeteringRecordId): sent, for good."""
        self._settle_hour("sent", dimension, hour, now, None, record_id, customer)

    def expire(
        self, dimension: str, hour: int, *, error: str, now: float, customer: str = ""
    ) -> None:
        """The hour is past the service's window: expired, unsent; `error` says why."""
        self._settle_hour("expired", dimension, hour, now, error, None, customer)

    def reject(
        self, dimension: str, hour: int, *, error: str | None, now: float, customer: str = ""
    ) -> None:
        """The service refused the hour for good (a final error)."""
        self._settle_hour("rejected", dimension, hour, now, error, None, customer)

    def schedule_retry(
        self,
        dimension: str,
        hour: int,
        *,
        error: str | None,
        next_attempt: float,
        customer: str = "",
    ) -> None:
        """The hour stays pending with its last error, next tried at `next_attempt`. An answer
        refusing its product code counts a refusal (see reissue)."""
        with self.transaction() as db:
            self._update_pending(
                db, dimension, hour, customer, "last_error = ?, next_attempt = ?, refusals = "
                "refusals + (COALESCE(?, '') LIKE 'InvalidProductCodeException%')", error,
                next_attempt, error,
            )  # fmt: skip

    # The seller's config (product code, dimension) was refused: held pending, retried alike.
    hold = schedule_retry

    def reissue(
        self, dimension: str, hour: int, *, product_code: str, client_token: str, now: float
    ) -> bool:
        """Give a held hour the current product code and a new ClientToken, keeping the old ones.

        Only for an hour the service never accepted: pending, and every request that left refused
        for its product code, or none left (the trigger enforces both); False when it does not
        qualify.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT product_code, client_token, reissued_from, last_error FROM hours "
                "WHERE customer = '' AND dimension = ? AND hour = ? AND state = 'pending'",
                (dimension, hour),
            ).fetchone()
            if row is None:
                return False
            history = json.loads(row[2] or "[]")
            history.append(
                {"product_code": row[0], "client_token": row[1], "at": now, "error": row[3]}
            )
            try:
                db.execute(
                    "UPDATE hours SET product_code = ?, client_token = ?, reissues = reissues + 1, "
                    "reissued_from = ?, attempts = 0, refusals = 0, last_error = NULL, "
                    "next_attempt = ? "
                    "WHERE customer = '' AND dimension = ? AND hour = ? AND state = 'pending'",
                    (product_code, client_token, json.dumps(history), now, dimension, hour),
                )
            except sqlite3.IntegrityError:
                return False
        return True
