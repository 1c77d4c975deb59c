"""Sealed records: one per (customer, dimension, hour) (customer '' in instance mode), each the
immutable request it is sent as (a trigger refuses any change of it, but for one re-issue under a
corrected product code), with its send state: attempts counted before a request leaves, the last
error, the next attempt, the service's record id (changed by transitions.py). Here: sealing one,
and reading them (all, the pending ones a page at a time, what health and `due` need in SQL).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.aggregate import Allocation, Quantity, to_json
from agent.ledger.database import Database

KEEP_SEALED_DAYS = 90


STATES = ("pending", "sent", "rejected", "expired")


@dataclass(frozen=True)
class SealedHour:
    dimension: str
    hour: int
    product_code: str
    quantity: Quantity
    timestamp: int
    client_token: str
    samples: int
    raw: str
    state: str
    record_id: str | None
    attempts: int
    last_error: str | None
    sealed_at: float
    next_attempt: float
    done_at: float | None
    reissues: int = 0
    refusals: int = 0
    allocations: tuple[Allocation, ...] = ()
    customer: str = ""  # SaaS mode: the customer label's value; '' in instance mode
    customer_ref: CustomerRef | None = None  # SaaS mode: who the record bills, as sealed


class Buyer(Protocol):
    """A customer's ids (agent.ledger.customers.Customer has them)."""

    @property
    def account_id(self) -> str | None: ...

    @property
    def license_arn(self) -> str | None: ...

    @property
    def customer_identifier(self) -> str | None: ...


@dataclass(frozen=True)
class _Ids:
    """A customers row's ids, as insert_sealed reads them."""

    account_id: str | None
    license_arn: str | None
    customer_identifier: str | None


@dataclass(frozen=True)
class CustomerRef:
    """The buyer a sealed SaaS record bills, copied from its customer at sealing.

    Why a copy: the record must be the same on every resend; a customers row updated after a
    crash mid-call (a new license) would otherwise make the resend another record, billed again.
    """

    account_id: str | None
    license_arn: str | None
    customer_identifier: str | None

    @property
    def legacy(self) -> bool:
        """CustomerIdentifier (with the request's ProductCode) rather than account + license."""
        return self.license_arn is None

    def to_json(self) -> str:
        return json.dumps(
            {
                "account_id": self.account_id,
                "license_arn": self.license_arn,
                "customer_identifier": self.customer_identifier,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> CustomerRef | None:
        if text is None:
            return None
        d = json.loads(text)
        return cls(d.get("account_id"), d.get("license_arn"), d.get("customer_identifier"))

    @classmethod
    def of(cls, customer: Buyer) -> CustomerRef:
        if customer.license_arn is None:  # legacy: CustomerIdentifier (Customer.legacy)
            return cls(customer.account_id, None, customer.customer_identifier)
        return cls(customer.account_id, customer.license_arn, None)


class Hours(Database):
    """The sealed records (`hours` table): sealed once, pending until sent, rejected or expired."""

    def insert_sealed(
        self,
        db: sqlite3.Connection,
        *,
        dimension: str,
        hour: int,
        product_code: str,
        quantity: Quantity,
        timestamp: int,
        client_token: str,
        samples: int,
        raw: str,
        sealed_at: float,
        next_attempt: float,
        allocations: Sequence[Allocation] = (),
        customer: str = "",
        keep_samples: bool = False,
    ) -> None:
        """One sealed record, pending; the (dimension, hour)'s samples go with it unless
        `keep_samples` (SaaS sealing inserts a record per customer, then drops them once). A SaaS
        record takes its customer's ids (CustomerRef) in the same transaction: it is sent with
        them whatever happens to the customers row later (NULL: no such customer yet)."""
        ref = None
        if customer:
            row = db.execute(
                "SELECT account_id, license_arn, customer_identifier FROM customers "
                "WHERE label = ?",
                (customer,),
            ).fetchone()
            ref = None if row is None else CustomerRef.of(_Ids(*row)).to_json()
        db.execute(
            "INSERT INTO hours (dimension, hour, product_code, quantity, is_decimal, timestamp, "
            "client_token, samples, raw, state, sealed_at, next_attempt, allocations, customer, "
            "customer_ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
            (
                dimension,
                hour,
                product_code,
                quantity.text,
                int(quantity.is_decimal),
                timestamp,
                client_token,
                samples,
                raw,
                sealed_at,
                next_attempt,
                json.dumps(to_json(allocations)) if allocations else None,
                customer,
                ref,
            ),
        )
        if not keep_samples:
            db.execute("DELETE FROM samples WHERE dimension = ? AND hour = ?", (dimension, hour))

    def prune(self, now: float) -> None:
        """Sealed hours, and usage found unread, are kept 90 days, then forgotten."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM hours WHERE state != 'pending' AND hour < ?",
                (now - KEEP_SEALED_DAYS * 86400,),
            )
            db.execute("DELETE FROM unread WHERE t < ?", (now - KEEP_SEALED_DAYS * 86400,))

    def hours(
        self,
        since: float | None = None,
        until: float | None = None,
        states: tuple[str, ...] = STATES,
    ) -> list[SealedHour]:
        sql = f"SELECT {_HOUR_COLUMNS} FROM hours WHERE state IN ({','.join('?' * len(states))})"
        args: list[Any] = list(states)
        if since is not None:
            sql += " AND hour >= ?"
            args.append(since)
        if until is not None:
            sql += " AND hour < ?"
            args.append(until)
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY hour, dimension, customer", args).fetchall()
        return [_sealed(row) for row in rows]

    def pending(self, saas: bool | None = None) -> list[SealedHour]:
        """Pending records, oldest first; only instance hours (customer '') with saas=False,
        only SaaS records with saas=True."""
        rows = self.hours(states=("pending",))
        return rows if saas is None else [h for h in rows if bool(h.customer) == saas]

    def pending_other_kind(self, saas: bool) -> tuple[int, int | None]:
        """(count, oldest hour) of pending records of the kind the configured mode does not
        send: instance hours in SaaS mode (saas=True), SaaS records in instance mode. They wait
        for a config of their mode; named in the log and in `status`, never sent or expired."""
        with self._lock:
            n, oldest = self.db.execute(
                "SELECT COUNT(*), MIN(hour) FROM hours WHERE state = 'pending' AND "
                "(customer != '') = ?",
                (0 if saas else 1,),
            ).fetchone()
        return int(n), None if oldest is None else int(oldest)

    def lost_records(
        self, since: float, held_codes: Iterable[str]
    ) -> tuple[int, SealedHour | None]:
        """For health: how many records of hours since `since` lost revenue or may (rejected,
        expired, or pending after a refusal whose code is in `held_codes`), and the newest of
        them (by hour, dimension). Zero-quantity records are left out: a refused or expired 0
        bills nothing.

        Why in SQL: a seller's agent may hold 300,000 pending records; health is rewritten
        under the daemon's round lock."""
        codes = sorted(held_codes)
        code = "trim(substr(last_error, 1, instr(last_error || ':', ':') - 1))"
        where = (
            f"hour >= ? AND (state IN ('rejected', 'expired') OR (state = 'pending' AND "
            f"{code} IN ({','.join('?' * len(codes))}))) AND CAST(quantity AS REAL) != 0"
        )
        args = [since, *codes]
        with self._lock:
            (n,) = self.db.execute(f"SELECT COUNT(*) FROM hours WHERE {where}", args).fetchone()
            row = self.db.execute(
                f"SELECT {_HOUR_COLUMNS} FROM hours WHERE {where} "
                "ORDER BY hour DESC, dimension DESC LIMIT 1",
                args,
            ).fetchone()
        return int(n), None if row is None else _sealed(row)

    def pending_records(
        self, after: tuple[int, str, str] | None = None, limit: int | None = None,
        timestamp_upto: float | None = None,
    ) -> list[SealedHour]:  # fmt: skip
        """Pending SaaS records (customer not ''), oldest first by (hour, dimension, customer),
        after the key `after`, at most `limit`, of Timestamp <= `timestamp_upto`.

        Why pages: a seller's agent holds a record per customer, dimension and hour (300,000
        an hour for 100,000 customers); the batch sender reads them a page at a time."""
        sql = f"SELECT {_HOUR_COLUMNS} FROM hours WHERE state = 'pending' AND customer != ''"
        args: list[Any] = []
        if after is not None:
            sql += " AND (hour, dimension, customer) > (?, ?, ?)"
            args += list(after)
        if timestamp_upto is not None:
            sql += " AND timestamp <= ?"
            args.append(timestamp_upto)
        sql += " ORDER BY hour, dimension, customer"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self.db.execute(sql, args).fetchall()
        return [_sealed(row) for row in rows]

    def pending_bounds(self, saas: bool | None = None) -> list[SealedHour]:
        """For `sending.policy.due`, which needs only the earliest Timestamp (expiry grows with
        it) and the earliest next attempt of each kind of record: per kind (instance '', SaaS),
        the first pending record with those two fields set to the kind's minimums.

        Why: a seller's agent may hold 300,000 pending SaaS records; the daemon asks `due` on
        every send tick without reading them all. `saas`: only that kind (the one the
        configured mode sends), as the send tick asks; None: both."""
        sql = (
            "SELECT customer != '' AS saas, MIN(timestamp), MIN(next_attempt) FROM hours "
            "WHERE state = 'pending' GROUP BY saas"
        )
        with self._lock:
            rows = [r for r in self.db.execute(sql).fetchall() if saas is None or r[0] == saas]
            out = []
            for saas, ts, nxt in rows:
                row = self.db.execute(
                    f"SELECT {_HOUR_COLUMNS} FROM hours WHERE state = 'pending' AND "
                    f"(customer != '') = ? LIMIT 1",
                    (saas,),
                ).fetchone()
                h = _sealed(row)
                out.append(replace(h, timestamp=int(ts), next_attempt=float(nxt)))
        return out

    def record_counts(self, since: float) -> dict[str, int]:
        """For the metrics: every pending record, and the records of hours since `since` that
        are sent, rejected or expired, by state. Counted through the (state, hour) index, and
        asked only when something changed them (agent/daemon/metrics.py)."""
        with self._lock:
            (pending,) = self.db.execute(
                "SELECT COUNT(*) FROM hours WHERE state = 'pending'"
            ).fetchone()
            rows = self.db.execute(
                "SELECT state, COUNT(*) FROM hours WHERE state IN ('sent', 'rejected', 'expired') "
                "AND hour >= ? GROUP BY state",
                (since,),
            ).fetchall()
        counts = {"pending": int(pending), "sent": 0, "rejected": 0, "expired": 0}
        counts.update((str(state), int(n)) for state, n in rows)
        return counts

    def pending_hour_count(self) -> int:
        """Distinct hours with a pending record: the one count health, status and a stop give."""
        with self._lock:
            row = self.db.execute("SELECT COUNT(DISTINCT hour) FROM hours WHERE state = 'pending'")
            return int(row.fetchone()[0])


_HOUR_COLUMNS = (
    "dimension, hour, product_code, quantity, is_decimal, timestamp, client_token, samples, raw, "
    "state, record_id, attempts, last_error, sealed_at, next_attempt, done_at, reissues, refusals, "
    "allocations, customer, customer_ref"
)


def _sealed(row: tuple[Any, ...]) -> SealedHour:
    dim, hour, product, qty, is_dec, ts, token, n, raw, state, rid, att, err, at, nxt = row[:15]
    return SealedHour(
        dim, int(hour), product, Quantity.from_stored(qty, bool(is_dec)), int(ts), token, int(n),
        raw, state, rid, int(att), err, float(at), float(nxt), row[15], int(row[16]),
        int(row[17]), tuple(Allocation.from_request(a) for a in json.loads(row[18] or "[]")),
        row[19], CustomerRef.from_json(row[20]),
    )  # fmt: skip
