"""SaaS mode's subscription states, as AWS Marketplace's notifications (SNS -> SQS) told them.

A row per buyer (its `customer-aws-account-id`, else its legacy `customer-identifier`), kept apart
from `customers`: a notification may come before the buyer's registration, and applies to the
customer once one has those ids. Applying is idempotent and ordered by the notification's own
time, so a duplicate or a late redelivery of an older message changes nothing. An unsubscribe
leaves `flush_due` set until the daemon has sealed that buyer's open usage (it clears it in the
sealing transaction), so a crash between the two loses nothing.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from agent.ledger.database import Database

SUBSCRIBED = "subscribed"
FAILED = "subscribe-failed"
PENDING = "unsubscribe-pending"
UNSUBSCRIBED = "unsubscribed"
LEAVING = (PENDING, UNSUBSCRIBED)  # usage after the flush is held, not sent; no idle zeros

_COLUMNS = (
    "buyer, account_id, customer_identifier, state, event_at, applied_at, offer, free_trial, "
    "message_id, flush_due, flushed_at"
)


def _matched(columns: str, where: str = "1") -> str:
    """`SELECT columns` over each (customer `c`, subscription `s`) of the same buyer: by account
    id, or else by the legacy customer identifier. Two indexed joins, not one join with OR
    (which SQLite runs as a scan of both tables: minutes at 100,000 customers)."""
    return (
        f"SELECT {columns} FROM subscriptions s JOIN customers c ON c.account_id = s.account_id "
        f"WHERE s.account_id IS NOT NULL AND ({where}) UNION "
        f"SELECT {columns} FROM subscriptions s JOIN customers c "
        "ON c.customer_identifier = s.customer_identifier "
        f"WHERE s.customer_identifier IS NOT NULL AND ({where})"
    )


@dataclass(frozen=True)
class Subscription:
    buyer: str
    account_id: str | None
    customer_identifier: str | None
    state: str
    event_at: float
    applied_at: float
    offer: str | None
    free_trial: bool | None
    message_id: str | None
    flush_due: float | None
    flushed_at: float | None


def _subscription(row: tuple[Any, ...]) -> Subscription:
    b, a, ci, state, ev, ap, offer, trial, mid, due, done = row
    return Subscription(
        str(b), a if a is None else str(a), ci if ci is None else str(ci), str(state),
        float(ev), float(ap), offer if offer is None else str(offer),
        None if trial is None else bool(trial), mid if mid is None else str(mid),
        None if due is None else float(due), None if done is None else float(done),
    )  # fmt: skip


class Subscriptions(Database):
    """The `subscriptions` table (see the module docstring)."""

    def apply_subscription(
        self,
        *,
        account_id: str | None,
        customer_identifier: str | None,
        state: str,
        event_at: float,
        now: float,
        offer: str | None = None,
        free_trial: bool | None = None,
        message_id: str | None = None,
    ) -> str:
        """Record what a notification said, in one transaction: 'applied', 'duplicate' (the same
        state at the same time: changes nothing) or 'stale' (the buyer's row holds a later
        notification: changes nothing). An unsubscribe (pending, or success without a pending
        first) makes the buyer's open usage due to be sealed and sent (`flush_due`)."""
        buyer = account_id or customer_identifier
        if not buyer:
            raise ValueError("a notification names no buyer")
        with self.transaction() as db:
            # the buyer's row, whichever of its ids an earlier notification was keyed by (one
            # with the account id and one without must not make two rows for one buyer)
            row = db.execute(
                f"SELECT {_COLUMNS} FROM subscriptions WHERE buyer = ? OR buyer = ? "
                "OR account_id = ? OR customer_identifier = ? ORDER BY event_at DESC LIMIT 1",
                (buyer, customer_identifier, account_id, customer_identifier),
            ).fetchone()
            old = None if row is None else _subscription(row)
            buyer = buyer if old is None else old.buyer
            if old is not None:
                if old.event_at > event_at:
                    return "stale"
                if old.event_at == event_at and old.state == state:
                    return "duplicate"
            due = None if old is None else old.flush_due
            if state in LEAVING and (old is None or old.state not in LEAVING):
                due = now  # its open usage: sealed and sent at once (AWS allows an hour)
            elif state not in LEAVING:
                due = None
            db.execute(
                f"INSERT INTO subscriptions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (buyer) DO UPDATE SET "
                "account_id = COALESCE(excluded.account_id, account_id), "
                "customer_identifier = COALESCE(excluded.customer_identifier, "
                "customer_identifier), state = excluded.state, event_at = excluded.event_at, "
                "applied_at = excluded.applied_at, offer = excluded.offer, "
                "free_trial = excluded.free_trial, message_id = excluded.message_id, "
                "flush_due = excluded.flush_due",
                (buyer, account_id, customer_identifier, state, event_at, now, offer,
                 None if free_trial is None else int(free_trial), message_id, due,
                 None if old is None else old.flushed_at),
            )  # fmt: skip
        return "applied"

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            try:
                rows = self.db.execute(
                    f"SELECT {_COLUMNS} FROM subscriptions ORDER BY buyer"
                ).fetchall()
            except sqlite3.OperationalError:  # read-only look at a ledger not yet migrated
                return []
        return [_subscription(r) for r in rows]

    def subscription_states(self) -> dict[str, Subscription]:
        """Each customer label's subscription, where a notification named its buyer."""
        cols = ", ".join(f"s.{c.strip()}" for c in _COLUMNS.split(","))
        with self._lock:
            try:
                rows = self.db.execute(
                    f"SELECT * FROM ({_matched(f'c.label, {cols}')}) ORDER BY event_at"
                ).fetchall()
            except sqlite3.OperationalError:
                return {}
        return {str(r[0]): _subscription(r[1:]) for r in rows}

    def leaving_labels(self, db: sqlite3.Connection) -> set[str]:
        """Labels whose buyer is unsubscribing or gone and whose open usage the flush has
        sealed: their usage from then on is held, not sent, and they get no idle zeros. A buyer
        whose flush has not run (or failed) is billed as before, so nothing it used before the
        unsubscribe is held."""
        states = ",".join(f"'{state}'" for state in LEAVING)
        rows = db.execute(
            _matched("c.label", f"s.state IN ({states}) AND s.flush_due IS NULL")
        ).fetchall()
        return {str(r[0]) for r in rows}

    def flushes_due(self, db: sqlite3.Connection | None = None) -> list[tuple[str, list[str]]]:
        """Buyers whose open usage is due to be sealed now, each with its customer labels."""
        with self._lock:
            conn = db or self.db
            try:
                buyers = conn.execute(
                    "SELECT buyer FROM subscriptions WHERE flush_due IS NOT NULL ORDER BY flush_due"
                ).fetchall()
            except sqlite3.OperationalError:
                return []
            out = []
            for (buyer,) in buyers:
                labels = conn.execute(_matched("c.label", "s.buyer = ?"), (buyer, buyer))
                out.append((str(buyer), sorted(str(r[0]) for r in labels.fetchall())))
        return out

    @staticmethod
    def mark_early(db: sqlite3.Connection, customer: str, dimension: str, hour: int) -> None:
        """The record just sealed at the customer's unsubscribe, before its hour as a whole."""
        db.execute(
            "UPDATE hours SET early = 1 WHERE customer = ? AND dimension = ? AND hour = ?",
            (customer, dimension, hour),
        )

    def flush_done(self, db: sqlite3.Connection, buyer: str, now: float) -> None:
        """In the transaction that sealed the buyer's open usage."""
        db.execute(
            "UPDATE subscriptions SET flush_due = NULL, flushed_at = ? WHERE buyer = ?",
            (now, buyer),
        )

    def flushed_labels(self, db: sqlite3.Connection) -> set[str]:
        """Labels whose open usage an unsubscribe sealed early at some time: the only ones that
        may already have a record for an hour that is not yet sealed."""
        rows = db.execute(_matched("c.label", "s.flushed_at IS NOT NULL")).fetchall()
        return {str(r[0]) for r in rows}

    @staticmethod
    def has_record(db: sqlite3.Connection, customer: str, dimension: str, hour: int) -> bool:
        row = db.execute(
            "SELECT 1 FROM hours WHERE customer = ? AND dimension = ? AND hour = ?",
            (customer, dimension, hour),
        ).fetchone()
        return row is not None

    @staticmethod
    def take_out_customer(
        db: sqlite3.Connection, dimension: str, hour: int, label: str, value: str
    ) -> int:
        """Remove one customer's parts (label `label` = `value`) from the samples of a
        (dimension, hour) whose record for it was just sealed early: what stays in them is the
        other customers' usage, and this customer's from now on. The samples they were taken out
        of: how many."""
        import json
        from decimal import Decimal

        changed = 0
        rows = db.execute(
            "SELECT id, value, breakdown FROM samples WHERE dimension = ? AND hour = ? "
            "AND breakdown IS NOT NULL",
            (dimension, hour),
        ).fetchall()
        for sample_id, total, text in rows:
            parts = json.loads(text)
            keep = [p for p in parts if [label, value] not in p[0]]
            if len(keep) == len(parts):
                continue
            removed = sum((Decimal(p[1]) for p in parts if [label, value] in p[0]), Decimal(0))
            db.execute(
                "UPDATE samples SET value = ?, breakdown = ? WHERE id = ?",
                (str(Decimal(total) - removed), json.dumps(keep, separators=(",", ":")), sample_id),
            )
            changed += 1
        return changed
