"""Pure functions: an hour's samples -> one quantity (aggregate, scale, rounding, decimals).

No I/O and no clock: sealing calls these with what the ledger holds, and tests call them directly.
Everything from `scale` onwards is `decimal.Decimal`, so 0.1 + 0.2 bills as 0.3.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext

MAX_INT = 2_147_483_647  # UsageQuantity is an int32
MAX_DECIMAL_INT_DIGITS = 10  # UsageQuantityAsDecimal: ^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$
DECIMAL_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$")
ROUNDING = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
HOUR = Decimal(3600)
# A reading at or beyond this magnitude is no usage a meter can have (1e61 rows, an HTTP 1e300):
# the collector failed. Below it, the arithmetic of an hour stays exact enough to round and clamp.
MAX_READING = Decimal(10) ** 30
_SAFE_TO_ROUND = Decimal(10) ** 40  # quantize() at 60 digits of precision never overflows below
LabelSet = tuple[tuple[str, str], ...]


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


def combine(method: str, points: Sequence[Point]) -> Decimal:
    """An hour's samples -> one raw value. No samples is the caller's business (nothing is sent)."""
    if not points:
        raise ValueError("combine() needs at least one sample")
    values = [p.value for p in sorted(points, key=lambda p: p.t)]
    if method == "max":
        return max(values)
    if method == "min":
        return min(values)
    if method == "last":
        return values[-1]
    if method == "sum":
        return sum(values, Decimal(0))
    if method == "avg":
        return sum(values, Decimal(0)) / len(values)
    if method == "integral":
        # value-hours: each sample weighted by the seconds it stands for; gaps count 0.
        weighted = sum((p.value * Decimal(repr(p.span)) for p in points), Decimal(0))
        return weighted / HOUR
    raise ValueError(f"unknown aggregate {method!r}")


def to_quantity(value: Decimal, scale: Decimal, rounding: str, decimals: int | None) -> Quantity:
    """Scale, round at the `decimals` place (0 for an int) and clamp to what the API accepts."""
    with localcontext() as ctx:
        ctx.prec = 60
        scaled = value * scale
        if not scaled.is_finite():
            raise ValueError(f"quantity {scaled} is not a finite number")
        places = decimals or 0
        exponent = Decimal(1).scaleb(-places)
        if decimals is None:
            upper = Decimal(MAX_INT)
        else:
            upper = Decimal(10) ** MAX_DECIMAL_INT_DIGITS - exponent
        if abs(scaled) >= _SAFE_TO_ROUND:
            # Far outside the API's range: clamp without rounding (quantize would overflow).
            bound = upper if scaled > 0 else Decimal(0)
            return _quantity(bound.quantize(exponent), decimals, scaled)
        rounded = scaled.quantize(exponent, rounding=ROUNDING[rounding])
        clamped_from = None
        if rounded < 0 or rounded > upper:
            clamped_from = rounded
            rounded = min(max(rounded, Decimal(0)), upper).quantize(exponent)
        if rounded == 0:
            rounded = abs(rounded)  # never "-0"
    return _quantity(rounded, decimals, clamped_from)


def _quantity(rounded: Decimal, decimals: int | None, clamped_from: Decimal | None) -> Quantity:
    if decimals is None:
        return Quantity(int(rounded), clamped_from)
    return Quantity(format(rounded, "f"), clamped_from)
