"""The one place that reads the wall clock.

Everything else takes a `Clock` and asks it for `now()`. Tests pass a fake; the README demo and the
emulator share an accelerated clock (`rate` > 1) so a full billing hour passes in a minute while the
very same engine code runs.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

HOUR = 3600


class Clock:
    """UTC wall clock, optionally shifted and sped up: now = origin + (wall - wall0) * rate."""

    def __init__(self, rate: float = 1.0, origin: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("clock rate must be positive")
        self.rate = rate
        self._wall0 = time.time()
        self._origin = self._wall0 if origin is None else origin

    def time(self) -> float:
        """Seconds since the epoch on this clock."""
        return self._origin + (time.time() - self._wall0) * self.rate

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), tz=timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def to_wall(self, t: float) -> float:
        """The real epoch second at which this clock will read `t` (for schedulers)."""
        return self._wall0 + (t - self._origin) / self.rate

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Sleep `seconds` of this clock's time; returns True if `stop` was set meanwhile."""
        real = max(0.0, seconds / self.rate)
        if stop is not None:
            return stop.wait(real)
        time.sleep(real)
        return False

    @property
    def is_real(self) -> bool:
        return self.rate == 1.0 and self._origin == self._wall0


def hour_start(t: float) -> int:
    """The epoch second of the UTC hour containing `t`."""
    return int(t // HOUR) * HOUR


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_hour(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:00Z")
