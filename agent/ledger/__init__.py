"""The only SQLite user: samples, collector positions, sealed hours, send state, health facts.

Durability rules it enforces:
- a sample and the collector position that produced it commit in one transaction;
- a sealed hour's request fields (quantity, Timestamp, ClientToken, ...) never change: a trigger
  aborts any UPDATE of them, so every retry after any restart sends the identical request;
- WAL mode, so `status` can read while the daemon writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.aggregate import Allocation, LabelSet, Point, Quantity, to_json
from agent.clock import HOUR, hour_start, iso

if TYPE_CHECKING:
    from agent.collectors.base import Unread

SCHEMA_VERSION = 8
LEDGER_FILE = "ledger.db"
KEEP_SEALED_DAYS = 90

STATES = ("pending", "sent", "rejected", "expired")


def _reissue_only_trigger(condition: str, also: tuple[str, ...] = ()) -> str:
    """The immutability trigger, rebuilt to allow one thing: a pending hour re-issued under another
    product code with a new ClientToken (reissues + 1), everything else equal, when `condition`
    (SQL on OLD) says no request of it can have been recorded. `also`: request columns added
    since (NULL allowed), immutable alike."""
    columns = "".join(f", {c}" for c in also)
    unchanged = "".join(f" AND NEW.{c} IS OLD.{c}" for c in also)
    return f"""
    DROP TRIGGER IF EXISTS sealed_request_is_immutable;
    CREATE TRIGGER sealed_request_is_immutable
    BEFORE UPDATE OF dimension, hour, product_code, quantity, is_decimal, timestamp, client_token
    {columns}
    ON hours
    WHEN NOT (
        OLD.state = 'pending' AND NEW.state = 'pending'
        AND NEW.dimension = OLD.dimension AND NEW.hour = OLD.hour
        AND NEW.quantity = OLD.quantity AND NEW.is_decimal = OLD.is_decimal
        AND NEW.timestamp = OLD.timestamp{unchanged}
        AND NEW.product_code != OLD.product_code AND NEW.client_token != OLD.client_token
        AND NEW.reissues = OLD.reissues + 1
        AND ({condition})
    )
    BEGIN
        SELECT RAISE(ABORT, 'a sealed hour''s request fields never change');
    END;
    """


_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        dimension TEXT NOT NULL,
        hour INTEGER NOT NULL,          -- the hour it counts in (carried: a later one)
        t REAL NOT NULL,                -- when it was taken
        value TEXT NOT NULL,            -- decimal
        span REAL NOT NULL              -- seconds it stands for (integral)
    );
    CREATE INDEX samples_by_hour ON samples (dimension, hour);
    CREATE TABLE positions (
        dimension TEXT PRIMARY KEY,
        state TEXT NOT NULL,            -- JSON: collector position, counter baseline + boot time
        t REAL NOT NULL
    );
    CREATE TABLE hours (
        dimension TEXT NOT NULL,
        hour INTEGER NOT NULL,
        product_code TEXT NOT NULL,
        quantity TEXT NOT NULL,
        is_decimal INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,     -- the MeterUsage Timestamp, whole seconds
        client_token TEXT NOT NULL,
        samples INTEGER NOT NULL,
        raw TEXT NOT NULL,              -- the aggregate before scale and rounding, for audits
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'rejected', 'expired')),
        record_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        sealed_at REAL NOT NULL,
        next_attempt REAL NOT NULL,
        done_at REAL,
        PRIMARY KEY (dimension, hour)
    );
    CREATE INDEX hours_pending ON hours (state, hour);
    CREATE TRIGGER sealed_request_is_immutable
    BEFORE UPDATE OF dimension, hour, product_code, quantity, is_decimal, timestamp, client_token
    ON hours
    BEGIN
        SELECT RAISE(ABORT, 'a sealed hour''s request fields never change');
    END;
    CREATE TABLE dimension_status (
        dimension TEXT PRIMARY KEY,
        last_t REAL,
        last_value TEXT,
        last_error TEXT,
        error_t REAL,
        errors INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0
    );
    """,
    # A held hour may be re-issued under the config's current product code with a new ClientToken,
    # once the service has refused its product code (or it was never tried): nothing else changes.
    2: """
    ALTER TABLE hours ADD COLUMN reissues INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hours ADD COLUMN reissued_from TEXT;
    """
    + _reissue_only_trigger(
        "OLD.attempts = 0 OR COALESCE(OLD.last_error, '') LIKE 'InvalidProductCodeException%'"
    ),
    # One sample per (dimension, instant): a restart's start-up round or a backward clock step
    # never stores an instant twice. Duplicates an older agent stored are kept (an increment is
    # real usage), each moved a few microseconds later first (_spread_instants); sealing errors
    # are kept per dimension.
    3: """
    CREATE UNIQUE INDEX samples_one_per_instant ON samples (dimension, t);
    ALTER TABLE dimension_status ADD COLUMN seal_error TEXT;
    ALTER TABLE dimension_status ADD COLUMN seal_error_hour INTEGER;
    """,
    # `attempts` counts requests that left (begin_attempt, before MeterUsage is called), and
    # `refusals` those answered InvalidProductCodeException: an hour is re-issued only when the
    # two are equal, i.e. no request of it can have been recorded. A held hour an older agent
    # left refused is taken as refused every time (its every request was the identical one).
    4: """
    ALTER TABLE hours ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
    UPDATE hours SET refusals = attempts
    WHERE state = 'pending' AND COALESCE(last_error, '') LIKE 'InvalidProductCodeException%';
    """
    + _reissue_only_trigger("OLD.refusals = OLD.attempts"),
    # A sample's value broken down by label set (JSON, `_breakdown_text`); NULL: no breakdown.
    5: """
    ALTER TABLE samples ADD COLUMN breakdown TEXT;
    """,
    # The hour's UsageAllocations (JSON, as sent; NULL: none) are part of its sealed request:
    # immutable like the quantity, kept through a re-issue.
    6: """
    ALTER TABLE hours ADD COLUMN allocations TEXT;
    """
    + _reissue_only_trigger("OLD.refusals = OLD.attempts", also=("allocations",)),
    # SaaS mode: a sealed record is per (customer, dimension, hour); '' in instance mode, so every
    # instance-mode row keeps its meaning. SQLite cannot change a primary key: the table is
    # rebuilt. Customers (ResolveCustomer's answer under the label value that names them in the
    # usage) and usage held for a label no customer has yet get their own tables.
    7: """
    CREATE TABLE hours_v7 (
        customer TEXT NOT NULL DEFAULT '',
        dimension TEXT NOT NULL,
        hour INTEGER NOT NULL,
        product_code TEXT NOT NULL,
        quantity TEXT NOT NULL,
        is_decimal INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        client_token TEXT NOT NULL,
        samples INTEGER NOT NULL,
        raw TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'rejected', 'expired')),
        record_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        sealed_at REAL NOT NULL,
        next_attempt REAL NOT NULL,
        done_at REAL,
        reissues INTEGER NOT NULL DEFAULT 0,
        reissued_from TEXT,
        refusals INTEGER NOT NULL DEFAULT 0,
        allocations TEXT,
        customer_ref TEXT,              -- SaaS: the buyer's ids at sealing (JSON), sent as sealed
        PRIMARY KEY (customer, dimension, hour)
    );
    INSERT INTO hours_v7 (dimension, hour, product_code, quantity, is_decimal, timestamp,
        client_token, samples, raw, state, record_id, attempts, last_error, sealed_at,
        next_attempt, done_at, reissues, reissued_from, refusals, allocations)
    SELECT dimension, hour, product_code, quantity, is_decimal, timestamp, client_token, samples,
        raw, state, record_id, attempts, last_error, sealed_at, next_attempt, done_at, reissues,
        reissued_from, refusals, allocations FROM hours;
    DROP TABLE hours;
    ALTER TABLE hours_v7 RENAME TO hours;
    CREATE INDEX hours_pending ON hours (state, hour);
    CREATE TABLE customers (
        label TEXT PRIMARY KEY,         -- the customer label's value in the usage
        account_id TEXT,                -- CustomerAWSAccountId (with license_arn: new integrations)
        license_arn TEXT,
        agreement_id TEXT,
        customer_identifier TEXT,       -- legacy integrations: CustomerIdentifier instead
        product_code TEXT,              -- as ResolveCustomer answered (NULL when added by hand)
        added_at REAL NOT NULL,
        removed_at REAL,                -- no more idle zeros; usage is still billed
        CHECK ((account_id IS NOT NULL AND license_arn IS NOT NULL)
               OR customer_identifier IS NOT NULL)
    );
    -- one label per buyer: two labels would put two records with one key in a call
    CREATE UNIQUE INDEX customers_one_label_per_license ON customers (account_id, license_arn)
        WHERE license_arn IS NOT NULL;
    CREATE UNIQUE INDEX customers_one_label_per_identifier ON customers (customer_identifier)
        WHERE license_arn IS NULL;
    CREATE TABLE held_usage (
        customer TEXT NOT NULL,         -- a label value no customer has (yet)
        dimension TEXT NOT NULL,
        hour INTEGER NOT NULL,
        points TEXT NOT NULL,           -- JSON [[t, value, span], ...], as sealing would use them
        held_at REAL NOT NULL,
        PRIMARY KEY (customer, dimension, hour)
    );
    """
    + _reissue_only_trigger(
        "OLD.refusals = OLD.attempts", also=("allocations", "customer", "customer_ref")
    ),
    # Usage a collector found lost for good (Reading.unread), one row per event, stored with the
    # reading that found it; kept 90 days like sealed hours. A row, not a count: the events a
    # run found are carried with its samples when the ledger is moved aside (identity.settle).
    8: """
    CREATE TABLE unread (
        id INTEGER PRIMARY KEY,
        dimension TEXT NOT NULL,
        t REAL NOT NULL,                -- the instant of the reading that found it
        what TEXT NOT NULL,             -- what went unread, and where
        fix TEXT NOT NULL,              -- what the seller should change
        amount INTEGER NOT NULL         -- known lost (bytes); 0: unknown
    );
    CREATE INDEX unread_by_time ON unread (t);
    """,
}


def _spread_instants(db: sqlite3.Connection) -> None:
    """Move every sample that shares its (dimension, instant) with an older one (lower id) a
    microsecond later per older one, until every instant is held once.

    Why a loop: a moved sample may land on an instant another sample already holds (t + 1 us
    was stored too); the next pass moves the younger of those two on, so no value is lost and
    the unique index that follows can always be built. Each pass is a sort (window function)
    plus an indexed lookup, not a scan per sample: 20,000 samples take well under a second, where
    a correlated COUNT(*) took over a minute, longer than systemd waits for the agent to start.
    """
    db.execute("CREATE INDEX samples_spreading ON samples (dimension, t)")
    db.execute("CREATE TEMP TABLE spread (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    while True:
        db.execute("DELETE FROM temp.spread")
        moved = db.execute(
            "INSERT INTO temp.spread (id, n) SELECT id, n FROM (SELECT id, ROW_NUMBER() OVER "
            "(PARTITION BY dimension, t ORDER BY id) - 1 AS n FROM samples) WHERE n > 0"
        ).rowcount
        if moved <= 0:
            break
        db.execute(
            "UPDATE samples SET t = t + 0.000001 * "
            "(SELECT n FROM temp.spread s WHERE s.id = samples.id) "
            "WHERE id IN (SELECT id FROM temp.spread)"
        )
    db.execute("DROP TABLE temp.spread")
    db.execute("DROP INDEX samples_spreading")


# Python steps run before a migration's SQL, in the same transaction.
_MIGRATION_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {3: _spread_instants}


@dataclass(frozen=True)
class SendState:
    """The send state machine, kept in the meta table: read as one value (Ledger.send_state) and
    written only by the Ledger's named transitions, each in one transaction. Each field is the
    meta key of the same name."""

    authorized: bool | None = None  # False: paused until a DryRun passes; None: never checked
    dryrun_due: float | None = None
    backoff_until: float = 0.0  # no send before this (a failure streak's backoff)
    failures: int = 0  # failures in a row
    failing_since: float | None = None  # first failure not yet followed by a success
    last_success: float | None = None
    reason: str | None = None  # the latest failure, while failing
    failure_hook_for: float | None = None  # the failing_since the failure hook ran for
    identity_unverified: str | None = None  # why IMDS must confirm the instance (identity.py)


_Rows = list[tuple[Any, ...]]  # rows as `since` reads them and `take_over` stores them

# record_sample's answer for an instant the dimension already has (or has passed): nothing stored.
INSTANT_TAKEN = -1


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
    def of(cls, customer: Customer) -> CustomerRef:
        if customer.legacy:
            return cls(customer.account_id, None, customer.customer_identifier)
        return cls(customer.account_id, customer.license_arn, None)


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


@dataclass(frozen=True)
class HeldUsage:
    """A label's share of a (dimension, hour) that no customer had when it was sealed: the points
    sealing bills it from once the customer is added (within the window), else it expires."""

    customer: str  # the label value ('' when the usage had no customer label)
    dimension: str
    hour: int
    points: tuple[Point, ...]
    held_at: float

    @property
    def timestamp(self) -> int:
        """The record's Timestamp once sealed: the hour's last sample of the dimension."""
        last = max(p.t for p in self.points)
        return min(max(int(last), self.hour), self.hour + HOUR - 1)


_CUSTOMER_COLUMNS = (
    "label, account_id, license_arn, agreement_id, customer_identifier, product_code, added_at, "
    "removed_at"
)


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


class Ledger:
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
            self.db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a transaction that returned is on disk, even across power loss.
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
            from agent.host.ownership import adopt

            adopt(Path(state_dir), *(Path(f"{self.path}{x}") for x in ("", "-wal", "-shm")))
        self.db.execute("PRAGMA busy_timeout=30000")

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

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                from agent.errors import AgentError

                raise AgentError(
                    f"{self.path}: ledger schema {version} is newer than this agent "
                    f"understands ({SCHEMA_VERSION}); install the newer metering-agent again"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                if v in _MIGRATION_STEPS:
                    _MIGRATION_STEPS[v](db)
                for statement in _split_sql(_MIGRATIONS[v]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {v}")

    # -- meta ------------------------------------------------------------------------------------

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

    def update_meta(self, **values: Any) -> None:
        with self.transaction() as db:
            for key, value in values.items():
                self.set_meta(db, key, value)

    # -- send state ----------------------------------------------------------------------------

    def send_state(self, db: sqlite3.Connection | None = None) -> SendState:
        names = [f.name for f in fields(SendState)]
        sql = f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(names))})"
        with self._lock:
            rows = (db or self.db).execute(sql, names).fetchall()
        values = {k: json.loads(v) for k, v in rows if v is not None}
        return SendState(**{k: v for k, v in values.items() if v is not None})

    def _change(self, change: Callable[[SendState], dict[str, Any]]) -> None:
        """Apply one transition, computed from the state before it, in one transaction."""
        with self.transaction() as db:
            for key, value in change(self.send_state(db)).items():
                self.set_meta(db, key, value)

    def note_success(self, now: float) -> None:
        """A send or DryRun succeeded: authorized, no failure streak, no backoff."""
        self.update_meta(authorized=True, failures=0, backoff_until=None, failing_since=None,
                         last_success=now, reason=None)  # fmt: skip

    def note_failure(self, now: float, reason: str) -> None:
        """Something failed: `reason` is the current one; failing since the first of a streak."""
        self._change(lambda s: dict(reason=reason, failing_since=s.failing_since or now))

    def back_off(self, now: float, reason: str, delay_for: Callable[[int], float]) -> float:
        """One more failure in a row: sends and a due DryRun wait `delay_for(failures)`, which
        it returns."""
        delay = []

        def change(s: SendState) -> dict[str, Any]:
            delay.append(delay_for(s.failures + 1))
            due = None if s.dryrun_due is None else max(s.dryrun_due, now + delay[0])
            return dict(failures=s.failures + 1, backoff_until=now + delay[0], dryrun_due=due,
                        reason=reason, failing_since=s.failing_since or now)  # fmt: skip

        self._change(change)
        return delay[0]

    def authorize(self) -> None:
        """A DryRun found the role and product fine: sending goes on, no DryRun due."""
        self.update_meta(authorized=True, dryrun_due=None)

    def deauthorize(self, now: float, reason: str, recheck_at: float) -> None:
        """Not authorized: sending pauses until a DryRun, due at `recheck_at`, passes."""
        self._change(lambda s: dict(authorized=False, dryrun_due=recheck_at, reason=reason,
                                    failing_since=s.failing_since or now))  # fmt: skip

    def schedule_dryrun(self, at: float) -> None:
        self.update_meta(dryrun_due=at)

    def mark_unverified(self, reason: str, started: float) -> None:
        """IMDS has not confirmed this is the ledger's instance: nothing is sealed or sent; the
        earliest unverified run's start is kept (its samples are this machine's)."""
        since = self.get_meta("unverified_since")
        since = started if since is None else min(since, started)
        self.update_meta(identity_unverified=reason, unverified_since=since)

    def mark_verified(self) -> None:
        self.update_meta(identity_unverified=None, unverified_since=None)

    def note_failure_hook(self, failing_since: float | None) -> None:
        """The failure hook ran for the streak that began at `failing_since` (None: recovered)."""
        self.update_meta(failure_hook_for=failing_since)

    # -- samples -----------------------------------------------------------------------------

    def position(self, dimension: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT state FROM positions WHERE dimension = ?", (dimension,)
            ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def record_sample(
        self,
        dimension: str,
        t: float,
        value: Decimal,
        span: float,
        state: dict[str, Any] | None,
        carry: bool,
        increment: bool = False,
        breakdown: Mapping[LabelSet, Decimal] | None = None,
        unread: Sequence[Unread] = (),
    ) -> int | None:
        """Store a sample with its collector position, atomically; returns the hour it went to.

        A sample whose hour is already sealed goes to the next open hour when `carry` (sum and
        integral), else it is dropped and counted. Either way the position advances with it, so
        the same usage is never read twice.

        Instants are unique per dimension. A level at an instant already stored (a restart's
        start-up round, minutes re-lived after the wall clock stepped back) is not stored again:
        INSTANT_TAKEN. A level that adds up (`carry`: integral, sum) is not stored at or before
        the dimension's newest instant either, since its hour may be sealed and it would carry
        into the next one: the re-lived minutes would be billed twice. A `max`, `min`, `avg` or
        `last` loses nothing by a re-lived instant and keeps it. An increment is usage since the
        last reading, so it is always stored, and added to the sample already at that instant if
        there is one. A new sample ends the span of the one before it, so `integral` never counts
        the overlap after a kill -9 twice. `breakdown` (the value by label set) is stored with
        the sample; an increment added to a stored one adds its breakdown to that one's.

        `unread` (usage the reading found lost for good) is stored in the same transaction,
        whatever becomes of the value: the position moves past the loss, so the collector never
        reports it again, and a kill -9 before the commit leaves both to the next reading.
        """
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO unread (dimension, t, what, fix, amount) VALUES (?, ?, ?, ?, ?)",
                [(dimension, t, u.what, u.fix, max(0, u.amount)) for u in unread],
            )
            same = db.execute(
                "SELECT id, value, hour, breakdown FROM samples WHERE dimension = ? AND t = ?",
                (dimension, t),
            ).fetchone()
            row = db.execute(
                "SELECT last_t FROM dimension_status WHERE dimension = ?", (dimension,)
            ).fetchone()
            newest = None if row is None or row[0] is None else float(row[0])
            relived = newest is not None and t <= newest
            if not increment and (same is not None or (carry and relived)):
                if state is not None:
                    self._save_position(db, dimension, state, t)
                return INSTANT_TAKEN
            hour: int | None = hour_start(t)
            while hour is not None and self._is_sealed(db, dimension, hour):
                hour = hour + HOUR if carry else None
            if hour is None:
                db.execute(
                    "INSERT INTO dimension_status (dimension, dropped) VALUES (?, 1) "
                    "ON CONFLICT (dimension) DO UPDATE SET dropped = dropped + 1",
                    (dimension,),
                )
            else:
                if same is not None:  # an increment at a stored instant: add to it
                    db.execute(
                        "UPDATE samples SET value = ?, breakdown = ? WHERE id = ?",
                        (
                            str(Decimal(same[1]) + value),
                            _added_breakdown(same[3], Decimal(same[1]), breakdown, value),
                            same[0],
                        ),
                    )
                    hour = int(same[2])
                else:
                    db.execute(
                        "UPDATE samples SET span = MAX(0, MIN(span, ? - t)) WHERE id = "
                        "(SELECT id FROM samples WHERE dimension = ? AND t < ? "
                        "ORDER BY t DESC LIMIT 1)",
                        (t, dimension, t),
                    )
                    db.execute(
                        "INSERT INTO samples (dimension, hour, t, value, span, breakdown) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (dimension, hour, t, str(value), span, _breakdown_text(breakdown)),
                    )
            if state is not None:
                self._save_position(db, dimension, state, t)
            db.execute(
                "INSERT INTO dimension_status (dimension, last_t, last_value) VALUES (?, ?, ?) "
                "ON CONFLICT (dimension) DO UPDATE SET last_t = MAX(COALESCE(last_t, 0), "
                "excluded.last_t), last_value = excluded.last_value, "
                # the collector works again: an error noted before this reading is over (one at
                # this very instant, a warning or a late read, stays); the count is kept
                "last_error = CASE WHEN error_t < excluded.last_t THEN NULL ELSE last_error END, "
                "error_t = CASE WHEN error_t < excluded.last_t THEN NULL ELSE error_t END",
                (dimension, t, str(value)),
            )
        return hour

    @staticmethod
    def _save_position(
        db: sqlite3.Connection, dimension: str, state: dict[str, Any], t: float
    ) -> None:
        db.execute(
            "INSERT INTO positions (dimension, state, t) VALUES (?, ?, ?) "
            "ON CONFLICT (dimension) DO UPDATE SET state = excluded.state, t = excluded.t",
            (dimension, json.dumps(state), t),
        )

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

    def clip_last_span(self, dimension: str, stop: float) -> None:
        """At a stop, the newest sample stands only until the stop (integral)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE samples SET span = MAX(0, MIN(span, ? - t)) WHERE id = "
                "(SELECT id FROM samples WHERE dimension = ? ORDER BY t DESC LIMIT 1)",
                (stop, dimension),
            )

    @staticmethod
    def _is_sealed(db: sqlite3.Connection, dimension: str, hour: int) -> bool:
        row = db.execute(
            "SELECT 1 FROM hours WHERE dimension = ? AND hour = ? UNION ALL "
            "SELECT 1 FROM held_usage WHERE dimension = ? AND hour = ? LIMIT 1",
            (dimension, hour, dimension, hour),
        ).fetchone()
        return row is not None

    def unsealed_hours(self, db: sqlite3.Connection, before: int) -> list[tuple[str, int]]:
        """(dimension, hour) pairs with samples, for hours that start before `before`."""
        rows = db.execute(
            "SELECT DISTINCT dimension, hour FROM samples WHERE hour < ? ORDER BY hour, dimension",
            (before,),
        ).fetchall()
        return [(str(d), int(h)) for d, h in rows]

    def points(self, db: sqlite3.Connection, dimension: str, hour: int) -> list[Point]:
        rows = db.execute(
            "SELECT t, value, span, breakdown FROM samples WHERE dimension = ? AND hour = ? "
            "ORDER BY t",
            (dimension, hour),
        ).fetchall()
        return [
            Point(float(t), Decimal(v), float(s), None if b is None else StoredBreakdown(b))
            for t, v, s, b in rows
        ]

    def drop_samples(self, db: sqlite3.Connection, dimension: str, instants: list[float]) -> None:
        """Remove samples that can never be billed (not a finite number: an older agent stored
        them before values were checked), so they no longer hold their hour."""
        db.executemany(
            "DELETE FROM samples WHERE dimension = ? AND t = ?", [(dimension, t) for t in instants]
        )

    # -- sealed hours ------------------------------------------------------------------------

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
                f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE label = ?", (customer,)
            ).fetchone()
            ref = None if row is None else CustomerRef.of(Customer(*row)).to_json()
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
        """For `sending.due`, which needs only the earliest Timestamp (expiry grows with it) and
        the earliest next attempt of each kind of record: per kind (instance '', SaaS), the
        first pending record with those two fields set to the kind's minimums.

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

    def begin_attempts(self, records: Sequence[SealedHour], now: float) -> None:
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
        sent: Sequence[tuple[SealedHour, str | None]] = (),
        rejected: Sequence[tuple[SealedHour, str]] = (),
        retry: Sequence[tuple[SealedHour, str, float]] = (),
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

    def pending_hour_count(self) -> int:
        """Distinct hours with a pending record: the one count health, status and a stop give."""
        with self._lock:
            row = self.db.execute("SELECT COUNT(DISTINCT hour) FROM hours WHERE state = 'pending'")
            return int(row.fetchone()[0])

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

    # -- customers (SaaS mode) ---------------------------------------------------------------

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

    def customer(self, label: str) -> Customer | None:
        """The customer under `label`, removed or not (its usage is billed either way)."""
        with self._lock:
            row = self.db.execute(
                f"SELECT {_CUSTOMER_COLUMNS} FROM customers WHERE label = ?", (label,)
            ).fetchone()
        return None if row is None else Customer(*row)

    # -- held usage (SaaS mode: a label no customer has yet) --------------------------------------

    def hold_usage(
        self, db: sqlite3.Connection, customer: str, dimension: str, hour: int,
        points: Sequence[Point], now: float,
    ) -> None:  # fmt: skip
        """Keep one unknown label's share of a (dimension, hour) in the sealing transaction, as
        the points sealing would bill it from; a second hold of the same key (samples carried
        into an hour after it was sealed) adds its points."""
        row = db.execute(
            "SELECT points FROM held_usage WHERE customer = ? AND dimension = ? AND hour = ?",
            (customer, dimension, hour),
        ).fetchone()
        kept = [] if row is None else json.loads(row[0])
        kept.extend(_point_json(p) for p in points)
        db.execute(
            "INSERT INTO held_usage (customer, dimension, hour, points, held_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (customer, dimension, hour) DO UPDATE SET "
            "points = excluded.points",
            (customer, dimension, hour, json.dumps(kept, separators=(",", ":")), now),
        )

    def held_usage(
        self,
        db: sqlite3.Connection | None = None,
        customers: Sequence[str] | None = None,
        settle_by: float | None = None,
    ) -> list[HeldUsage]:
        """Usage held for labels that name no customer (oldest first); only `customers`' when
        given. `settle_by`: only what a pass at that time may settle: held for a label that is
        now a customer, or of an hour that began at or before `settle_by` (its window may have
        passed), so a pass does not parse every held point each round."""
        sql = "SELECT customer, dimension, hour, points, held_at FROM held_usage WHERE 1"
        args: list[Any] = []
        if customers is not None:
            sql += f" AND customer IN ({','.join('?' * len(customers))})"
            args = list(customers)
        if settle_by is not None:
            sql += " AND (customer IN (SELECT label FROM customers) OR hour <= ?)"
            args.append(settle_by)
        with self._lock:
            try:
                rows = (
                    (db or self.db)
                    .execute(sql + " ORDER BY hour, dimension, customer", args)
                    .fetchall()
                )
            except sqlite3.OperationalError:  # read-only look at a ledger not yet migrated
                return []
        return [
            HeldUsage(c, d, int(h), tuple(_json_point(p) for p in json.loads(pts)), float(at))
            for c, d, h, pts, at in rows
        ]

    def release_held(
        self, db: sqlite3.Connection, held: HeldUsage, expired: str | None = None
    ) -> None:
        """Forget held usage once its record is sealed (the caller's insert_sealed, same
        transaction). With `expired` (why), that record is settled `expired` at once: it is past
        the window, kept for status, report and health like any expired hour."""
        db.execute(
            "DELETE FROM held_usage WHERE customer = ? AND dimension = ? AND hour = ?",
            (held.customer, held.dimension, held.hour),
        )
        if expired is not None:
            db.execute(
                "UPDATE hours SET state = 'expired', last_error = ?, done_at = sealed_at "
                "WHERE customer = ? AND dimension = ? AND hour = ? AND state = 'pending'",
                (expired, held.customer, held.dimension, held.hour),
            )

    def since(self, t: float) -> tuple[_Rows, _Rows, _Rows]:
        """Unsealed samples, collector positions and usage found unread, written at or after
        `t` (this run's)."""
        with self._lock:
            samples = self.db.execute(
                "SELECT dimension, hour, t, value, span, breakdown FROM samples WHERE t >= ?",
                (t,),
            ).fetchall()
            positions = self.db.execute(
                "SELECT dimension, state, t FROM positions WHERE t >= ?", (t,)
            ).fetchall()
            unread = self.db.execute(
                "SELECT dimension, t, what, fix, amount FROM unread WHERE t >= ? ORDER BY id",
                (t,),
            ).fetchall()
        return samples, positions, unread

    def take_over(
        self,
        samples: _Rows,
        positions: _Rows,
        unread: Sequence[tuple[Any, ...]] = (),
    ) -> None:
        """Store samples, positions and usage found unread carried from a ledger that was moved
        aside: the positions are past the losses, so the losses come too."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO unread (dimension, t, what, fix, amount) VALUES (?, ?, ?, ?, ?)",
                unread,
            )
            db.executemany(
                "INSERT INTO samples (dimension, hour, t, value, span, breakdown) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                samples,
            )
            db.executemany(
                "INSERT INTO positions (dimension, state, t) VALUES (?, ?, ?) "
                "ON CONFLICT (dimension) DO UPDATE SET state = excluded.state, t = excluded.t",
                positions,
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

    def unsealed_sample_count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])


_HOUR_COLUMNS = (
    "dimension, hour, product_code, quantity, is_decimal, timestamp, client_token, samples, raw, "
    "state, record_id, attempts, last_error, sealed_at, next_attempt, done_at, reissues, refusals, "
    "allocations, customer, customer_ref"
)


def _breakdown_text(breakdown: Mapping[LabelSet, Decimal] | None) -> str | None:
    """A breakdown as JSON: `[[[["tenant", "acme"]], "12"], ...]`, decimals as strings."""
    if breakdown is None:
        return None
    return json.dumps(
        [[[list(pair) for pair in labels], str(v)] for labels, v in breakdown.items()],
        ensure_ascii=False,
        separators=(",", ":"),
    )


class StoredBreakdown(Mapping[LabelSet, Decimal]):
    """A stored sample's breakdown, parsed each time it is read and never kept: an hour of a
    thousand tenants' samples would otherwise sit in memory at once while it seals."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def _parsed(self) -> dict[LabelSet, Decimal]:
        return _breakdown(self.text) or {}

    def __getitem__(self, key: LabelSet) -> Decimal:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[LabelSet]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def items(self) -> ItemsView[LabelSet, Decimal]:
        return self._parsed().items()


def _breakdown(text: str | None) -> dict[LabelSet, Decimal] | None:
    if text is None:
        return None
    return {
        tuple((str(k), str(v)) for k, v in labels): Decimal(v) for labels, v in json.loads(text)
    }


def _added_breakdown(
    text: str | None, before: Decimal, breakdown: Mapping[LabelSet, Decimal] | None, value: Decimal
) -> str | None:
    """A stored sample's breakdown with an increment's added to it (None if neither has one)."""
    if text is None and breakdown is None:
        return None
    out = _breakdown(text) or ({(): before} if text is None and before else {})
    for labels, v in (breakdown if breakdown is not None else {(): value}).items():
        out[labels] = out.get(labels, Decimal(0)) + v
    return _breakdown_text({k: v for k, v in out.items() if v})


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


def _point_json(p: Point) -> list[Any]:
    """A held point: [t, value, span] and, with a breakdown, its label sets (`_breakdown_text`)."""
    out: list[Any] = [p.t, str(p.value), p.span]
    if p.breakdown is not None:
        out.append(json.loads(_breakdown_text(p.breakdown) or "[]"))
    return out


def _json_point(item: list[Any]) -> Point:
    breakdown = None
    if len(item) > 3 and item[3] is not None:
        breakdown = _breakdown(json.dumps(item[3]))
    return Point(float(item[0]), Decimal(item[1]), float(item[2]), breakdown)


def _sealed(row: tuple[Any, ...]) -> SealedHour:
    dim, hour, product, qty, is_dec, ts, token, n, raw, state, rid, att, err, at, nxt = row[:15]
    return SealedHour(
        dim, int(hour), product, Quantity.from_stored(qty, bool(is_dec)), int(ts), token, int(n),
        raw, state, rid, int(att), err, float(at), float(nxt), row[15], int(row[16]),
        int(row[17]), tuple(Allocation.from_request(a) for a in json.loads(row[18] or "[]")),
        row[19], CustomerRef.from_json(row[20]),
    )  # fmt: skip


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping a trigger's BEGIN ... END; together."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current))
    return statements


def move_aside(state_dir: Path, reason: str, now: float) -> Path:
    """Rename the ledger (and its WAL files) out of the way; returns the new name."""
    src = Path(state_dir) / LEDGER_FILE
    dest = src.with_name(f"{LEDGER_FILE}.{reason}.{int(now)}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(str(src) + suffix)
        if part.exists():
            os.replace(part, Path(str(dest) + suffix))
    return dest
