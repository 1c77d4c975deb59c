"""One hour of one dimension as billing sees it: its points, what they bill (`billed`, the same
arithmetic for sealing and for `status`'s hour so far), the points dropped because they are no
number, and which aggregates may carry a late sample into the next hour. Both modes' sealing
(instance_sealing.py, saas_sealing.py) use these.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from decimal import Decimal

from agent.aggregate import (
    Point,
    Quantity,
    combine_exact,
    reading_problem,
    to_decimal,
    to_quantity,
)
from agent.clock import iso, iso_hour
from agent.config.model import Dimension
from agent.ledger.samples import Samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sealed:
    """A record sealed by a pass (in SaaS mode one per customer; `samples` 0 there)."""

    dimension: str
    hour: int
    quantity: str
    samples: int


def billed(dim: Dimension, points: list[Point]) -> tuple[Decimal, Quantity]:
    """The hour's aggregate and the quantity it bills: what sealing stores and `status` shows."""
    raw = combine_exact(dim.aggregate, points)
    return to_decimal(raw), to_quantity(raw, dim.scale, dim.rounding, dim.decimals)


def so_far(ledger: Samples, dim: Dimension, hour: int) -> str | None:
    """What `dim`'s open hour would bill if it were sealed now (None: no sample yet). Reads only,
    skipping a value that is not finite as sealing drops it; None too when the arithmetic fails
    (sealing will then record the hour's seal error, which status shows)."""
    points = [p for p in ledger.points(ledger.db, dim.name, hour) if billable(p)]
    try:
        return billed(dim, points)[1].text if points else None
    except (ArithmeticError, ValueError):  # e.g. decimal.Overflow: as seal_hours contains it
        return None


def drop_bad_points(
    ledger: Samples, db: sqlite3.Connection, name: str, hour: int, points: list[Point]
) -> list[Point]:
    """The hour's points less those that are not a finite number below 10^30, which are deleted.

    Stored by an agent that did not check values yet (a `rows=nan` line, `9E+999999`): such a
    value is that round's collector error today, so it is dropped and the hour's other samples
    are billed rather than held for good (or summed in exact arithmetic for seconds: a
    million-digit fraction).
    """
    bad = [p for p in points if not billable(p)]
    if not bad:
        return points
    ledger.drop_samples(db, name, [p.t for p in bad])
    log.warning(
        "hour %s dimension %s: dropped %d stored sample(s) that are no usage (not a finite "
        "number below 10^30) "
        "(the first at %s: %s)",
        iso_hour(hour),
        name,
        len(bad),
        iso(bad[0].t),
        bad[0].value,
    )
    return [p for p in points if billable(p)]


def billable(point: Point) -> bool:
    """Whether a stored value passes the check a reading gets today (`reading_problem`)."""
    return reading_problem(point.value) is None


def carries(dim: Dimension) -> bool:
    """Late samples for a sealed hour move to the next open hour only where that cannot inflate
    a level: sums and integrals add up, a max or average would be distorted."""
    return dim.aggregate in ("sum", "integral")
