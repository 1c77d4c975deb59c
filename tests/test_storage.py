"""The agent's own storage failing (issue 23 §4): errors classified, damaged files refused, readings
kept in memory (bounded) and stored with their own instants, reset-ledger. The real daemon against
a full tmpfs, damaged pages and a deleted state dir: tests/test_e2e_storage.py."""

from __future__ import annotations

import errno
import io
import json
import logging
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.collecting.sampling import Sample
from agent.collecting.unstored import Kept, Unstored
from agent.commands import reset_ledger
from agent.errors import AgentError, LockHeld
from agent.host.locks import StateLock
from agent.ledger import Ledger
from agent.ledger.faults import DAMAGED, DISK_FULL, GONE, LedgerDamaged, kind_of, refuse_damaged
from agent.sending import health
from tests.billing import H
from tests.fakes import FakeClock, FakePsutil
from tests.test_daemon import daemon_for, run_round


class Dim:
    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.collector = type("C", (), {"kind": kind})()


def sample(t: float, value: int, position: int) -> Sample:
    return Sample("d", t, Decimal(value), Decimal(value), {"offset": position})


def test_past_the_bound_increments_fold_and_levels_drop() -> None:
    kept = Unstored(limit=2)
    lines, cpus = Dim("lines", "increment"), Dim("cpus", "level")
    for i in range(4):
        kept.keep(Kept(lines, H + i, sample(H + i, 10 + i, 100 * (i + 1))))
        kept.keep(Kept(cpus, H + i, sample(H + i, 4, 0)))
    assert kept.moved == {"lines": 2} and kept.dropped == {"cpus": 2}
    oldest = kept.oldest("lines")
    assert oldest is not None and oldest.t == H + 2
    assert oldest.sample.value == 10 + 11 + 12  # no line lost, billed at the later instant
    assert kept.position("lines") == {"offset": 400}  # the next read starts after the newest
    total = []
    while (k := kept.oldest("lines")) is not None:
        total.append(k.sample.value)
        kept.stored("lines")
    assert sum(total) == 10 + 11 + 12 + 13


def test_sqlite_errors_name_the_storage_state(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 500)
    with pytest.raises(sqlite3.DatabaseError) as raised:
        sqlite3.connect(garbage).execute("SELECT * FROM sqlite_schema").fetchall()
    assert kind_of(raised.value) == DAMAGED
    db = sqlite3.connect(tmp_path / "small.db", isolation_level=None)
    db.execute("CREATE TABLE t (x TEXT)")
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as full:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (?)", ("x" * 4000,))
    assert kind_of(full.value) == DISK_FULL
    assert kind_of(OSError(errno.ENOSPC, "No space left on device")) == DISK_FULL
    assert kind_of(FileNotFoundError(errno.ENOENT, "gone")) == GONE
    assert kind_of(ValueError("x")) is None


def test_an_empty_ledger_and_one_whose_wal_is_gone_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"")
    with pytest.raises(LedgerDamaged, match=r"0 bytes.*reset-ledger --yes"):
        Ledger(tmp_path)
    (tmp_path / "ledger.db").unlink()
    # a writer killed before it checkpointed: its -wal and -shm stay
    code = (
        "import sys; sys.path.insert(0, '.'); from agent.ledger import Ledger; import os\n"
        f"l = Ledger('{tmp_path}'); l.update_meta(instance_id='i-1'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    refuse_damaged(tmp_path / "ledger.db")  # whole: nothing said
    (tmp_path / "ledger.db-wal").unlink()
    with pytest.raises(LedgerDamaged, match=r"ledger\.db-wal is gone"):
        Ledger(tmp_path)


def test_reset_ledger_moves_only_a_damaged_ledger_and_never_under_run(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    with pytest.raises(AgentError, match="not damaged"):
        reset_ledger.reset(tmp_path, True, H)
    (tmp_path / "ledger.db").write_bytes(b"")
    with pytest.raises(AgentError, match="--yes"):
        reset_ledger.reset(tmp_path, False, H)
    lock = StateLock(tmp_path)
    lock.acquire()
    with pytest.raises(LockHeld, match="`run` is active"):
        reset_ledger.reset(tmp_path, True, H)
    assert (tmp_path / "ledger.db").exists()
    assert lock._file is not None
    lock._file.close()  # `run` stopped
    out = io.StringIO()
    assert reset_ledger.reset(tmp_path, True, H, out) == 0
    assert not (tmp_path / "ledger.db").exists()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(H))
    assert [p.name for p in tmp_path.glob("ledger.db.damaged-*Z")] == [f"ledger.db.damaged-{stamp}"]
    Ledger(tmp_path).close()  # the next run starts a new one


def _full(ledger: Ledger, full: dict[str, bool]) -> None:
    """The ledger refuses every write as SQLite does on a full disk (SQLITE_FULL), while `full`."""

    def refusing(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if full["on"]:
                error = sqlite3.OperationalError("database or disk is full")
                error.sqlite_errorcode = 13  # type: ignore[attr-defined]
                raise error
            return method(*args, **kwargs)

        return call

    for name in ("record_sample", "record_collector_error", "note_storage_works", "transaction"):
        setattr(ledger, name, refusing(getattr(ledger, name)))


def test_a_full_disk_across_a_boundary_bills_each_reading_in_its_own_hour(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(H - 180)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    full = {"on": False}
    _full(d.ledger, full)
    for minute in range(6):  # H-3m .. H+2m; full from H-2m to H+1m
        full["on"] = minute in (1, 2, 3, 4)
        run_round(d)
        ps.user_list = [*ps.user_list, object()]  # +1 request each minute
        clock.advance(60)
        if minute in (1, 2, 3, 4):
            written = json.loads((d.state_dir / "health.json").read_text())
            assert written["ok"] is False and written["storage"]["state"] == "disk full"
            assert d.ledger.hours() == []  # nothing sealed while readings wait in memory
    written = json.loads((d.state_dir / "health.json").read_text())
    assert written["ok"] is True and written["storage"] is None
    hours = {(h.dimension, h.hour): h.quantity.value for h in d.ledger.hours()}
    # readings at H-3m (baseline), H-2m, H-1m; the two at H-2m and H-1m were taken while full
    assert hours[("requests", H - 3600)] == 2
    assert hours[("vcpus", H - 3600)] == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("storage: disk full since" in m for m in messages) == 1
    assert sum("storage: disk full is over" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_health_names_the_storage_state_and_a_sender_keeps_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    storage = {"state": "disk full", "since": "x", "reason": "disk full since x: ...",
               "readings_in_memory": 3, "readings_folded": {}, "readings_dropped": {}}  # fmt: skip
    data = health.write(tmp_path, ledger, H, storage=storage)
    assert data["ok"] is False and data["reason"].startswith("disk full since")
    again = health.write(tmp_path, ledger, H)  # the sender child does not know: it keeps it
    assert again["storage"] == storage and again["ok"] is False
    cleared = health.write(tmp_path, ledger, H, storage=None)
    assert cleared["ok"] is True and cleared["storage"] is None


def test_a_reload_while_the_disk_is_full_is_refused_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP with a dimension billed differently, while readings wait in memory: its hour cannot
    be sealed as sampled without them, so the reload is refused (one line) and the running config
    kept; once the disk has room, the kept readings are stored and billed in their hour."""
    caplog.set_level(logging.INFO)
    clock = FakeClock(H + 600)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    full = {"on": False}
    _full(d.ledger, full)
    run_round(d)  # the baseline
    full["on"] = True
    ps.user_list = [*ps.user_list, object(), object()]  # +2 requests
    clock.advance(60)
    run_round(d)  # kept in memory
    assert d.storage.failing
    source = Path(d.config.source)
    text = source.read_text()
    changed = text.replace(
        "metric: users, counter: true}", "metric: users, counter: true}\n    scale: 2"
    )
    assert changed != text
    source.write_text(changed)
    before = d.config
    d.reload()
    assert d.config is before  # kept
    assert any(
        "reload of" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records
    )
    full["on"] = False
    clock.advance(3600)
    run_round(d)
    hours = {(h.dimension, h.hour): h.quantity.value for h in d.ledger.hours()}
    assert hours[("requests", H)] == 2
    assert not any(r.exc_info for r in caplog.records)


def test_a_damaged_ledger_under_the_send_tick_is_a_state_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The send tick (and the main loop: the sleep hook's flush, the start-up check) read the
    ledger: a damaged page there makes health not ok, logged once, and the tick goes on."""
    caplog.set_level(logging.INFO)
    clock = FakeClock(H + 600)
    d = daemon_for(tmp_path, clock, FakePsutil())
    real = d.ledger.send_state

    def damaged() -> Any:
        error = sqlite3.DatabaseError("database disk image is malformed")
        error.sqlite_errorcode = 11  # type: ignore[attr-defined]
        raise error

    d.ledger.send_state = damaged  # type: ignore[method-assign]
    d.send_tick()
    d.send_tick()
    written = json.loads((d.state_dir / "health.json").read_text())
    assert written["ok"] is False and written["storage"]["state"] == "ledger damaged"
    assert not any(r.exc_info for r in caplog.records)
    d.ledger.send_state = real  # type: ignore[method-assign]
    d.send_tick()
