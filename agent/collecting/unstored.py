"""Readings taken while the ledger could not store them (disk full, ledger damaged, state dir gone):
kept in memory, in order, each with its own instant and the collector position it advanced to, and
stored as they were taken once the ledger can store again, so each unit lands in the hour it was
read.

While a dimension has readings here, its next reading starts from the newest one's position (not
the ledger's, which is behind): nothing is read twice.

Bounded: at most MAX_PER_DIMENSION readings per dimension (a day at the default 60 s interval).
Past that the oldest is let go, and how depends on what it holds:
- an increment (log lines, counter increases) is folded into the next reading: its usage is kept
  and billed at that reading's instant (a later hour if the two straddle a boundary): `moved`;
- a level (CPUs, users) is dropped: that instant bills nothing: `dropped`.
Both are counted per dimension, logged when they begin, and shown by `status` and health.json.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from agent.aggregate import LabelSet

# collecting.sampling.Sample and config.model.Dimension, by what is used of them: this module
# stays low in the layers (the daemon's storage state imports it).
Sample = Any
Dimension = Any

MAX_PER_DIMENSION = 1440


@dataclass(frozen=True)
class Kept:
    """A reading not yet stored: its dimension (as it was read), instant and sample."""

    dimension: Dimension
    t: float
    sample: Sample

    @property
    def increment(self) -> bool:
        """Folded into the next reading when let go, rather than dropped."""
        return self.dimension.collector.kind == "increment"


class Unstored:
    """Per dimension, the readings the ledger could not store yet, oldest first."""

    def __init__(self, limit: int = MAX_PER_DIMENSION) -> None:
        self.limit = limit
        self._kept: dict[str, deque[Kept]] = {}
        self.moved: dict[str, int] = {}  # readings folded into a later one (usage kept)
        self.dropped: dict[str, int] = {}  # level readings let go (that instant bills nothing)

    def __len__(self) -> int:
        return sum(len(q) for q in self._kept.values())

    def held(self, dimension: str) -> bool:
        return bool(self._kept.get(dimension))

    def position(self, dimension: str) -> dict[str, Any] | None:
        """The position the newest kept reading advanced to; None when none has one."""
        for kept in reversed(self._kept.get(dimension, ())):
            if kept.sample.state is not None:
                return kept.sample.state
        return None

    def keep(self, kept: Kept) -> str | None:
        """Keep a reading; past the limit let the oldest go: 'moved' or 'dropped' (else None)."""
        name = kept.dimension.name
        queue = self._kept.setdefault(name, deque())
        queue.append(kept)
        if len(queue) <= self.limit:
            return None
        oldest = queue.popleft()
        if oldest.increment:
            queue[0] = replace(queue[0], sample=folded(oldest.sample, queue[0].sample))
            self.moved[name] = self.moved.get(name, 0) + 1
            return "moved"
        self.dropped[name] = self.dropped.get(name, 0) + 1
        return "dropped"

    def oldest(self, dimension: str) -> Kept | None:
        queue = self._kept.get(dimension)
        return queue[0] if queue else None

    def stored(self, dimension: str) -> None:
        """The oldest reading of `dimension` is in the ledger now."""
        queue = self._kept[dimension]
        queue.popleft()
        if not queue:
            del self._kept[dimension]

    def dimensions(self) -> list[str]:
        return sorted(self._kept)

    def oldest_instant(self) -> float | None:
        return min((q[0].t for q in self._kept.values() if q), default=None)


def folded(earlier: Sample, later: Sample) -> Sample:
    """Two increments as one, at the later instant: values and breakdowns added; the later
    position (it is past both)."""
    if earlier.value is None or later.value is None:
        return later if later.value is not None else earlier
    return replace(
        later,
        value=earlier.value + later.value,
        breakdown=_added(earlier.breakdown, later.breakdown, earlier.value, later.value),
        unread=earlier.unread + later.unread,
    )


def _added(
    a: Mapping[LabelSet, Decimal] | None,
    b: Mapping[LabelSet, Decimal] | None,
    a_total: Decimal,
    b_total: Decimal,
) -> dict[LabelSet, Decimal] | None:
    """Breakdowns summed by label set; a side without one counts whole under no labels."""
    if a is None and b is None:
        return None
    out: dict[LabelSet, Decimal] = {}
    for part, total in ((a, a_total), (b, b_total)):
        for labels, v in (part or {(): total}).items():
            out[labels] = out.get(labels, Decimal(0)) + v
    return out
