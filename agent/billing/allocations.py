"""Pure functions: an hour's labelled samples -> MeterUsage `UsageAllocations` (SPEC "Labels and
usage allocations").

Why a module of its own, with no I/O: sealing computes the allocations once, in the transaction
that seals the quantity, and stores them with the request, so every resend is identical; tests
call these functions directly. The aggregation is `aggregate.combine`, run per tag set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from typing import TYPE_CHECKING

from agent.aggregate import HOUR, Allocation, LabelSet, Point, Quantity, Tags, combine
from agent.config.model import TAG_CHAR

if TYPE_CHECKING:
    from agent.config.model import Dimension

MAX_ALLOCATIONS = 2500
MAX_TAG_VALUE = 256
_OUTSIDE = re.compile("[^" + TAG_CHAR[1:])  # any character a tag may not hold
ZERO = Decimal(0)


@dataclass(frozen=True)
class Allocated:
    """An hour's allocations, and how many tag sets beyond the API's limit went untagged."""

    allocations: tuple[Allocation, ...]
    folded: int = 0


def tag_value(value: str) -> str:
    """A label value as a tag value: each character outside the API's set becomes `_`, and it
    is cut to 256 characters."""
    return _OUTSIDE.sub("_", value)[:MAX_TAG_VALUE]


def tags_of(labels: LabelSet, mapping: Mapping[str, str]) -> Tags:
    """The tags a label set bills under: one per mapped label that has a value."""
    values = dict(labels)
    found = ((key, values.get(label)) for key, label in mapping.items())
    return tuple(sorted((key, tag_value(value)) for key, value in found if value))


def shares(method: str, points: Sequence[Point], mapping: Mapping[str, str]) -> dict[Tags, Decimal]:
    """Each tag set's aggregate over the hour, before scale: `sum`, `integral`, `avg` and `last`
    over its own samples (a sample without it counts 0 there), `max` and `min` the breakdown of
    the sample that set the extreme (the first to reach it).

    Labels that are not mapped are summed away first, and so are tag sets that sanitizing made
    equal: tag sets are unique in a request.
    """
    if not points:
        return {}
    cache: dict[LabelSet, Tags] = {}

    def project(p: Point) -> dict[Tags, Decimal]:
        out: dict[Tags, Decimal] = {}
        for labels, value in (p.breakdown if p.breakdown is not None else {(): p.value}).items():
            tags = cache.get(labels)
            if tags is None:
                tags = cache[labels] = tags_of(labels, mapping)
            out[tags] = out.get(tags, ZERO) + value
        return out

    ordered = sorted(points, key=lambda p: p.t)
    if method in ("max", "min", "last"):
        target = combine(method, ordered)
        chosen = [p for p in ordered if p.value == target]
        return project(chosen[-1] if method == "last" else chosen[0])
    # sum, avg and integral are linear: one running total per tag set, each sample's breakdown
    # read once and let go (a sample without a tag set counts 0 there), then finished as
    # combine() finishes them over the whole hour's samples
    totals: dict[Tags, Decimal] = {}
    for p in ordered:
        weight = Decimal(repr(p.span)) if method == "integral" else None
        for tags, value in project(p).items():
            totals[tags] = totals.get(tags, ZERO) + (value if weight is None else value * weight)
    if method == "sum":
        return totals
    if method not in ("avg", "integral"):
        raise ValueError(f"unknown aggregate {method!r}")
    divisor = Decimal(len(ordered)) if method == "avg" else HOUR
    return {tags: total / divisor for tags, total in totals.items()}


def apportion(exact: Mapping[Tags, Decimal], total: int) -> dict[Tags, int]:
    """Whole units summing exactly to `total`: each share rounded down, then the units left
    handed one each to the largest remainders (ties: tags in sorted order).

    The shares are normally the exact split of `total` before its rounding, so at most one unit
    per share is left over. When they are not (the quantity was clamped to the API's range, or a
    negative share was taken as 0), the shares are first scaled to sum to `total`.
    """
    positive = {t: v for t, v in exact.items() if v > 0}
    if not positive or total <= 0:
        return {(): total} if total > 0 else {}
    with localcontext() as ctx:
        ctx.prec = 60
        floors = {t: int(v.to_integral_value(ROUND_FLOOR)) for t, v in positive.items()}
        left = total - sum(floors.values())
        if not 0 <= left <= len(positive):
            whole = sum(positive.values(), ZERO)
            positive = {t: v * total / whole for t, v in positive.items()}
            floors = {t: int(v.to_integral_value(ROUND_FLOOR)) for t, v in positive.items()}
            left = total - sum(floors.values())
        order = sorted(positive, key=lambda t: (floors[t] - positive[t], t))
    for t in order[:left]:
        floors[t] += 1
    return floors


def allocate(dim: Dimension, points: Sequence[Point], quantity: Quantity) -> Allocated:
    """The hour's allocations for a dimension with `allocations`, summing exactly to the sealed
    `quantity` in its own type; none for a quantity of 0 or a dimension without allocations.

    Beyond the API's 2,500 allocations, the smallest tag sets are billed in the untagged one
    (`folded` says how many) so the hour is still accepted.
    """
    if not dim.allocations or not points:
        return Allocated(())
    step = Decimal(1).scaleb(-(dim.decimals or 0))
    total = int(Decimal(quantity.text) / step)
    if total == 0:
        return Allocated(())
    with localcontext() as ctx:
        ctx.prec = 60
        exact = {
            t: v * dim.scale / step
            for t, v in shares(dim.aggregate, points, dim.allocations).items()
            if v > 0
        }
    folded = 0
    if len(exact) > MAX_ALLOCATIONS:
        ranked = sorted((t for t in exact if t), key=lambda t: (-exact[t], t))
        spill = ranked[MAX_ALLOCATIONS - 1 :]
        folded = len(spill)
        exact[()] = exact.get((), ZERO) + sum((exact.pop(t) for t in spill), ZERO)
    units = apportion(exact, total)
    allocations = tuple(
        Allocation(t, n if dim.decimals is None else format(step * n, "f"))
        for t, n in sorted(units.items())
        if n > 0
    )
    return Allocated(allocations, folded)
