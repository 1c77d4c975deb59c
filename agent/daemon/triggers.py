"""APScheduler triggers on the agent's clock (which `trial` runs faster than the wall clock), and
where a round's reading lands on its sampling grid."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from apscheduler.triggers.base import BaseTrigger

from agent.clock import Clock


class ClockTrigger(BaseTrigger):
    """Fires at every multiple of `period` (+ `phase`) on the agent's clock, which may be faster
    than the wall clock APScheduler sleeps on (demo) or equal to it (production)."""

    def __init__(self, clock: Clock, period: float, phase: float = 0.0) -> None:
        self.clock, self.period, self.phase = clock, period, phase

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        base = self.clock.from_wall(now.timestamp())
        if previous_fire_time is not None:
            base = max(base, self.clock.from_wall(previous_fire_time.timestamp()))
        k = math.floor((base - self.phase) / self.period + 1e-9) + 1
        wall = self.clock.to_wall(k * self.period + self.phase)
        return datetime.fromtimestamp(wall, tz=timezone.utc)

    def __str__(self) -> str:
        return f"every {self.period}s (+{self.phase}s) on the agent clock"


def snap(t: float, interval: int, rate: float = 1.0) -> float:
    """Put a reading taken a hair before or after its instant on the instant itself, so a round
    fired at 09:59:59.999 for 10:00 lands in the 10:00 hour. The hair is one real second: on a
    clock running `rate` times faster (`trial`), that many clock seconds."""
    grid = round(t / interval) * interval
    return float(grid) if abs(t - grid) <= min(rate, interval / 4) else t
