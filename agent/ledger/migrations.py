"""The ledger's schema, one `user_version` step at a time: each step's SQL (and Python, where
SQL alone cannot move the rows), applied in one transaction by `migrate`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from agent.errors import AgentError
from agent.ledger.database import Database

SCHEMA_VERSION = 9


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
    # SaaS mode: what AWS Marketplace's subscription notifications (SNS -> SQS) said of each
    # buyer, kept apart from `customers` (a notification may come before the registration).
    # `flush_due`: an unsubscribe was applied and the daemon has yet to seal that buyer's open
    # usage (it clears it in the transaction that seals); the records that seal makes are
    # `early`.
    9: """
    CREATE TABLE subscriptions (
        buyer TEXT PRIMARY KEY,         -- customer-aws-account-id, else customer-identifier
        account_id TEXT,
        customer_identifier TEXT,
        state TEXT NOT NULL CHECK (state IN ('subscribed', 'subscribe-failed',
                                             'unsubscribe-pending', 'unsubscribed')),
        event_at REAL NOT NULL,         -- the notification's own time (SNS Timestamp, else SQS's)
        applied_at REAL NOT NULL,
        offer TEXT,
        free_trial INTEGER,
        message_id TEXT,                -- the last applied notification's SNS/SQS id
        flush_due REAL,
        flushed_at REAL
    );
    CREATE INDEX subscriptions_by_account ON subscriptions (account_id);
    CREATE INDEX subscriptions_by_identifier ON subscriptions (customer_identifier);
    CREATE INDEX subscriptions_by_state ON subscriptions (state);
    -- asked at every sealing pass: only the few rows that have them are in these
    CREATE INDEX subscriptions_flush_due ON subscriptions (flush_due) WHERE flush_due IS NOT NULL;
    CREATE INDEX subscriptions_flushed ON subscriptions (flushed_at) WHERE flushed_at IS NOT NULL;
    -- a customer's subscription is found by its buyer's ids
    CREATE INDEX customers_by_account ON customers (account_id);
    CREATE INDEX customers_by_identifier ON customers (customer_identifier);
    -- a record sealed at its customer's unsubscribe, before the (dimension, hour) as a whole:
    -- the hour stays open for the other customers' samples (samples.Samples._is_sealed)
    ALTER TABLE hours ADD COLUMN early INTEGER NOT NULL DEFAULT 0;
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


def migrate(ledger: Database) -> None:
    """Bring the file to SCHEMA_VERSION, one `user_version` step at a time, in one transaction;
    a file newer than this agent is refused."""
    with ledger.transaction() as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AgentError(
                f"{ledger.path}: ledger schema {version} is newer than this agent "
                f"understands ({SCHEMA_VERSION}); install the newer metering-agent again"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            if v in _MIGRATION_STEPS:
                _MIGRATION_STEPS[v](db)
            for statement in _split_sql(_MIGRATIONS[v]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {v}")
