"""Pure functions: an hour's samples -> one quantity (aggregate, scale, rounding, decimals); and the
values every layer shares: a reading's label set, a sample's Point, the Quantity and Allocations
a sealed record carries (the ledger stores them, the clients send them).

No I/O and no clock: sealing calls these with what the ledger holds, and tests call them directly.
Readings are `decimal.Decimal`, so 0.1 + 0.2 bills as 0.3, and an hour's aggregate, its scaling and
its rounding are exact (`fractions.Fraction`): an average of 0, 0 and 1730 scaled by 0.3 is 173, not
173.00000000000000000000000001 rounded up to 174.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

MAX_INT = 2_147_483_647  # UsageQuantity is an int32
MAX_DECIMAL_INT_DIGITS = 10  # UsageQuantityAsDecimal: ^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$
DECIMAL_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$")
ROUNDING = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
HOUR = Decimal(3600)
# A reading at or beyond this magnitude is no usage a meter can have (1e61 rows, an HTTP 1e300):
# the collector failed. Below it, the arithmetic of an hour stays exact enough to round and clamp.
MAX_READING = Decimal(10) ** 30
LabelSet = tuple[tuple[str, str], ...]
Tags = tuple[tuple[str, str], ...]  # (tag key, value) sorted by key; () is the untagged bucket


def reading_problem(value: Decimal) -> str | None:
    """Why `value` cannot be billed (None if it can): it must be a finite decimal below 10^30.

    Checked when the reading is taken, so a NaN, an infinity or an absurd magnitude is that round's
    collector error and never reaches the ledger, where it would make the hour impossible to seal.
    """
    if not value.is_finite():
        return f"value {value} is not a finite number"
    if abs(value) >= MAX_READING:
        return f"value {value:.3e} is beyond any usage (at most 10^30)"
    return None


def plain(value: Any) -> str:
    """A reading for people: plain notation, at most 6 decimals (what MeterUsage can carry)."""
    if value is None:
        return "-"
    if value.as_tuple().exponent < -6:
        value = value.quantize(Decimal("0.000001"))
    return format(value.normalize(), "f")


SHOWN = 120  # characters of a line or label value a command prints


def shown(text: str | bytes, limit: int = SHOWN, encoding: str = "utf-8") -> str:
    """A label value or log line for people: one line (control characters escaped), cut to
    `limit` characters with its full length said, so a 64 KiB value cannot flood a terminal."""
    if isinstance(text, (bytes, bytearray)):
        size = len(text)
        text = bytes(text[: limit * 4]).decode(encoding, errors="replace")
        unit = "bytes"
    else:
        size, unit = len(text), "characters"
    cut = text[:limit]
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    if len(cut) < len(text) or (unit == "bytes" and size > limit * 4):
        return f"{safe}... ({size:,} {unit})"
    return safe


def exact(value: Decimal) -> str:
    """A decimal in plain notation with every digit it has (a `scale`, as configured)."""
    return format(value.normalize(), "f") if value else "0"


@dataclass(frozen=True)
class Point:
    """One sample as aggregation sees it: when, what, and how many seconds it stands for."""

    t: float
    value: Decimal
    span: float
    breakdown: Mapping[LabelSet, Decimal] | None = None


@dataclass(frozen=True)
class Quantity:
    """What MeterUsage is sent: an int (UsageQuantity) or a decimal string (...AsDecimal)."""

    value: int | str
    clamped_from: Decimal | None = None  # the computed value, when it fell outside the API range

    @property
    def is_decimal(self) -> bool:
        return isinstance(self.value, str)

    @property
    def text(self) -> str:
        return str(self.value)

    def request_fields(self) -> dict[str, int | str]:
        if isinstance(self.value, str):
            return {"UsageQuantityAsDecimal": self.value}
        return {"UsageQuantity": self.value}

    @classmethod
    def from_stored(cls, text: str, is_decimal: bool) -> Quantity:
        return cls(text if is_decimal else int(text))


@dataclass(frozen=True)
class Allocation:
    """One bucket of an hour's quantity: its tags and its share, of the quantity's own type."""

    tags: Tags
    quantity: int | str  # int: AllocatedUsageQuantity; str: ...AsDecimal (as the Quantity)

    def request_fields(self) -> dict[str, Any]:
        if isinstance(self.quantity, str):
            out: dict[str, Any] = {"AllocatedUsageQuantityAsDecimal": self.quantity}
        else:
            out = {"AllocatedUsageQuantity": self.quantity}
        if self.tags:
            out["Tags"] = [{"Key": k, "Value": v} for k, v in self.tags]
        return out

    @classmethod
    def from_request(cls, fields: Mapping[str, Any]) -> Allocation:
        tags = tuple((t["Key"], t["Value"]) for t in fields.get("Tags") or ())
        if "AllocatedUsageQuantityAsDecimal" in fields:
            return cls(tags, str(fields["AllocatedUsageQuantityAsDecimal"]))
        return cls(tags, int(fields["AllocatedUsageQuantity"]))


def to_json(allocations: Sequence[Allocation]) -> list[dict[str, Any]]:
    """The request's `UsageAllocations`, also how the ledger stores them and reports show them."""
    return [a.request_fields() for a in allocations]


def combine_exact(method: str, points: Sequence[Point]) -> Fraction:
    """An hour's samples -> one raw value, exactly. No samples is the caller's business (nothing
    is sent)."""
    if not points:
        raise ValueError("combine() needs at least one sample")
    values = [p.value for p in sorted(points, key=lambda p: p.t)]
    for v in values:
        if not v.is_finite():
            raise ValueError(f"sample value {v} is not a finite number")
    if method == "max":
        return Fraction(max(values))
    if method == "min":
        return Fraction(min(values))
    if method == "last":
        return Fraction(values[-1])
    if method == "sum":
        return sum((Fraction(v) for v in values), Fraction(0))
    if method == "avg":
        return sum((Fraction(v) for v in values), Fraction(0)) / len(values)
    if method == "integral":
        # value-hours: each sample weighted by the seconds it stands for; gaps count 0.
        weighted = sum((Fraction(p.value) * Fraction(repr(p.span)) for p in points), Fraction(0))
        return weighted / 3600
    raise ValueError(f"unknown aggregate {method!r}")


def combine(method: str, points: Sequence[Point]) -> Decimal:
    """`combine_exact` as a Decimal of 60 significant digits: the raw value people read."""
    return to_decimal(combine_exact(method, points))


def to_decimal(value: Fraction) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 60
        return Decimal(value.numerator) / Decimal(value.denominator)


def _round(steps: Fraction, rounding: str) -> int:
    """`steps` to a whole number: up (ceiling), down (floor), nearest (half away from zero, as
    ROUND_HALF_UP)."""
    if rounding == "up":
        return math.ceil(steps)
    if rounding == "down":
        return math.floor(steps)
    half = Fraction(1, 2)
    return math.floor(steps + half) if steps >= 0 else -math.floor(-steps + half)


def to_quantity(
    value: Decimal | Fraction, scale: Decimal, rounding: str, decimals: int | None
) -> Quantity:
    """Scale, round at the `decimals` place (0 for an int) and clamp to what the API accepts,
    in exact arithmetic."""
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"quantity {value} is not a finite number")
    places = decimals or 0
    unit = 10**places
    steps = _round(Fraction(value) * Fraction(scale) * unit, rounding)
    top = MAX_INT if decimals is None else 10**MAX_DECIMAL_INT_DIGITS * unit - 1
    clamped_from = None
    if steps < 0 or steps > top:
        with localcontext() as ctx:
            ctx.prec = 60
            clamped_from = Decimal(steps).scaleb(-places)
        steps = min(max(steps, 0), top)
    with localcontext() as ctx:
        ctx.prec = 60
        rounded = Decimal(steps).scaleb(-places)
    return _quantity(rounded, decimals, clamped_from)


def _quantity(rounded: Decimal, decimals: int | None, clamped_from: Decimal | None) -> Quantity:
    if decimals is None:
        return Quantity(int(rounded), clamped_from)
    return Quantity(format(rounded, "f"), clamped_from)
