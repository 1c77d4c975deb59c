"""The daemon's own storage: whether it can store what it reads, and what it does when it cannot.

A reading, seal or position that the ledger cannot store puts the daemon in one of three states
(agent/ledger/faults.py): `disk full`, `ledger damaged`, `state dir gone`. Each is logged once when
it begins and once when it ends (never a traceback per round), named in health.json's `reason` and
`storage` (so `status` and `status --check` see it within the round), and the readings are kept in
memory (collecting/unstored.py) to be stored with their own instants when the ledger can store
again. Recovery is the daemon's own:
- disk full: each round tries to store what it kept; the first write that succeeds ends it;
- ledger damaged: each minute of clock time, REINDEX (damage in an index is rebuilt from the
  tables, nothing lost) and SQLite's quick_check; damage in a table stays until an operator stops
  the agent and runs `metering-agent reset-ledger --yes`;
- state dir gone: SQLite writes on into the deleted file, which this process still holds open, so
  nothing in it is lost yet: the directory is made again, the open ledger copied back into it
  (SQLite's backup), the state lock and the running-config copy taken again, and the daemon goes
  on with the restored file. Where the directory cannot be made (no permission), it stays in the
  state and says to restart the agent (systemd's StateDirectory= makes it again).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.clock import iso
from agent.collecting.unstored import MAX_PER_DIMENSION, Kept, Unstored
from agent.ledger.faults import DAMAGED, DISK_FULL, GONE, RESET, kind_of

log = logging.getLogger(__name__)

REPAIR_EVERY = 60.0  # clock seconds between repair attempts of a damaged ledger


class StateDirGone(FileNotFoundError):
    """The ledger's file is no longer at its path: the state dir was deleted (or the file was)."""


def fix_for(kind: str, state_dir: Path, ledger_path: Path) -> str:
    if kind == DISK_FULL:
        return f"free space on the file system of {state_dir}"
    if kind == DAMAGED:
        return f"stop the agent, then `{RESET}` moves {ledger_path} aside and `run` starts anew"
    return (
        f"the agent makes {state_dir} again and restores its ledger; if it cannot, restart it "
        "(systemctl restart metering-agent)"
    )


class Storage:
    """The storage state of one daemon and the readings it keeps until the ledger can take them."""

    def __init__(self, state_dir: Path, limit: int = MAX_PER_DIMENSION) -> None:
        self.state_dir = state_dir
        self.unstored = Unstored(limit)
        self.kind: str | None = None
        self.since: float | None = None
        self.detail = ""
        self._repaired_at: float | None = None
        self._let_go_logged: set[str] = set()

    @property
    def failing(self) -> bool:
        return self.kind is not None

    def failed(self, error: BaseException, now: float, ledger_path: Path) -> bool:
        """Note a storage failure (logged when the state begins or changes); False when `error`
        is not one (the caller handles it as before)."""
        kind = GONE if isinstance(error, StateDirGone) else kind_of(error)
        if kind is None:
            return False
        if kind != self.kind:
            if self.kind is None:
                self.since = now
            self.kind, self.detail = kind, str(error)
            log.error(
                "storage: %s since %s (%s): readings are kept in memory (at most %d per "
                "dimension) and stored with their own instants when it can store again; fix: %s",
                kind,
                iso(now),
                error,
                self.unstored.limit,
                fix_for(kind, self.state_dir, ledger_path),
            )
        return True

    def recovered(self, now: float) -> None:
        if self.kind is None:
            return
        log.info(
            "storage: %s is over (since %s, until %s): the readings kept in memory are stored "
            "with their own instants",
            self.kind,
            iso(self.since),
            iso(now),
        )
        self.kind, self.since, self.detail = None, None, ""

    def keep(self, kept: Kept) -> None:
        let_go = self.unstored.keep(kept)
        name = kept.dimension.name
        if let_go is None or name in self._let_go_logged:
            return
        self._let_go_logged.add(name)  # once per dimension and run; counted in health/status
        log.error(
            "dimension %s: more than %d readings kept in memory: %s",
            name,
            self.unstored.limit,
            "the oldest is folded into the next (its usage billed at that later instant)"
            if let_go == "moved"
            else "the oldest is dropped (its instant bills nothing); counted in status",
        )

    def may_repair(self, now: float) -> bool:
        """A damaged ledger is tried again at most once a minute (REINDEX reads every table)."""
        if self.kind != DAMAGED:
            return False
        if self._repaired_at is not None and now - self._repaired_at < REPAIR_EVERY:
            return False
        self._repaired_at = now
        return True

    def report(self, ledger_path: Path) -> dict[str, Any] | None:
        """health.json's `storage`: null when storing works and nothing was let go this run."""
        moved, dropped = dict(self.unstored.moved), dict(self.unstored.dropped)
        if self.kind is None and not moved and not dropped:
            return None
        kept = len(self.unstored)
        reason = None
        if self.kind is not None:
            reason = (
                f"{self.kind} since {iso(self.since)}: cannot store ({self.detail}); {kept} "
                f"reading(s) kept in memory; fix: {fix_for(self.kind, self.state_dir, ledger_path)}"
            )
        return {
            "state": self.kind,
            "since": iso(self.since),
            "reason": reason,
            "readings_in_memory": kept,
            "readings_folded": moved,  # increments folded into a later reading (usage kept)
            "readings_dropped": dropped,  # level readings let go past the bound
        }
