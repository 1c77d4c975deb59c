"""The account's Metering API calls per second, shared by this machine's processes.

BatchMeterUsage (the `send` child) and ResolveCustomer (the fulfillment handler, its own child)
count against one quota of 10 requests a second per account and region. Both draw their calls
from one budget kept in a small file in the state directory (`api-budget`): the earliest instant
the next call may start (a GCRA's theoretical arrival time), read and advanced under an
exclusive flock. So the sender keeps the whole budget while no buyer registers, and the two
together never go over it, whichever process runs when.

Instants are the agent's clock (processes started by one `run` share its clock spec). A stored
instant far ahead of now (the wall clock stepped back) is forgotten. Where the file cannot be
used, the budget is this process's alone, logged once: the quota may then be exceeded by the
other process, and throttling (retried) is what remains.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from pathlib import Path

from agent.clock import Clock
from agent.host.ownership import adopt

log = logging.getLogger(__name__)

INTERVAL = 0.101  # seconds between two calls' starts: under 10 a second, the account's quota
FILENAME = "api-budget"
FORGET_AHEAD = 60.0  # a stored slot further ahead than this is a clock step back: forgotten
_SLOT = struct.Struct("<d")


class CallBudget:
    """Slots for Metering API calls, one every `interval` seconds, shared through `path`."""

    def __init__(self, path: Path | None, clock: Clock, interval: float = INTERVAL) -> None:
        self.path, self.clock, self.interval = path, clock, interval
        self._next = float("-inf")  # this process's view when the file cannot be used
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def in_state_dir(cls, state_dir: Path, clock: Clock) -> CallBudget:
        return cls(Path(state_dir) / FILENAME, clock)

    def reserve(self, max_wait: float = float("inf")) -> float | None:
        """Take the next slot: the seconds to wait before the call may start; None (nothing
        taken) when that would be more than `max_wait`."""
        with self._lock:
            now = self.clock.time()
            fd = self._open()
            try:
                slot = self._read(fd, now)
                wait = max(0.0, slot - now)
                if wait > max_wait:
                    return None
                self._write(fd, max(slot, now) + self.interval)
                return wait
            finally:
                if fd is not None:
                    os.close(fd)  # closing releases the flock

    def take(self) -> float:
        """Wait for the next slot (the sender's pace); the instant the call starts."""
        wait = self.reserve()
        assert wait is not None
        if wait > 0:
            self.clock.sleep(wait)
        return self.clock.time()

    def _open(self) -> int | None:
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            self._warn(e)
            return None
        adopt(self.path.parent, self.path)  # `send` run by root: the service user's file still
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            self._warn(e)
            return None
        return fd

    def _read(self, fd: int | None, now: float) -> float:
        stored = self._next
        if fd is not None:
            data = os.pread(fd, _SLOT.size, 0)
            stored = _SLOT.unpack(data)[0] if len(data) == _SLOT.size else float("-inf")
        return now if stored > now + FORGET_AHEAD else stored

    def _write(self, fd: int | None, slot: float) -> None:
        self._next = slot
        if fd is not None:
            os.pwrite(fd, _SLOT.pack(slot), 0)

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("API call budget %s: cannot use it (%s); pacing this process's calls "
                        "alone", self.path, e.strerror or e)  # fmt: skip
