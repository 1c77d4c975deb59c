"""The systemd-sleep hook's work: `python -m agent.commands.sleep pre|post KIND`.

systemd-sleep(8) runs every executable in its system-sleep directory with `pre` before the
system suspends or hibernates and `post` after it resumes (KIND: suspend, hibernate,
hybrid-sleep, suspend-then-hibernate); the package's hook (packaging/system-sleep/metering-agent)
runs this module. It is not a `metering-agent` command: SPEC's command table has none for it.

Both phases send SIGUSR1 to the `run` that holds the config's state lock (daemon/wake.py: seal
what ended, then send every pending record now, whatever its send slot). `pre` then waits until
the ledger has none of the mode's records pending, for at most WAIT seconds, so the sealed hours
leave before the machine stops and a sleep is never held long; whatever is still pending then
stays pending and goes after the resume. Without a running agent there is nothing to ask.

Exit 0 whatever the sending did (systemd-sleep goes on anyway, and logs what this prints);
1 with one line for what a user can fix (the phase, the config, the ledger).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from agent.commands.common import open_ledger_readonly
from agent.commands.status import daemon_state
from agent.config import load
from agent.config.loader import resolve_path
from agent.daemon.wake import SLEEP_FLUSH
from agent.errors import EX_OK, AgentError
from agent.modes.choose import mode_for
from agent.modes.mode import Mode

WAIT = float(SLEEP_FLUSH)  # seconds `pre` waits at most: the daemon's flush gets as long
POLL = 0.2
PHASES = ("pre", "post")


def settled(state_dir: Path, mode: Mode) -> bool:
    """Whether nothing more can leave before the sleep: no record of the mode pending, or
    sending paused (not authorized, or the ledger's instance not verified)."""
    ledger = open_ledger_readonly(state_dir, "the sleep hook")
    if ledger is None:
        return True
    try:
        state = ledger.send_state()
        if state.authorized is False or state.identity_unverified:
            return True
        return not mode.pending_bounds(ledger)
    finally:
        ledger.close()


def hook(phase: str, kind: str, config: Path | None = None, wait: float = WAIT) -> str:
    """Ask the running agent to send now; for `pre`, wait for its pending records. The line
    to print (the journal keeps it)."""
    cfg = load(resolve_path(None if config is None else str(config)))
    state_dir = Path(cfg.state_dir)
    running = daemon_state(state_dir)
    if not running["running"] or running["pid"] is None:
        return f"metering-agent: {phase} {kind}: no agent runs for {state_dir}; nothing to send"
    pid = int(running["pid"])
    mode = mode_for(cfg)
    began = time.monotonic()
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:  # it stopped meanwhile: its stop flush sent what it could
        return f"metering-agent: {phase} {kind}: agent pid {pid} stopped; nothing to send"
    if phase == "post":
        return f"metering-agent: post {kind}: asked agent pid {pid} to send what is due now"
    while not settled(state_dir, mode):
        if time.monotonic() - began >= wait:
            left = _pending_hours(state_dir)
            return (
                f"metering-agent: pre {kind}: {left} hour(s) still pending after {wait:.0f} s; "
                "they stay pending and are sent after the resume"
            )
        time.sleep(POLL)
    return (
        f"metering-agent: pre {kind}: agent pid {pid} has nothing pending "
        f"({time.monotonic() - began:.1f} s)"
    )


def _pending_hours(state_dir: Path) -> int:
    ledger = open_ledger_readonly(state_dir, "the sleep hook")
    if ledger is None:
        return 0
    try:
        return int(ledger.pending_hour_count())
    finally:
        ledger.close()


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in PHASES:
        print(
            f"metering-agent sleep hook: expected pre|post and the sleep kind, found "
            f"{' '.join(argv) or 'nothing'} (systemd-sleep runs it so)",
            file=sys.stderr,
        )
        return 1
    kind = argv[1] if len(argv) > 1 else "sleep"
    try:
        print(hook(argv[0], kind), flush=True)
    except AgentError as e:
        print(f"metering-agent sleep hook: {e}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:  # a damaged ledger: the agent's health says so; the sleep goes on
        print(f"metering-agent sleep hook: the ledger cannot be read ({e}); not waiting",
              file=sys.stderr)  # fmt: skip
        return 1
    return EX_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
