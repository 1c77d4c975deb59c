from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from agent.aggregate import Quantity
from agent.errors import AgentError
from agent.ledger import Ledger, LedgerInUse, replace_closed
from agent.ledger.faults import LedgerDamaged
from agent.ledger.migrations import SCHEMA_VERSION
from tests.billing import H


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path)


FOUR = Quantity(4)


def seal_one(ledger: Ledger, dim: str = "vcpus", hour: int = H, qty: Quantity = FOUR) -> None:
    with ledger.transaction() as db:
        ledger.insert_sealed(
            db, dimension=dim, hour=hour, product_code="p", quantity=qty, timestamp=hour + 3540,
            client_token="tok", samples=1, raw="4", sealed_at=hour + 3600, next_attempt=hour + 3600,
        )  # fmt: skip


def test_schema_is_versioned_and_reopens(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    db = sqlite3.connect(tmp_path / "ledger.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    Ledger(tmp_path).close()  # a second open migrates nothing and fails nothing


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    db = sqlite3.connect(tmp_path / "ledger.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(AgentError, match="newer than this agent"):
        Ledger(tmp_path)


def test_sample_and_position_commit_together(ledger: Ledger) -> None:
    hour = ledger.record_sample(
        "requests", H + 60, Decimal(3), 60, {"counter": {"baseline": "9"}}, carry=True
    )
    assert hour == H
    assert ledger.position("requests") == {"counter": {"baseline": "9"}}
    with ledger.transaction() as db:
        assert [p.value for p in ledger.points(db, "requests", H)] == [Decimal(3)]


def test_a_failed_transaction_leaves_nothing(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError), ledger.transaction() as db:
        db.execute(
            "INSERT INTO samples (dimension, hour, t, value, span) VALUES ('x', 0, 0, '1', 1)"
        )
        raise RuntimeError("crash between the two writes")
    assert ledger.unsealed_sample_count() == 0


def test_late_sample_carries_into_the_next_open_hour(ledger: Ledger) -> None:
    seal_one(ledger, "requests", H)
    seal_one(ledger, "requests", H + 3600)
    hour = ledger.record_sample("requests", H + 100, Decimal(5), 60, {"p": 1}, carry=True)
    assert hour == H + 7200
    assert ledger.position("requests") == {"p": 1}


def test_late_sample_of_a_level_is_dropped_and_counted(ledger: Ledger) -> None:
    seal_one(ledger, "vcpus", H)
    assert ledger.record_sample("vcpus", H + 100, Decimal(5), 60, {"p": 2}, carry=False) is None
    assert ledger.unsealed_sample_count() == 0
    (status,) = ledger.dimension_status()
    assert status.dropped == 1
    assert ledger.position("vcpus") == {"p": 2}  # the position still advances: never re-read


def test_sealed_request_fields_never_change(ledger: Ledger) -> None:
    seal_one(ledger)
    for column, value in [
        ("quantity", "5"),
        ("client_token", "other"),
        ("timestamp", 1),
        ("hour", 0),
    ]:
        with (
            pytest.raises(sqlite3.IntegrityError, match="never change"),
            ledger.transaction() as db,
        ):
            db.execute(f"UPDATE hours SET {column} = ?", (value,))
    (h,) = ledger.pending()
    assert (h.quantity, h.client_token, h.timestamp) == (Quantity(4), "tok", H + 3540)


def test_transitions_move_only_pending_hours(ledger: Ledger) -> None:
    seal_one(ledger)
    ledger.begin_attempt("vcpus", H, H + 3900)
    ledger.mark_sent("vcpus", H, record_id="r1", now=H + 4000)
    late = dict(error="late", now=H + 5000)
    for transition in (
        functools.partial(ledger.reject, "vcpus", H, **late),
        functools.partial(ledger.expire, "vcpus", H, **late),
        functools.partial(ledger.mark_sent, "vcpus", H, record_id="r2", now=H + 5000),
        functools.partial(ledger.schedule_retry, "vcpus", H, error="late", next_attempt=H),
        functools.partial(ledger.hold, "vcpus", H, error="late", next_attempt=H),
        functools.partial(ledger.begin_attempt, "vcpus", H, H + 5000),
        functools.partial(ledger.expire, "other", H, **late),  # no such hour
    ):
        with pytest.raises(RuntimeError, match="is not pending"):
            transition()
    (h,) = ledger.hours()
    assert (h.state, h.record_id, h.attempts, h.last_error) == ("sent", "r1", 1, None)


def test_prune_keeps_90_days_and_all_pending(ledger: Ledger) -> None:
    seal_one(ledger, "a", H)
    seal_one(ledger, "b", H)
    ledger.mark_sent("a", H, record_id="r", now=H)
    ledger.prune(H + 91 * 86400)
    assert [h.dimension for h in ledger.hours()] == ["b"]


def test_clip_last_span_at_a_stop(ledger: Ledger) -> None:
    ledger.record_sample("vcpu_hours", H + 60, Decimal(2), 60, None, carry=True)
    ledger.record_sample("vcpu_hours", H + 120, Decimal(2), 60, None, carry=True)
    ledger.clip_last_span("vcpu_hours", H + 140)
    with ledger.transaction() as db:
        assert [p.span for p in ledger.points(db, "vcpu_hours", H)] == [60, 20]


def _ids(path: Path) -> list[str]:
    """The instance ids a closed ledger file names (immutable: no -wal or -shm made beside it)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)) as db:
        return [
            json.loads(v) for (v,) in db.execute("SELECT value FROM meta WHERE key = 'instance_id'")
        ]


def _old_ledger(path: Path) -> None:
    ledger = Ledger(path)
    ledger.update_meta(instance_id="i-1")
    ledger.close()


def test_replace_closed_keeps_the_old_file_and_puts_the_fresh_one_whole_in_place(
    tmp_path: Path,
) -> None:
    _old_ledger(tmp_path)
    moved = replace_closed(tmp_path, "instance-i-1", H, lambda f: f.update_meta(instance_id="i-2"))
    assert moved.name == f"ledger.db.instance-i-1.{H}"
    assert _ids(moved) == ["i-1"] and _ids(tmp_path / "ledger.db") == ["i-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db", moved.name]


def test_replace_closed_refuses_while_another_connection_keeps_the_wal(tmp_path: Path) -> None:
    _old_ledger(tmp_path)
    reader = sqlite3.connect(f"file:{tmp_path / 'ledger.db'}?mode=ro", uri=True)
    try:
        reader.execute("SELECT count(*) FROM meta").fetchone()  # opens the WAL index
        writer = Ledger(tmp_path)
        writer.update_meta(instance_id="i-1b")
        writer.close()  # not the last connection: the WAL stays
        assert (tmp_path / "ledger.db-wal").exists()
        with pytest.raises(LedgerInUse):
            replace_closed(tmp_path, "instance-i-1", H, lambda f: None)
    finally:
        reader.close()
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "ledger.db"
    assert list(tmp_path.glob("ledger.db.*")) == []
    assert Ledger(tmp_path).get_meta("instance_id") == "i-1b"  # its WAL still paired with it


def test_a_failed_fill_or_a_stop_between_link_and_rename_leaves_the_old_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _old_ledger(tmp_path)

    def broken(fresh: Ledger) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_closed(tmp_path, "instance-i-1", H, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db"]
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        replace_closed(tmp_path, "instance-i-1", H, lambda f: None)
    # the link was made, the rename was not: the old ledger is still the ledger
    assert _ids(tmp_path / "ledger.db") == ["i-1"] and len(list(tmp_path.glob("ledger.db.*"))) == 1
    monkeypatch.setattr(os, "replace", real)
    moved = replace_closed(tmp_path, "instance-i-1", H + 60, lambda f: None)
    assert [p.name for p in tmp_path.glob("ledger.db.*")] == [moved.name]  # the stale link dropped
    assert _ids(moved) == ["i-1"] and _ids(tmp_path / "ledger.db") == []


# -- migrating a ledger an older agent wrote --------------------------------------------------


def v1_ledger(path: Path, samples: list[tuple[str, float, str]]) -> None:
    """A ledger as the released agent (schema 1) left it, with `samples` unsealed."""
    from agent.ledger.migrations import _MIGRATIONS, _split_sql

    db = sqlite3.connect(path / "ledger.db")
    for statement in _split_sql(_MIGRATIONS[1]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.executemany(
        "INSERT INTO samples (dimension, hour, t, value, span) VALUES (?, ?, ?, ?, 60)",
        [(dim, H, t, value) for dim, t, value in samples],
    )
    db.commit()
    db.close()


def stored(ledger: Ledger) -> list[tuple[str, float, str]]:
    rows = ledger.db.execute("SELECT dimension, t, value FROM samples ORDER BY id").fetchall()
    return [(str(d), float(t), str(v)) for d, t, v in rows]


def test_migration_spreads_duplicate_instants_onto_free_ones(tmp_path: Path) -> None:
    """Three samples at one instant, and another already a microsecond later: the one moved
    there must not collide with it (the ledger would never open again)."""
    t = H + 60.0
    later = t + 0.000001
    old = [("x", t, "3"), ("x", t, "4"), ("x", later, "5"), ("x", t, "6"), ("y", t, "7")]
    v1_ledger(tmp_path, old)
    ledger = Ledger(tmp_path)
    assert ledger.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    rows = stored(ledger)
    assert [(d, v) for d, _, v in rows] == [(d, v) for d, _, v in old]  # none lost, none changed
    instants = [(d, t2) for d, t2, _ in rows]
    assert len(set(instants)) == len(instants)
    assert rows[0][1] == t and rows[4][1] == t  # the oldest at an instant keeps it
    assert all(t <= t2 < t + 0.00001 for _, t2, _ in rows)
    with ledger.transaction() as db:
        assert sorted(p.value for p in ledger.points(db, "x", H)) == [
            Decimal(3), Decimal(4), Decimal(5), Decimal(6)
        ]  # fmt: skip


def test_migration_of_many_samples_keeps_every_value(tmp_path: Path) -> None:
    """20,000 unsealed samples (a big v1 ledger, four to an instant per dimension) migrate,
    every value kept; benchmarks/ measure how long it takes."""
    old = []
    for i in range(20_000):
        instant = H + 60.0 * (i // 8) + (0.000001 if i % 8 == 6 else 0)  # t + 1 us taken
        old.append((f"d{i % 2}", instant, str(i)))
    v1_ledger(tmp_path, old)
    ledger = Ledger(tmp_path)
    rows = stored(ledger)
    assert [(d, v) for d, _, v in rows] == [(d, v) for d, _, v in old]
    assert len({(d, t) for d, t, _ in rows}) == len(rows)


@pytest.mark.parametrize("command", [["status"], ["report", "--since", "1d"]])
def test_a_ledger_an_older_agent_wrote_is_named_not_misread(
    tmp_path: Path, command: list[str]
) -> None:
    """status/report never migrate; a ledger still at an older schema gets one line saying so
    and how to migrate it (not a missing column blamed on permissions), exit 1."""
    from tests.billing import make_config
    from tests.conftest import run_cli

    cfg = make_config(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    v1_ledger(cfg.state_dir, [("vcpus", H + 60.0, "4")])
    result = run_cli(*command, "-c", str(cfg.source))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"schema 1, this agent is schema {SCHEMA_VERSION}" in line
    assert "systemctl start metering-agent" in line and "Traceback" not in result.stderr
    Ledger(cfg.state_dir).close()  # what the agent's start does: migrate
    assert run_cli(*command, "-c", str(cfg.source)).returncode == 0


def test_migration_7_keeps_sealed_hours_and_their_immutability(tmp_path: Path) -> None:
    """A schema-6 ledger with a pending and a sent hour: after the rebuild that adds `customer`,
    both read back unchanged (customer ''), the request fields still refuse an UPDATE, a held
    hour can still be re-issued, and a SaaS record sits beside an instance one."""
    from agent.ledger.migrations import _MIGRATION_STEPS, _MIGRATIONS, _split_sql

    db = sqlite3.connect(tmp_path / "ledger.db")
    for v in range(1, 7):
        if v in _MIGRATION_STEPS:
            _MIGRATION_STEPS[v](db)
        for statement in _split_sql(_MIGRATIONS[v]):
            db.execute(statement)
    db.execute("PRAGMA user_version = 6")
    for dim, state in (("a", "pending"), ("b", "sent")):
        db.execute(
            "INSERT INTO hours (dimension, hour, product_code, quantity, is_decimal, timestamp, "
            "client_token, samples, raw, state, sealed_at, next_attempt, allocations) "
            "VALUES (?, ?, 'p', '7', 0, ?, ?, 3, '7', ?, ?, ?, NULL)",
            (dim, H, H + 3599, f"tok-{dim}", state, H + 3600, H + 3600),
        )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    assert ledger.schema_version() == SCHEMA_VERSION
    hours = {h.dimension: h for h in ledger.hours()}
    assert {
        d: (h.state, h.quantity.text, h.client_token, h.customer) for d, h in hours.items()
    } == {
        "a": ("pending", "7", "tok-a", ""),
        "b": ("sent", "7", "tok-b", ""),
    }
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as tx:
        tx.execute("UPDATE hours SET quantity = '8' WHERE dimension = 'a'")
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as tx:
        tx.execute("UPDATE hours SET customer = 'x' WHERE dimension = 'a'")
    assert ledger.reissue("a", H, product_code="q", client_token="tok-new", now=H + 4000)
    with ledger.transaction() as tx:
        ledger.insert_sealed(
            tx, dimension="a", hour=H, product_code="p", quantity=hours["a"].quantity,
            timestamp=H + 3599, client_token="tok-c", samples=1, raw="7", sealed_at=H + 3600,
            next_attempt=H + 3600, customer="acme",
        )  # fmt: skip
    ledger.mark_sent("a", H, record_id="r-acme", now=H + 3700, customer="acme")
    after = {(h.customer, h.dimension): (h.state, h.product_code) for h in ledger.hours()}
    assert after[("", "a")] == ("pending", "q") and after[("acme", "a")] == ("sent", "p")


def test_customers_are_kept_removed_and_brought_back(tmp_path: Path) -> None:
    from agent.ledger.customers import Customer

    ledger = Ledger(tmp_path)
    acme = Customer("acme", "111122223333", "arn:aws:license-manager::1:license:l-1", "agmt-1",
                    None, "p", H)  # fmt: skip
    legacy = Customer("old", None, None, None, "cust-x", "p", H)
    assert ledger.add_customer(acme) and ledger.add_customer(legacy)
    assert not ledger.add_customer(acme)  # the same again: unchanged
    assert [c.label for c in ledger.customers()] == ["acme", "old"]
    assert legacy.legacy and not acme.legacy
    assert ledger.remove_customer("acme", H + 10) and not ledger.remove_customer("acme", H + 11)
    assert [c.label for c in ledger.customers()] == ["old"]
    assert ledger.customer("acme") == Customer(*[*acme.__dict__.values()][:-1], removed_at=H + 10)
    assert ledger.add_customer(acme)  # added again: back, idle zeros resume
    assert [c.label for c in ledger.customers()] == ["acme", "old"]
    with pytest.raises(sqlite3.IntegrityError):  # neither a license nor a legacy id
        ledger.add_customer(Customer("none", "111122223333", None, None, None, None, H))


# -- usage found unread (issue 21) -------------------------------------------------------------


def older_ledger(path: Path, version: int) -> sqlite3.Connection:
    """A ledger as an agent of schema `version` left it (open: the caller adds rows, commits)."""
    from agent.ledger.migrations import _MIGRATION_STEPS, _MIGRATIONS, _split_sql

    db = sqlite3.connect(path / "ledger.db")
    for v in range(1, version + 1):
        if v in _MIGRATION_STEPS:
            _MIGRATION_STEPS[v](db)
        for statement in _split_sql(_MIGRATIONS[v]):
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {version}")
    return db


def unread_rows(ledger: Ledger, dim: str) -> list[tuple[object, ...]]:
    return ledger.db.execute(
        "SELECT t, what, fix, amount FROM unread WHERE dimension = ? ORDER BY id", (dim,)
    ).fetchall()


def test_migration_8_keeps_each_dimensions_status_and_stores_unread_usage(tmp_path: Path) -> None:
    from agent.collectors import Unread

    db = older_ledger(tmp_path, 7)
    db.execute(
        "INSERT INTO dimension_status (dimension, last_t, last_value, last_error, error_t, "
        "errors, dropped) VALUES ('api', ?, '3', 'source missing', ?, 2, 1)",
        (H + 60, H + 60),
    )
    db.commit()
    db.close()
    old = Ledger(tmp_path, readonly=True)  # status on a ledger the agent has not migrated yet
    assert old.schema_version() == 7 and old.unread_usage() == []
    old.close()
    ledger = Ledger(tmp_path)
    assert ledger.schema_version() == SCHEMA_VERSION >= 8
    (api,) = ledger.dimension_status()
    assert (api.errors, api.dropped, api.last_error) == (2, 1, "source missing")
    assert ledger.unread_usage() == []
    lost = Unread("app.log.1 deleted unread", "read more often", 10)
    ledger.record_sample("api", H + 120, Decimal(1), 60, None, carry=True, increment=True,
                         unread=(lost,))  # fmt: skip
    assert unread_rows(ledger, "api") == [(H + 120, lost.what, lost.fix, 10)]


def test_unread_usage_commits_with_its_sample_and_position_or_not_at_all(tmp_path: Path) -> None:
    """A kill -9 between the read and the commit (here: the COMMIT never runs) stores neither
    the sample, nor the position past the loss, nor the loss: the next reading reports it again.
    Stored, it is kept whatever becomes of the value."""
    from agent.collectors import Unread
    from agent.ledger.dimensions import UnreadUsage

    lost = (Unread("gone", "fix it", 100), Unread("truncated", "use create", 0))

    class KilledAtCommit:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise KeyboardInterrupt  # the process dies here
            return self.db.execute(sql, *args)

        def executemany(self, sql: str, *args: object) -> object:
            return self.db.executemany(sql, *args)

    ledger = Ledger(tmp_path)
    real = ledger.db
    ledger.db = KilledAtCommit(real)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        ledger.record_sample("api", H + 60, Decimal(5), 60, {"offset": 50}, carry=True,
                             increment=True, unread=lost)  # fmt: skip
    real.close()
    ledger = Ledger(tmp_path)
    assert ledger.position("api") is None and ledger.unsealed_sample_count() == 0
    assert unread_rows(ledger, "api") == [] and ledger.unread_usage() == []
    ledger.record_sample("api", H + 60, Decimal(5), 60, {"offset": 50}, carry=True,
                         increment=True, unread=lost)  # fmt: skip
    assert ledger.position("api") == {"offset": 50} and ledger.unsealed_sample_count() == 1
    assert ledger.unread_usage() == [UnreadUsage("api", 2, 100, H + 60, "truncated", "use create")]
    # a level at an instant already stored, or for a sealed hour: the value is not stored, the
    # loss is (the position moved past it)
    ledger.record_sample("peak", H + 60, Decimal(1), 60, None, carry=False)
    ledger.record_sample("peak", H + 60, Decimal(1), 60, {"offset": 9}, carry=False,
                         unread=(Unread("a", "b", 7),))  # fmt: skip
    seal_one(ledger, "peak", H)
    ledger.record_sample("peak", H + 120, Decimal(1), 60, {"offset": 10}, carry=False,
                         unread=(Unread("c", "d", 1),))  # fmt: skip
    assert ledger.position("peak") == {"offset": 10}
    assert ledger.unread_usage() == [
        UnreadUsage("peak", 2, 8, H + 120, "c", "d"),  # the newest event's dimension first
        UnreadUsage("api", 2, 100, H + 60, "truncated", "use create"),
    ]
    assert ledger.unread_usage(since=H + 60) == [UnreadUsage("peak", 1, 1, H + 120, "c", "d")]
    ledger.prune(H + 61 + 90 * 86400)  # kept 90 days, like sealed hours
    assert ledger.unread_usage() == [UnreadUsage("peak", 1, 1, H + 120, "c", "d")]


def test_unsealed_hours_are_every_dimensions_past_hours_in_hour_order(ledger: Ledger) -> None:
    """The seal pass's question, answered by index seeks: every (dimension, hour) with samples
    before the given hour, by hour then dimension, whatever the open hour holds."""
    for name, t in [("zeta", H + 10), ("alpha", H + 30), ("mid", H + 20), ("alpha", H + 3600 + 5)]:
        ledger.record_sample(name, t, Decimal(1), 1.0, None, carry=True)
    for i in range(500):  # the open hour's samples: never in the answer
        ledger.record_sample("alpha", H + 7200 + i, Decimal(1), 1.0, None, carry=True)
    with ledger.transaction() as db:
        oracle = db.execute(
            "SELECT DISTINCT dimension, hour FROM samples WHERE hour < ? ORDER BY hour, dimension",
            (H + 7200,),
        ).fetchall()
        got = ledger.unsealed_hours(db, H + 7200)
    assert got == [(d, h) for d, h in oracle]
    assert got == [("alpha", H), ("mid", H), ("zeta", H), ("alpha", H + 3600)]
    with ledger.transaction() as db:
        assert ledger.unsealed_hours(db, H) == []


def test_a_rebuild_puts_the_copy_in_place_and_keeps_the_old_file_by_a_link(
    tmp_path: Path,
) -> None:
    """verify()'s last resort (the tables copied into a new file), on a ledger with committed
    rows: the copy replaces the ledger in one rename, the old file kept as ledger.db.damaged-*;
    while another connection keeps the WAL, nothing is replaced (LedgerDamaged, files as they
    were)."""
    ledger = Ledger(tmp_path)
    seal_one(ledger)
    reader = sqlite3.connect(f"file:{tmp_path / 'ledger.db'}?mode=ro", uri=True)
    try:
        reader.execute("SELECT count(*) FROM hours").fetchone()
        with pytest.raises(LedgerDamaged):
            ledger._rebuild(H)
    finally:
        reader.close()
    assert list(tmp_path.glob("ledger.db.*")) == [] and list(tmp_path.glob(".*")) == []
    ledger = Ledger(tmp_path)
    assert [h.quantity for h in ledger.pending()] == [FOUR]
    aside = ledger._rebuild(H)
    assert aside is not None and aside.name.startswith("ledger.db.damaged-") and ledger.reopen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db", aside.name]
    with contextlib.closing(Ledger(tmp_path)) as copy:
        assert [h.quantity for h in copy.pending()] == [FOUR]
