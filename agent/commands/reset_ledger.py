"""`metering-agent reset-ledger --yes`: move a damaged ledger aside so that the next `run` starts a
new one.

Why a command: `run` never replaces a ledger file that exists but is empty or unreadable (its
pending hours may be salvageable, and a new ledger would bill the open hour again from zero); it
exits 1 naming the file and this command. Starting over is the operator's decision, made on
purpose. The damaged file is kept as `ledger.db.damaged-<time>` (with its `-wal` and `-shm`, so
SQLite still reads it whole), never deleted. Refused while `run` holds the state dir, and for a
ledger that is not damaged (moving it would lose its unsent hours for nothing).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
import sys
from pathlib import Path
from typing import IO, Any

from agent.clock import Clock
from agent.commands.common import load_config
from agent.errors import AgentError, LockHeld
from agent.ledger import Ledger
from agent.ledger.database import LEDGER_FILE
from agent.ledger.faults import LedgerDamaged, damaged_name, refuse_damaged

LOCKS = ("lock", "send.lock")


def hold(path: Path) -> IO[str] | None:
    """The flock on `path`, so that no `run` or sender starts while the ledger moves; LockHeld
    when one holds it (the file says which process)."""
    try:
        f: IO[str] = open(path)  # noqa: SIM115 - held until the caller closes it
    except FileNotFoundError:
        return None
    except OSError as e:  # the unit's UMask makes the lock 0600, the service user's
        raise AgentError(f"cannot open {path}: {e.strerror}; run reset-ledger as root") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "unknown"
        f.close()
        raise LockHeld(
            f"`run` is active (pid and version: {holder}; it holds {path}): stop it first "
            "(systemctl stop metering-agent), then run reset-ledger --yes again"
        ) from None
    return f


def damage(path: Path) -> str | None:
    """What is wrong with the ledger file at `path`, or None when SQLite finds it whole."""
    try:
        refuse_damaged(path)
    except LedgerDamaged as e:
        return str(e)
    try:
        ledger = Ledger(path.parent, readonly=True)
    except sqlite3.Error as e:
        return str(e)
    try:
        return ledger.quick_check()
    finally:
        ledger.close()


def reset(state_dir: Path, yes: bool, now: float, out: Any = None) -> int:
    out = out or sys.stdout
    if not yes:
        raise AgentError(
            "reset-ledger moves the ledger aside and the next `run` starts a new one: pass --yes"
        )
    guards = [hold(state_dir / name) for name in LOCKS]
    try:
        path = state_dir / LEDGER_FILE
        if not path.exists():
            print(f"{path}: no ledger; nothing to move", file=out)
            return 0
        problem = damage(path)
        if problem is None:
            raise AgentError(
                f"{path} is not damaged (SQLite's quick_check finds it whole): nothing moved; "
                "its unsent hours would be lost for nothing"
            )
        dest = damaged_name(path, now)
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if part.exists():
                os.replace(part, Path(f"{dest}{suffix}"))
        print(f"{path}: damaged ({problem})", file=out)
        print(f"moved to {dest}; the next `run` starts a new ledger", file=out)
        return 0
    finally:
        for guard in guards:
            if guard is not None:
                guard.close()


def cmd_reset_ledger(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    return reset(Path(cfg.state_dir), args.yes, Clock().time())
