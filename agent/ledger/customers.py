"""SaaS mode's customers: ResolveCustomer's answer (or ids given by hand) under the label value
that names the buyer in the usage. One label per buyer and one buyer per label while it may bill
(unique indexes, and `register_customer` in one transaction)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields, replace

from agent.ledger.database import Database


@dataclass(frozen=True)
class Customer:
    """A SaaS customer, under the label value that names it in the usage."""

    label: str
    account_id: str | None  # CustomerAWSAccountId (legacy answers may carry it too)
    license_arn: str | None
    agreement_id: str | None
    customer_identifier: str | None  # legacy integrations, instead of account_id
    product_code: str | None
    added_at: float
    removed_at: float | None = None

    @property
    def legacy(self) -> bool:
        """A legacy integration: records name CustomerIdentifier (and the request ProductCode)
        rather than CustomerAWSAccountId + LicenseArn."""
        return self.license_arn is None


_CUSTOMER_COLUMNS = (
    "label, account_id, license_arn, agreement_id, customer_identifier, product_code, added_at, "
    "removed_at"
)


class Customers(Database):
    """SaaS mode's customers table: a buyer's ids under the label value that names it."""

    def add_customer(self, customer: Customer) -> bool:
        """Store a customer under its label; True if new or changed. Adding a removed label again
        brings it back (idle zeros resume). A buyer another label has is refused by the unique
        indexes (sqlite3.IntegrityError), never replaced: `register_customer` says which."""
        with self.transaction() as db:
            old = db.execute(
                f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE label = ?", (customer.label,)
            ).fetchone()
            if old is not None and Customer(*old) == customer:
                return False
            _put_customer(db, customer)
        return True

    def register_customer(self, customer: Customer) -> tuple[str, Customer | None]:
        """Store `customer` unless its label names another buyer, in one transaction (the
        fulfillment handler and `customers add` may race): ('added' | 'updated' | 'unchanged' |
        'conflict' | 'duplicate', the row that was there, or for 'duplicate' the other label's).
        The same buyer (account id, else legacy customer identifier) may come back with a new
        license or agreement: updated, brought back if removed, its first added_at kept. Another
        buyer under the label is refused while it may still bill: usage under it, held or late,
        would go to the wrong account; a removed label with every record final (none pending,
        nothing held) may be given to another buyer (sealed records keep their own ids). A buyer
        another label already names is refused ('duplicate'): one label per buyer, or two records
        with one key would go in a call and one's usage be lost."""
        with self.transaction() as db:
            row = db.execute(
                f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE label = ?", (customer.label,)
            ).fetchone()
            old = None if row is None else Customer(*row)
            other = _same_buyer(db, customer)
            if other is not None:
                return "duplicate", other
            if old is not None:
                same = (
                    (old.account_id, old.customer_identifier)
                    == (customer.account_id, customer.customer_identifier)
                    if old.account_id is None or customer.account_id is None
                    else old.account_id == customer.account_id
                )
                if not same and not _label_free(db, old):
                    return "conflict", old
                if same:
                    customer = replace(customer, added_at=old.added_at, removed_at=None)
                if customer == old:
                    return "unchanged", old
            _put_customer(db, customer)
        return ("added" if old is None else "updated"), old

    def remove_customer(self, label: str, now: float) -> bool:
        """Mark a customer removed (no more idle zeros; usage is still billed); False if unknown
        or already removed."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE customers SET removed_at = ? WHERE label = ? AND removed_at IS NULL",
                (now, label),
            )
        return cur.rowcount == 1

    def customers(self, include_removed: bool = False) -> list[Customer]:
        sql = f"SELECT {_CUSTOMER_COLUMNS} FROM customers"
        if not include_removed:
            sql += " WHERE removed_at IS NULL"
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY label").fetchall()
        return [Customer(*row) for row in rows]

    def customer_labels(self) -> tuple[set[str], set[str]]:
        """The labels of every customer, and of those not removed: what sealing asks of 100,000
        customers (strings only: the sealer's memory and garbage collector stay small)."""
        with self._lock:
            rows = self.db.execute("SELECT label, removed_at IS NULL FROM customers").fetchall()
        return {label for label, _ in rows}, {label for label, active in rows if active}

    def customer(self, label: str) -> Customer | None:
        """The customer under `label`, removed or not (its usage is billed either way)."""
        with self._lock:
            row = self.db.execute(
                f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE label = ?", (label,)
            ).fetchone()
        return None if row is None else Customer(*row)


def _put_customer(db: sqlite3.Connection, customer: Customer) -> None:
    """Insert or update the label's row; never INSERT OR REPLACE, which would delete another
    label's row that the unique (one label per buyer) indexes find in the way."""
    db.execute(
        f"INSERT INTO customers ({_CUSTOMER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (label) DO UPDATE SET account_id = excluded.account_id, "
        "license_arn = excluded.license_arn, agreement_id = excluded.agreement_id, "
        "customer_identifier = excluded.customer_identifier, "
        "product_code = excluded.product_code, added_at = excluded.added_at, "
        "removed_at = excluded.removed_at",
        tuple(getattr(customer, f.name) for f in fields(Customer)),
    )


def _same_buyer(db: sqlite3.Connection, customer: Customer) -> Customer | None:
    """Another label's customer with the buyer's ids (account + license, or the legacy
    customer identifier): the records of both would share a key."""
    if customer.legacy:
        where, args = (
            "license_arn IS NULL AND customer_identifier = ?",
            [customer.customer_identifier],
        )
    else:
        where, args = (
            "account_id = ? AND license_arn = ?",
            [customer.account_id, customer.license_arn],
        )
    row = db.execute(
        f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE {where} AND label != ?",
        (*args, customer.label),
    ).fetchone()
    return None if row is None else Customer(*row)


def _label_free(db: sqlite3.Connection, old: Customer) -> bool:
    """A removed customer's label with nothing left to bill under it (no pending record, no held
    usage): it may name another buyer."""
    if old.removed_at is None:
        return False
    busy = db.execute(
        "SELECT 1 FROM hours WHERE customer = ? AND state = 'pending' UNION ALL "
        "SELECT 1 FROM held_usage WHERE customer = ? LIMIT 1",
        (old.label, old.label),
    ).fetchone()
    return busy is None
