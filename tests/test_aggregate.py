from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.aggregate import (
    DECIMAL_PATTERN,
    MAX_INT,
    Point,
    Quantity,
    combine,
    combine_exact,
    to_quantity,
)

D = Decimal


def pts(*values: str, span: float = 60.0) -> list[Point]:
    return [Point(t=1000.0 + 60 * i, value=D(v), span=span) for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("method", "expected"),
    [("max", "7"), ("min", "1"), ("sum", "12"), ("avg", "4"), ("last", "4")],
)
def test_combine_methods(method: str, expected: str) -> None:
    assert combine(method, pts("1", "7", "4")) == D(expected)


def test_last_is_by_time_not_by_order_given() -> None:
    points = [Point(2000, D(5), 60), Point(1000, D(9), 60)]
    assert combine("last", points) == D(5)


def test_sum_is_exact_in_decimal() -> None:
    assert combine("sum", pts("0.1", "0.2")) == D("0.3")


def test_integral_four_vcpus_for_twenty_minutes() -> None:
    points = [Point(1000 + 60 * i, D(4), 60.0) for i in range(20)]
    value = combine("integral", points)
    assert to_quantity(value, D(1), "nearest", 3).value == "1.333"


def test_integral_uses_each_samples_span() -> None:
    # one sample clipped to 20 s by a stop, one full minute
    points = [Point(0, D(2), 60.0), Point(60, D(2), 20.0)]
    assert combine_exact("integral", points) == Fraction(160, 3600)


def test_an_average_is_scaled_and_rounded_exactly() -> None:
    """1730 / 3 is 576.666...; in 28-digit Decimals, times 0.3 it came out a hair above 173, and
    `rounding: up` billed 174 (found by the allocation property test)."""
    points = [Point(0, D(0), 60.0), Point(60, D(0), 60.0), Point(120, D(1730), 60.0)]
    value = combine_exact("avg", points)
    assert to_quantity(value, D("0.3"), "up", None).value == 173
    assert to_quantity(value, D("0.3"), "down", None).value == 173
    assert to_quantity(value, D("0.3"), "up", 6).value == "173.000000"
    third = combine_exact(
        "avg", [Point(0, D(1), 60.0), Point(60, D(0), 60.0), Point(120, D(0), 60.0)]
    )
    assert to_quantity(third, D(1), "up", 6).value == "0.333334"
    assert to_quantity(third, D(1), "nearest", 6).value == "0.333333"
    assert to_quantity(third, D(3), "up", None).value == 1


def test_combine_needs_samples() -> None:
    with pytest.raises(ValueError):
        combine("sum", [])


@pytest.mark.parametrize(
    ("value", "rounding", "expected"),
    [
        ("2.5", "nearest", 3),
        ("2.4999", "nearest", 2),
        ("3.5", "nearest", 4),
        ("2.0001", "up", 3),
        ("2", "up", 2),
        ("2.9999", "down", 2),
        ("0.4", "nearest", 0),
        ("0.0000001", "up", 1),
    ],
)
def test_integer_rounding(value: str, rounding: str, expected: int) -> None:
    q = to_quantity(D(value), D(1), rounding, None)
    assert q.value == expected and isinstance(q.value, int)
    assert q.request_fields() == {"UsageQuantity": expected}


@pytest.mark.parametrize(
    ("value", "scale", "decimals", "rounding", "expected"),
    [
        ("1", "0.001", 3, "nearest", "0.001"),
        ("1", "0.0001", 3, "nearest", "0.000"),
        ("1", "0.0005", 3, "nearest", "0.001"),
        ("1", "0.0001", 3, "up", "0.001"),
        ("1234", "0.001", 2, "down", "1.23"),
        ("17", "1", 2, "nearest", "17.00"),
        ("1", "0.000001", 6, "nearest", "0.000001"),
        ("1E+3", "1", 1, "nearest", "1000.0"),
        ("0", "1", 6, "nearest", "0.000000"),
    ],
)
def test_decimal_quantities(
    value: str, scale: str, decimals: int, rounding: str, expected: str
) -> None:
    q = to_quantity(D(value), D(scale), rounding, decimals)
    assert q.value == expected
    assert DECIMAL_PATTERN.match(q.text), "must match the API's pattern, never an exponent"
    assert q.request_fields() == {"UsageQuantityAsDecimal": expected}


def test_scale_applies_before_rounding() -> None:
    # 1,499 requests billed per 1,000: 1.499 -> 1; 1,500 -> 2 (half up)
    assert to_quantity(D(1499), D("0.001"), "nearest", None).value == 1
    assert to_quantity(D(1500), D("0.001"), "nearest", None).value == 2


def test_clamps_to_api_range_and_says_so() -> None:
    big = to_quantity(D(MAX_INT) + 10, D(1), "nearest", None)
    assert big.value == MAX_INT and big.clamped_from == D(MAX_INT) + 10
    neg = to_quantity(D(-5), D(1), "nearest", None)
    assert neg.value == 0 and neg.clamped_from == D(-5)
    huge = to_quantity(D("1e12"), D(1), "nearest", 2)
    assert huge.value == "9999999999.99" and DECIMAL_PATTERN.match(huge.text)
    assert to_quantity(D(5), D(1), "nearest", None).clamped_from is None


def test_negative_zero_is_plain_zero() -> None:
    assert to_quantity(D("-0.0001"), D(1), "nearest", 2).value == "0.00"


def test_stored_quantity_round_trips() -> None:
    for q in (Quantity(17), Quantity("0.125")):
        assert Quantity.from_stored(q.text, q.is_decimal) == q


decimals = st.decimals(
    allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15, places=9
)


@settings(max_examples=400, deadline=None)
@given(
    value=decimals,
    scale=st.decimals(min_value="0.000001", max_value="1000", places=6),
    rounding=st.sampled_from(["up", "down", "nearest"]),
    places=st.one_of(st.none(), st.integers(1, 6)),
)
def test_every_quantity_is_one_the_api_accepts(
    value: Decimal, scale: Decimal, rounding: str, places: int | None
) -> None:
    q = to_quantity(value, scale, rounding, places)
    if places is None:
        assert isinstance(q.value, int) and 0 <= q.value <= MAX_INT
    else:
        assert DECIMAL_PATTERN.match(q.text), q.text
        assert len(q.text.split(".")[1]) == places
    exact = value * scale
    if q.clamped_from is None:
        step = Decimal(1).scaleb(-(places or 0))
        assert abs(Decimal(q.text) - exact) <= step  # rounding moves it by less than one step
        if rounding == "up":
            assert Decimal(q.text) >= exact
        if rounding == "down":
            assert Decimal(q.text) <= exact
