"""What the commands share: the config and clock their arguments name, the ledger opened for
reading only, a reading written for people."""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.aggregate import to_json
from agent.clock import Clock, iso, iso_hour
from agent.errors import AgentError
from agent.host import ownership
from agent.ledger.hours import SealedHour


def load_config(args: argparse.Namespace) -> Any:
    from agent.config import loader as config

    return config.load(config.resolve_path(args.config))


def make_clock(args: argparse.Namespace) -> Clock:
    try:
        return Clock.from_spec(getattr(args, "clock", None))
    except (TypeError, ValueError):
        raise AgentError(f"--clock {args.clock!r}: expected RATE[:ORIGIN[:WALL0]]") from None


def first_reading_line(state_dir: Path, instance_id: str | None) -> str:
    """One line for `check` and `status`: what decides where a log's first reading starts (the
    image record at an instance's first boot, else `start_at`)."""
    from agent.collectors import Sources, imagerecord

    return imagerecord.describe(Path(state_dir), instance_id, Sources().boot_id())


def ledger_instance(state_dir: Path) -> str | None:
    """The instance id the ledger names, if a ledger can be read; None otherwise."""
    try:
        ledger = open_ledger_readonly(state_dir, "check")
    except AgentError:
        return None
    if ledger is None:
        return None
    try:
        found = ledger.get_meta("instance_id")
        return str(found) if found else None
    except sqlite3.Error:
        return None
    finally:
        ledger.close()


def open_ledger_readonly(state_dir: Path, command: str = "status") -> Any:
    """The ledger for reading, or None when there is none yet; never creates or writes one.

    A read-only open never migrates: a ledger an older agent wrote (a lower schema version) is
    named as such, with how to migrate it, instead of failing on the first missing column.
    """
    from agent.ledger import Ledger
    from agent.ledger.database import LEDGER_FILE
    from agent.ledger.faults import DAMAGED, LedgerDamaged, kind_of, refuse_damaged
    from agent.ledger.migrations import SCHEMA_VERSION

    path = Path(state_dir) / LEDGER_FILE
    try:
        if not path.exists():
            return None
    except PermissionError:
        raise ownership.unreadable(Path(state_dir), command) from None
    if not os.access(path, os.R_OK):
        raise ownership.unreadable(Path(state_dir), command)
    # an empty file, or one whose -wal is gone, is damaged, not an old schema to migrate
    refuse_damaged(path)
    try:
        ledger = Ledger(state_dir, readonly=True)
        version = ledger.schema_version()
    except sqlite3.Error as e:
        if not os.access(state_dir, os.W_OK) and "unable to open" in str(e):
            raise ownership.unreadable(Path(state_dir), command) from None
        if kind_of(e) == DAMAGED:
            raise LedgerDamaged(path, str(e)) from None
        raise AgentError(f"{state_dir}/{LEDGER_FILE}: cannot read the ledger: {e}") from None
    if version < SCHEMA_VERSION:
        ledger.close()
        raise AgentError(
            f"{state_dir}/{LEDGER_FILE}: the ledger is schema {version}, this agent is schema "
            f"{SCHEMA_VERSION}; start the agent once (systemctl start metering-agent) to migrate it"
        )
    return ledger


def hour_row(h: SealedHour) -> dict[str, Any]:
    """One sealed hour as `status` and `report` show it (table, CSV and JSON)."""
    return {
        "hour": iso_hour(h.hour),
        "dimension": h.dimension,
        "quantity": h.quantity.text,
        "state": h.state,
        "record_id": h.record_id,
        "timestamp": iso(h.timestamp),
        "sent_at": iso(h.done_at) if h.state == "sent" else None,
        "product_code": h.product_code,
        "attempts": h.attempts,
        "last_error": h.last_error,
        "reissues": h.reissues,  # re-sent under a fixed product code, new ClientToken
        "allocations": to_json(h.allocations),  # UsageAllocations as sent; [] for none
    }


def table(cells: list[list[str]]) -> list[str]:
    """Aligned text columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
