"""The ledger: the only SQLite user. Each module stores one kind of thing through one connection
(database.py) and `Ledger` puts them together:

- samples.py: unsealed usage (samples, collector positions, usage held for an unknown customer)
- dimensions.py: per dimension, collector errors, seal errors and usage found unread
- hours.py: sealed records, and which are pending
- transitions.py: a sealed record's send transitions
- send_state.py: the send state machine
- customers.py: SaaS mode's customers
- subscriptions.py: SaaS mode's subscription states (Marketplace's notifications)
- migrations.py: the schema, one `user_version` step at a time
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from agent.host.ownership import adopt
from agent.ledger.customers import Customers
from agent.ledger.database import LEDGER_FILE, Database
from agent.ledger.dimensions import Dimensions
from agent.ledger.faults import (
    DAMAGED,
    LedgerDamaged,
    damaged_name,
    kind_of,
    refuse_damaged,
    same_file,
)
from agent.ledger.hours import Hours
from agent.ledger.migrations import migrate
from agent.ledger.samples import Samples
from agent.ledger.send_state import SendStates
from agent.ledger.subscriptions import Subscriptions
from agent.ledger.transitions import Transitions


class Ledger(
    Samples, Dimensions, Hours, Transitions, SendStates, Customers, Subscriptions, Database
):
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
            refuse_damaged(self.path)  # an empty file, or its -wal gone: never a new ledger
            if not self.path.exists():
                self._create()
            self.db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30
            )
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: a transaction that returned is on disk, even across power loss.
                self.db.execute("PRAGMA synchronous=FULL")
                migrate(self)
            except sqlite3.DatabaseError as e:
                if kind_of(e) != DAMAGED:
                    raise
                self.db.close()
                raise LedgerDamaged(self.path, str(e)) from None
            adopt(Path(state_dir), *(Path(f"{self.path}{x}") for x in ("", "-wal", "-shm")))
        self.opened = self.identify()
        self.reopen = False  # verify() rebuilt the file: open a new Ledger on it
        self.db.execute("PRAGMA busy_timeout=30000")

    def _create(self) -> None:
        """A new ledger appears whole: built and migrated under a temporary name, then linked into
        place (another process that made one first wins). No reader ever sees a ledger file that
        exists but has no schema yet."""
        tmp = self.path.with_name(f".{LEDGER_FILE}.{os.getpid()}.{threading.get_ident()}.new")
        tmp.unlink(missing_ok=True)
        self.db = sqlite3.connect(tmp, isolation_level=None, timeout=30)
        try:
            self.db.execute("PRAGMA synchronous=FULL")
            migrate(self)
        finally:
            self.db.close()
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def identify(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def gone(self) -> bool:
        """Whether the file this connection writes is no longer the ledger at its path (deleted
        with its state dir, or replaced): SQLite goes on writing to the unlinked file."""
        return not same_file(self.path, self.opened)

    def verify(self, now: float) -> str | None:
        """`run`'s start: SQLite's quick_check of every page. A damaged ledger whose tables read
        whole is repaired, nothing lost: REINDEX rebuilds damaged indexes in place; else the
        tables are copied into a new file (rows read from the tables only, indexes made anew), the
        damaged one kept as `ledger.db.damaged-<time>`, and this connection closed (`reopen`).
        What was done is returned, to be logged; a table that cannot be read raises
        LedgerDamaged."""
        problem = self.quick_check()
        if problem is None:
            return None
        if self.repair():
            return f"its indexes were damaged ({problem}); rebuilt (REINDEX), nothing lost"
        aside = self._rebuild(now)
        if aside is None:
            raise LedgerDamaged(self.path, problem)
        return (
            f"it was damaged ({problem}); its tables were copied into a new ledger, "
            f"nothing lost; the damaged file is kept as {aside.name}"
        )

    def _rebuild(self, now: float) -> Path | None:
        """The tables into a new file put in the ledger's place; the damaged one moved aside
        (its name returned), this connection closed. None when a table cannot be read."""
        tmp = self.path.with_name(f".{LEDGER_FILE}.{os.getpid()}.rebuilt")
        tmp.unlink(missing_ok=True)
        try:
            with self._lock:
                _copy_tables(self.db, tmp)
            copy = sqlite3.connect(tmp)
            try:
                whole = copy.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            finally:
                copy.close()
        except sqlite3.DatabaseError:
            whole = False
        if not whole:
            tmp.unlink(missing_ok=True)
            return None
        self.db.close()  # the last connection: its WAL is checkpointed and removed
        self.reopen = True
        aside = damaged_name(self.path, now)
        try:
            install(tmp, self.path, aside)
        except LedgerInUse as e:
            raise LedgerDamaged(
                self.path, f"its copy could not be put in its place ({e}); stop that process"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        return aside

    def repair(self) -> bool:
        """REINDEX, then quick_check again: whether the ledger is whole now."""
        with self._lock:
            try:
                self.db.execute("REINDEX")
            except sqlite3.DatabaseError:
                return False
        return self.quick_check() is None

    def quick_check(self) -> str | None:
        """SQLite's quick_check: None when whole, else what it found (or the error it raised)."""
        with self._lock:
            try:
                rows = self.db.execute("PRAGMA quick_check").fetchall()
            except sqlite3.DatabaseError as e:
                return str(e)
        found = [str(r[0]).replace("\n", "; ") for r in rows]
        return None if found == ["ok"] else "; ".join(found[:3])

    def copy_to(self, path: Path) -> None:
        """Write the whole database this connection reads (even an unlinked one) to `path`
        (SQLite's online backup), as a new file linked into place only when complete; never over
        a file already there (FileExistsError)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.restore")
        tmp.unlink(missing_ok=True)
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            with self._lock:
                self.db.backup(target)
        finally:
            target.close()
        try:
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class LedgerInUse(OSError):
    """The closed ledger still has a write-ahead log or its index: another process has it open."""


def replace_closed(
    state_dir: Path, reason: str, now: float, fill: Callable[[Ledger], None]
) -> Path:
    """Put a fresh ledger, filled by `fill`, in the place of the closed one, which is kept as
    `ledger.db.<reason>.<time>` (returned). The fresh one is built whole in a scratch folder, then
    the old file is linked to its new name and the fresh one renamed over the ledger's: a reader
    and a crash at any instant find either the old ledger, whole, or the fresh one, whole.

    Why the old one must have no `-wal`/`-shm` left (LedgerInUse otherwise, nothing changed): a
    write-ahead log is paired with whatever file bears the ledger's name, so one left behind would
    be replayed into the fresh ledger. Closing the last connection checkpoints and removes both;
    they remain only while another process (a `status`) has the ledger open, and the caller tries
    again later. A link left by a crash between the two steps is dropped on the next attempt."""
    src = Path(state_dir) / LEDGER_FILE
    _refuse_open(src)  # before the work of filling a fresh one (install asks again)
    work = Path(state_dir) / f".{LEDGER_FILE}.fresh"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        fresh = Ledger(work)
        try:
            fill(fresh)
        finally:
            fresh.close()
        dest = src.with_name(f"{LEDGER_FILE}.{reason}.{int(now)}")
        install(work / LEDGER_FILE, src, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    adopt(Path(state_dir), src, dest)
    return dest


def install(built: Path, src: Path, dest: Path) -> None:
    """The closed database `built` renamed over the closed ledger `src`, which stays as `dest`
    (a link made first): at every instant `src` is one whole ledger. LedgerInUse, nothing changed,
    while either still has a `-wal` or `-shm` (see replace_closed)."""
    _refuse_open(src)
    _refuse_open(built)
    _drop_stale_links(src)
    os.link(src, dest)
    os.replace(built, src)
    _fsync_dir(src.parent)


def _refuse_open(path: Path) -> None:
    """LedgerInUse while the database at `path` has a `-wal` or `-shm` beside it."""
    for suffix in ("-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            raise LedgerInUse(f"{path}{suffix} exists: another process has it open")


def _drop_stale_links(src: Path) -> None:
    """Other names of the ledger's own file (`ledger.db.*` links from an attempt that stopped
    between its link and its rename): the file is still the ledger, not a ledger moved aside."""
    st = src.stat()
    for other in src.parent.glob(f"{LEDGER_FILE}.*"):
        info = other.lstat()
        if (info.st_dev, info.st_ino) == (st.st_dev, st.st_ino):
            other.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_tables(db: sqlite3.Connection, target: Path) -> None:
    """Every table's rows into a new database at `target`, read from the tables' own pages; the
    indexes and triggers made anew there. (VACUUM INTO and an INSERT ... SELECT without WHERE
    copy index pages as they are, damage included.)"""
    schema = db.execute(
        "SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY rowid"
    ).fetchall()
    version = db.execute("PRAGMA user_version").fetchone()[0]
    fresh = sqlite3.connect(target, isolation_level=None)
    try:
        for kind, _name, sql in schema:
            if kind == "table":
                fresh.execute(sql)
        fresh.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        fresh.close()
    db.execute("ATTACH DATABASE ? AS fresh", (str(target),))
    try:
        for kind, name, _sql in schema:
            if kind == "table" and not name.startswith("sqlite_"):
                quoted = '"' + name.replace('"', '""') + '"'
                db.execute(f"INSERT INTO fresh.{quoted} SELECT * FROM main.{quoted} WHERE 1")
    finally:
        db.execute("DETACH DATABASE fresh")
    fresh = sqlite3.connect(target, isolation_level=None)
    try:
        for kind, _name, sql in schema:
            if kind in ("index", "trigger", "view"):
                fresh.execute(sql)
    finally:
        fresh.close()
