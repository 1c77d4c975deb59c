"""Running the real `metering-agent run` process for end-to-end tests.

Hour boundaries are crossed for real: either under libfaketime (the build vendored in PyPI's
`libfaketime` package; Debian 12's 0.9.10 breaks time.sleep with FAKETIME_DONT_FAKE_MONOTONIC) with
the wall clock shifted to a few seconds before an hour, or with the agent's own accelerated clock
shared with an in-process emulator for multi-hour outages.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import libfaketime

from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from tests.conftest import ROOT


def faketime_lib() -> str:
    base = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src"
    lib = base / "libfaketime.so.1"
    if not lib.exists():
        raise RuntimeError(f"libfaketime build not found at {lib}")
    return str(lib)


def offset_to_before_boundary(lead: float) -> int:
    """A FAKETIME offset (seconds, <= 0) that puts the clock `lead` s before an hour boundary.

    The boundary chosen is the start of the current real hour, so faked time is never ahead of the
    emulator's real clock (which would be a Timestamp from the future)."""
    now = time.time()
    target = now - now % 3600 - lead
    return int(target - now)


class Agent:
    """One `metering-agent run` child in its own process group (so kill -9 takes its sender too)."""

    def __init__(self, config: Path, env: dict[str, str], extra: list[str] | None = None) -> None:
        self.config = config
        self.env = env
        self.extra = extra or []
        self.proc: subprocess.Popen[str] | None = None
        self.log = config.parent / "agent.log"

    def start(self) -> Agent:
        full = dict(os.environ)
        full.update(self.env)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config), *self.extra],
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
                text=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """Power loss: SIGKILL the daemon and any sender child it has running."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def faketime_env(offset: int, imds_url: str) -> dict[str, str]:
    return {
        "LD_PRELOAD": faketime_lib(),
        "FAKETIME": f"{offset:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url,
    }


def wait_for(
    what: str, condition: Callable[[], Any], timeout: float, agent: Agent | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if agent is not None and not agent.alive() and agent.proc is not None:
            raise AssertionError(
                f"agent exited ({agent.proc.returncode}) while waiting for {what}:\n"
                + agent.output()[-4000:]
            )
        time.sleep(0.2)
    tail = agent.output()[-4000:] if agent else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def ledger_hours(state_dir: Path) -> list[SealedHour]:
    if not (state_dir / "ledger.db").exists():
        return []
    ledger = Ledger(state_dir, readonly=True)
    try:
        return ledger.hours()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the daemon is still creating it
            return []
        raise
    finally:
        ledger.close()


def ledger_samples(state_dir: Path) -> int:
    if not (state_dir / "ledger.db").exists():
        return 0
    ledger = Ledger(state_dir, readonly=True)
    try:
        return ledger.unsealed_sample_count()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the daemon is still creating it
            return 0
        raise
    finally:
        ledger.close()


def stored_total(state_dir: Path, dimension: str, hour: int | None = None) -> Decimal:
    """The sum of a dimension's stored (unsealed) sample values, of one hour if given: for a log
    counter, the lines read so far."""
    if not (state_dir / "ledger.db").exists():
        return Decimal(0)
    where, args = ("AND hour = ?", (dimension, hour)) if hour is not None else ("", (dimension,))
    try:
        db = sqlite3.connect(f"file:{state_dir / 'ledger.db'}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                f"SELECT value FROM samples WHERE dimension = ? {where}", args
            ).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the daemon is still creating it
            return Decimal(0)
        raise
    return sum((Decimal(v) for (v,) in rows), Decimal(0))


def newest_instant(state_dir: Path) -> float | None:
    """The instant (agent clock) of the oldest among each dimension's newest stored sample: every
    dimension has stored a round at or after it. None before each has one."""
    if not (state_dir / "ledger.db").exists():
        return None
    ledger = Ledger(state_dir, readonly=True)
    try:
        last = [d.last_t for d in ledger.dimension_status()]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the daemon is still creating it
            return None
        raise
    finally:
        ledger.close()
    return min(last) if last and None not in last else None  # type: ignore[type-var]


def wait_round_after(
    state_dir: Path,
    now: float,
    interval: float,
    what: str,
    timeout: float,
    agent: Agent | None = None,
) -> float:
    """Wait until a whole round (its reads and its seal pass) has run after `now` (agent clock).

    Rounds fire at the instants of the interval's grid, are stored under them, and run one at a
    time: a round stored one interval after the first grid instant at or after `now` means the
    round at that instant, begun after `now`, has ended. Anchor a negative check ("nothing
    happens in the next rounds") on that, not on seconds slept."""
    first = now - now % interval + (interval if now % interval else 0)
    return wait_for(
        what,
        lambda: (t := newest_instant(state_dir)) is not None and t >= first + interval and t,
        timeout,
        agent,
    )
