"""Unsealed usage: each dimension's samples (one per instant, with their breakdown by label set)
and the collector positions that produced them, written together in one transaction; usage found
unread stored with them; and, in SaaS mode, the points of usage held for a label no customer has
yet (`held_usage`), sealed once `customers add` names it.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import ItemsView, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from agent.aggregate import LabelSet, Point
from agent.clock import HOUR, hour_start
from agent.ledger.database import Database


class Unread(Protocol):
    """Usage a reading found lost for good (agent.collectors.Unread), stored as it is given."""

    @property
    def what(self) -> str: ...

    @property
    def fix(self) -> str: ...

    @property
    def amount(self) -> int: ...


_Rows = list[tuple[Any, ...]]  # rows as `since` reads them and `take_over` stores them


# record_sample's answer for an instant the dimension already has (or has passed): nothing stored.
INSTANT_TAKEN = -1


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


def _seal_key(dimension: str, hour: int) -> str:
    return f"sealing/{hour}/{dimension}"


# The distinct dimensions of samples, one index seek each (samples_by_hour leads with dimension).
_DIMENSIONS = """
    WITH RECURSIVE dims(d) AS (
        SELECT MIN(dimension) FROM samples
        UNION ALL
        SELECT (SELECT MIN(dimension) FROM samples WHERE dimension > d) FROM dims
        WHERE d IS NOT NULL
    )
    SELECT d FROM dims WHERE d IS NOT NULL
"""


class Samples(Database):
    """Unsealed usage: samples, collector positions, and usage held for an unknown customer."""

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
            if same is not None and self._is_sealed(db, dimension, int(same[2])):
                # an increment at an instant of an hour being sealed in steps: that sample's
                # value is taken; this one comes after it, as any usage after its hour's seal
                t, same = math.nextafter(t, math.inf), None
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
        """Sealed, or being sealed (a seal in steps has begun): no sample joins the hour now."""
        row = db.execute(
            # an `early` record (a customer's, sealed at its unsubscribe) leaves the hour open;
            # a seal in progress (its meta row) closes it
            "SELECT 1 FROM hours WHERE dimension = ? AND hour = ? AND early = 0 UNION ALL "
            "SELECT 1 FROM held_usage WHERE dimension = ? AND hour = ? UNION ALL "
            "SELECT 1 FROM meta WHERE key = ? LIMIT 1",
            (dimension, hour, dimension, hour, _seal_key(dimension, hour)),
        ).fetchone()
        return row is not None

    # A (dimension, hour) sealed in steps (SaaS mode: a record per customer, a few thousand per
    # transaction) has a progress row in `meta` from its first step to its last: the label of
    # the last customer done (null: none yet). The first step writes it in the transaction that
    # reads the hour's points, so no sample joins the hour after (_is_sealed); each step writes
    # its records and moves it in one transaction; the last deletes the samples and it. After a
    # crash the samples are still there, the next pass finds the hour unsealed and goes on past
    # the label: no customer sealed twice, none left out.

    def begin_seal(self, db: sqlite3.Connection, dimension: str, hour: int, now: float) -> None:
        """Mark the hour as being sealed (in the transaction that reads its points), unless a
        pass that stopped half-way already did."""
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (_seal_key(dimension, hour), json.dumps({"done_upto": None, "began": now})),
        )

    def seal_progress(
        self, db: sqlite3.Connection, dimension: str, hour: int
    ) -> tuple[bool, str | None]:
        """(being sealed, the label of the last customer done, None if none)."""
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_seal_key(dimension, hour),))
        found = row.fetchone()
        if found is None:
            return False, None
        return True, json.loads(found[0])["done_upto"]

    def advance_seal(
        self, db: sqlite3.Connection, dimension: str, hour: int, done_upto: str
    ) -> None:
        """Every customer up to this label is done (in the step's transaction)."""
        db.execute(
            "UPDATE meta SET value = json_set(value, '$.done_upto', ?) WHERE key = ?",
            (done_upto, _seal_key(dimension, hour)),
        )

    def end_seal(self, db: sqlite3.Connection, dimension: str, hour: int) -> None:
        """The last step: the hour's samples and its progress row go."""
        db.execute("DELETE FROM samples WHERE dimension = ? AND hour = ?", (dimension, hour))
        db.execute("DELETE FROM meta WHERE key = ?", (_seal_key(dimension, hour),))

    def seals_in_progress(self) -> list[tuple[str, int, str | None]]:
        """(dimension, hour, last label done) of each seal begun and not finished."""
        with self._lock:
            rows = self.db.execute(
                "SELECT key, value FROM meta WHERE key LIKE 'sealing/%'"
            ).fetchall()
        out = []
        for key, value in rows:
            _, hour, dimension = str(key).split("/", 2)
            out.append((dimension, int(hour), json.loads(value)["done_upto"]))
        return sorted(out)

    def unsealed_hours(self, db: sqlite3.Connection, before: int) -> list[tuple[str, int]]:
        """(dimension, hour) pairs with samples, for hours that start before `before`, by hour.

        Asked after every round, when the open hour may hold thousands of samples: each dimension
        in the index is found by a seek (a skip-scan), then its hours before `before` by another,
        so the cost does not grow with the open hour's samples (a plain `WHERE hour < ?` scans
        the whole index: 0.29 ms per round at the end of an hour of three 1 s dimensions, 0.02
        this way)."""
        pairs = [
            (str(d), int(h))
            for (d,) in db.execute(_DIMENSIONS).fetchall()
            for (h,) in db.execute(
                "SELECT DISTINCT hour FROM samples WHERE dimension = ? AND hour < ?", (d, before)
            ).fetchall()
        ]
        return sorted(pairs, key=lambda p: (p[1], p[0]))

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

    def unsealed_sample_count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

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
