"""Sleep and resume: before the system sleeps every sealed pending record is sent; after it
resumes, whatever is due is sent at once.

Two ways in, one action. The systemd-sleep hook (packaging/system-sleep/metering-agent, which
runs `python -m agent.commands.sleep`) sends the daemon SIGUSR1 before the system sleeps and
after it resumes; without the hook a resume is still seen here, as a growth of the time the
system spent suspended (Clock.suspended: CLOCK_BOOTTIME less CLOCK_MONOTONIC). Either way the
daemon seals the hours that ended and starts a flush: every pending record of its mode now,
ignoring send slots, for at most SLEEP_FLUSH seconds. A flush is the send passes' one rule for
"now, whatever the slot" (SendPass.run), the same one the stop flush uses.

Why not wait for the slot: a sealed hour waits up to `send_window` (3600 s) for its slot, and a
sleep that begins in that wait and outlasts the record's window (6 h less a minute after its
Timestamp for MeterUsage) loses it. After a resume nothing is gained by waiting: a fleet does
not resume together, so there is no burst to spread.
"""

from __future__ import annotations

import threading
from typing import Any

from agent.clock import Clock

SLEEP_FLUSH = 20  # seconds a sleep's send may take; the hook waits no longer than this
RESUME_TOLERANCE = 2.0  # real seconds spent suspended that make a resume (jitter is microseconds)


class Wake:
    """Why the daemon should send now: asked (SIGUSR1, `ask`), or a resume seen on the clock.
    A request stays until `done`, so one that meets a flush still running is served after it."""

    def __init__(self, clock: Clock, tolerance: float = RESUME_TOLERANCE) -> None:
        self.clock = clock
        self.tolerance = tolerance
        self._suspended = clock.suspended()
        self._asked = threading.Event()  # set from the signal handler
        self._why: str | None = None

    def ask(self, signum: int | None = None, frame: Any = None) -> None:
        """SIGUSR1's handler: the system is about to sleep, or has woken (the hook says which)."""
        self._asked.set()

    def due(self) -> str | None:
        """The reason to send every pending record now, or None. Called once a second."""
        suspended = self.clock.suspended()
        slept, self._suspended = suspended - self._suspended, suspended
        if slept > self.tolerance:
            self._why = f"the system resumed after {slept:.0f} s suspended"
        if self._asked.is_set():
            self._asked.clear()
            self._why = self._why or "SIGUSR1 (the system sleeps, or has resumed)"
        return self._why

    def done(self) -> None:
        """The request is served (a flush started, or nothing was pending)."""
        self._why = None
