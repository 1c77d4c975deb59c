"""The one place that reads the wall clock.

Everything else takes a `Clock` and asks it for `now()`. Tests pass a fake; the README demo and the
emulator share an accelerated clock (`rate` > 1) so a full billing hour passes in a minute while the
very same engine code runs.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

HOUR = 3600


class Clock:
    """UTC wall clock, optionally shifted and sped up: now = origin + (wall - wall0) * rate."""

    def __init__(
        self, rate: float = 1.0, origin: float | None = None, wall0: float | None = None
    ) -> None:
        if rate <= 0:
            raise ValueError("clock rate must be positive")
        self.rate = rate
        self._wall0 = time.time() if wall0 is None else wall0
        self._origin = self._wall0 if origin is None else origin
        self._wall_offset: float | None = None  # wall minus monotonic, for stepped()

    @classmethod
    def from_spec(cls, spec: str | None) -> Clock:
        """`RATE[:ORIGIN[:WALL0]]`, so processes that share a spec share one clock."""
        if not spec:
            return cls()
        parts = [float(p) for p in spec.split(":")]
        return cls(*parts)

    @property
    def spec(self) -> str | None:
        """What `from_spec` needs to rebuild this clock in another process (None: real time)."""
        if self.is_real:
            return None
        return f"{self.rate!r}:{self._origin!r}:{self._wall0!r}"

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

    def from_wall(self, wall: float) -> float:
        """What this clock reads at the real epoch second `wall`."""
        return self._origin + (wall - self._wall0) * self.rate

    def stepped(self, tolerance: float = 2.0) -> float:
        """How far the wall clock was stepped since the last call, in this clock's seconds (0.0
        when it moved with the monotonic clock, within `tolerance` real seconds).

        APScheduler 3 keeps absolute next-run times and sleeps on the monotonic clock, so after
        a step back of ten minutes every job would wait ten minutes. The daemon calls this once a
        second and reschedules its jobs when it is not 0. NTP slewing (at most 0.5 ms/s) never
        reaches the tolerance between two calls; a step (NTP, a suspend, a VM restore) does.
        """
        offset = self.to_wall(self.time()) - self.monotonic()
        last, self._wall_offset = self._wall_offset, offset
        if last is None or abs(offset - last) <= tolerance:
            return 0.0
        return (offset - last) * self.rate

    def suspended(self) -> float:
        """Real seconds the system has spent suspended or hibernated since it booted: Linux's
        CLOCK_BOOTTIME counts them, CLOCK_MONOTONIC does not (0.0 where there is no BOOTTIME).

        A growth between two calls is a resume (daemon/wake.py), told apart from a wall-clock
        step (`stepped`), which moves neither. libfaketime leaves both alone, so a faked jump
        is a step, not a resume."""
        boottime = getattr(time, "CLOCK_BOOTTIME", None)
        if boottime is None:
            return 0.0
        # BOOTTIME first: time passing between the two reads makes the difference smaller,
        # never larger, so jitter cannot look like a suspend.
        boot = time.clock_gettime(boottime)
        return max(0.0, boot - time.clock_gettime(time.CLOCK_MONOTONIC))

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of this clock's time."""
        time.sleep(max(0.0, seconds / self.rate))

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
