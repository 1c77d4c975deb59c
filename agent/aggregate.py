"""Pure functions: an hour's samples -> one quantity (aggregate, scale, rounding, decimals).

No I/O and no clock: sealing calls these with what the ledger holds, and tests call them directly.
Everything from `scale` onwards is `decimal.Decimal`, so 0.1 + 0.2 bills as 0.3.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext

MAX_INT = 2_147_483_647  # UsageQuantity is an int32
MAX_DECIMAL_INT_DIGITS = 10  # UsageQuantityAsDecimal: ^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$
DECIMAL_PATTERN = re.compile(r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$")
ROUNDING = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
HOUR = Decimal(3600)


@dataclass(frozen=True)
class Point:
    """One sample as aggregation sees it: when, what, and how many seconds it stands for."""

    t: float
    value: Decimal
    span: float


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
        places = decimals or 0
        exponent = Decimal(1).scaleb(-places)
        rounded = scaled.quantize(exponent, rounding=ROUNDING[rounding])
        if decimals is None:
            upper = Decimal(MAX_INT)
        else:
            upper = Decimal(10) ** MAX_DECIMAL_INT_DIGITS - exponent
        clamped_from = None
        if rounded < 0 or rounded > upper:
            clamped_from = rounded
            rounded = min(max(rounded, Decimal(0)), upper).quantize(exponent)
        if rounded == 0:
            rounded = abs(rounded)  # never "-0"
    if decimals is None:
        return Quantity(int(rounded), clamped_from)
    return Quantity(format(rounded, "f"), clamped_from)
