"""allocations.py: the hour's quantity split by tag set (SPEC "Labels and usage allocations")."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.aggregate import Allocation, Point, Quantity, to_quantity
from agent.billing.allocations import (
    MAX_ALLOCATIONS,
    allocate,
    apportion,
    shares,
    tag_value,
    tags_of,
)
from agent.billing.hour import billed
from agent.config import CollectorConfig, Dimension

D = Decimal
TENANT = {"Tenant": "tenant"}
_DIM = Dimension(
    name="api",
    collector=CollectorConfig("log", {}, False, "increment", False),
    aggregate="sum",
    scale=D(1),
    rounding="nearest",
    decimals=None,
    interval=60,
    path="dimensions[0]",
    allocations=TENANT,
)


def dim(tmp_path: Path, **fields: object) -> Dimension:
    return replace(_DIM, **fields)  # type: ignore[arg-type]


def point(t: float, split: dict[str | None, str], span: float = 60.0) -> Point:
    """A sample broken down by tenant (None: the lines without one)."""
    breakdown = {((("tenant", k),) if k else ()): D(v) for k, v in split.items()}
    return Point(t, sum(breakdown.values(), D(0)), span, breakdown)


def as_dict(allocs: tuple[Allocation, ...]) -> dict[str, int | str]:
    return {",".join(f"{k}={v}" for k, v in a.tags) or "-": a.quantity for a in allocs}


def seal(d: Dimension, points: list[Point]) -> tuple[Quantity, dict[str, int | str], int]:
    _, q = billed(d, points)
    result = allocate(d, points, q)
    return q, as_dict(result.allocations), result.folded


# -- the rounding rule ---------------------------------------------------------------------------

amounts = st.lists(
    st.decimals(min_value=0, max_value=10**6, places=4, allow_nan=False), min_size=1, max_size=30
)


@settings(max_examples=300, deadline=None)
@given(
    values=amounts,
    scale=st.sampled_from([D("1"), D("0.001"), D("0.37"), D("2.5")]),
    rounding=st.sampled_from(["up", "down", "nearest"]),
    decimals=st.sampled_from([None, 1, 3, 6]),
)
def test_allocations_sum_exactly_to_the_quantity_and_stay_within_a_unit(
    values: list[Decimal], scale: Decimal, rounding: str, decimals: int | None
) -> None:
    exact = {(("Tenant", f"t{i:02d}"),): v for i, v in enumerate(values)}
    q = to_quantity(sum(values, D(0)), scale, rounding, decimals)
    step = D(1).scaleb(-(decimals or 0))
    total = int(D(q.text) / step)
    units = apportion({t: v * scale / step for t, v in exact.items()}, total)
    assert sum(units.values()) == total
    assert all(n >= 0 for n in units.values())
    for t, v in exact.items():
        assert abs(units.get(t, 0) - v * scale / step) < 1, (t, v, units.get(t))


@settings(max_examples=200, deadline=None)
@given(
    splits=st.lists(
        st.dictionaries(
            st.sampled_from([None, "acme", "globex", "initech", "a b#c", "a b$c"]),
            st.integers(min_value=0, max_value=5000).map(D),
            min_size=1,
        ),
        min_size=1,
        max_size=20,
    ),
    aggregate=st.sampled_from(["sum", "max", "min", "avg", "last", "integral"]),
    scale=st.sampled_from([D("1"), D("0.001"), D("0.3")]),
    rounding=st.sampled_from(["up", "down", "nearest"]),
    decimals=st.sampled_from([None, 2]),
)
def test_every_aggregate_allocates_the_sealed_quantity_exactly(
    splits: list[dict[str | None, Decimal]],
    aggregate: str,
    scale: Decimal,
    rounding: str,
    decimals: int | None,
) -> None:
    d = replace(
        _DIM,
        aggregate=aggregate,
        scale=scale,
        rounding=rounding,
        decimals=decimals,
    )
    points = [point(i * 60.0, {k: str(v) for k, v in s.items()}) for i, s in enumerate(splits)]
    _, q = billed(d, points)
    allocs = allocate(d, points, q).allocations
    total = sum((D(str(a.quantity)) for a in allocs), D(0))
    assert total == D(q.text)
    assert all(D(str(a.quantity)) > 0 for a in allocs)
    assert all(isinstance(a.quantity, str) == q.is_decimal for a in allocs)  # never mixed
    assert len({a.tags for a in allocs}) == len(allocs)  # tag sets unique
    step = Fraction(1, 10 ** (decimals or 0))
    got = {k: Fraction(D(str(v))) / step for k, v in as_dict(allocs).items()}
    for key, share in plain_shares(aggregate, splits).items():
        exact = share * Fraction(scale) / step
        assert abs(got.get(key, 0) - exact) < 1, (key, got.get(key), exact)


def plain_shares(aggregate: str, splits: list[dict[str | None, Decimal]]) -> dict[str, Fraction]:
    """Each tag set's aggregate as SPEC words it, in exact fractions: the oracle."""
    samples = []
    for split in splits:
        merged: dict[str, Fraction] = {}
        for k, v in split.items():
            key = "-" if k is None else "Tenant=" + k.replace("#", "_").replace("$", "_")
            merged[key] = merged.get(key, Fraction(0)) + Fraction(v)
        samples.append(merged)
    totals = [sum(m.values()) for m in samples]
    if aggregate in ("max", "min", "last"):
        pick = {"max": max, "min": min}.get(aggregate)
        return samples[totals.index(pick(totals))] if pick else samples[-1]
    keys = {k for m in samples for k in m}
    sums = {k: sum((m.get(k, Fraction(0)) for m in samples), Fraction(0)) for k in keys}
    divisor = {"sum": 1, "avg": len(samples), "integral": Fraction(3600, 60)}[aggregate]
    return {k: v / divisor for k, v in sums.items()}


def test_round_down_then_largest_remainders_ties_in_tag_order() -> None:
    a, b, c = ((("T", "a"),), (("T", "b"),), (("T", "c"),))
    assert apportion({a: D("1.5"), b: D("1.5"), c: D("1")}, 4) == {a: 2, b: 1, c: 1}
    assert apportion({a: D("0.2"), b: D("0.7"), c: D("0.1")}, 1) == {a: 0, b: 1, c: 0}
    # A quantity clamped to the API's range: the shares are scaled to it first.
    assert apportion({a: D(30), b: D(10)}, 4) == {a: 3, b: 1}
    assert apportion({}, 3) == {(): 3}  # nothing labelled: all of it untagged


def test_scale_and_rounding_up_bill_the_whole_units_by_largest_remainder(tmp_path: Path) -> None:
    d = dim(tmp_path, scale=D("0.001"), rounding="up")
    points = [point(0, {"acme": "1400", "globex": "700", None: "350"})]
    q, allocs, _ = seal(d, points)
    assert q.text == "3"  # 2.45 up
    # exact shares 1.4, 0.7, 0.35: floors 1, 0, 0; two units left go to .7 and .4
    assert allocs == {"Tenant=acme": 2, "Tenant=globex": 1}


def test_decimals_allocate_as_decimal_strings(tmp_path: Path) -> None:
    d = dim(tmp_path, decimals=2, scale=D("0.001"))
    q, allocs, _ = seal(d, [point(0, {"acme": "1234", "globex": "6"})])
    assert q.text == "1.24"
    assert allocs == {"Tenant=acme": "1.23", "Tenant=globex": "0.01"}
    d = dim(tmp_path, decimals=None, scale=D(1))
    q, allocs, _ = seal(d, [point(0, {"acme": "2", "globex": "1"})])
    assert allocs == {"Tenant=acme": 2, "Tenant=globex": 1}


# -- each aggregate --------------------------------------------------------------------------


def test_sum_and_avg_count_an_absent_tenant_as_zero(tmp_path: Path) -> None:
    points = [point(0, {"acme": "6"}), point(60, {"acme": "2", "globex": "4"})]
    assert seal(dim(tmp_path), points)[1] == {"Tenant=acme": 8, "Tenant=globex": 4}
    q, allocs, _ = seal(dim(tmp_path, aggregate="avg", decimals=1), points)
    assert q.text == "6.0"
    assert allocs == {"Tenant=acme": "4.0", "Tenant=globex": "2.0"}  # globex: (0 + 4) / 2


def test_integral_weights_each_tenant_by_its_samples_spans(tmp_path: Path) -> None:
    points = [point(0, {"acme": "2"}, span=1800), point(1800, {"globex": "4"}, span=1800)]
    q, allocs, _ = seal(dim(tmp_path, aggregate="integral", decimals=1), points)
    assert q.text == "3.0"
    assert allocs == {"Tenant=acme": "1.0", "Tenant=globex": "2.0"}


def test_max_and_min_take_the_breakdown_of_the_extreme_sample(tmp_path: Path) -> None:
    points = [
        point(0, {"acme": "5", "globex": "1"}),  # 6
        point(60, {"acme": "1", "globex": "9"}),  # 10: the max
        point(120, {"initech": "2"}),  # 2: the min
        point(180, {"acme": "9", "globex": "1"}),  # 10 again: the first max counts
    ]
    assert seal(dim(tmp_path, aggregate="max"), points)[1] == {
        "Tenant=acme": 1,
        "Tenant=globex": 9,
    }
    assert seal(dim(tmp_path, aggregate="min"), points)[1] == {"Tenant=initech": 2}
    assert seal(dim(tmp_path, aggregate="last"), points)[1] == {
        "Tenant=acme": 9,
        "Tenant=globex": 1,
    }


def test_a_sample_without_breakdown_is_untagged(tmp_path: Path) -> None:
    points = [Point(0, D(3), 60.0), point(60, {"acme": "2"})]
    assert seal(dim(tmp_path), points)[1] == {"-": 3, "Tenant=acme": 2}


# -- labels, tags, limits --------------------------------------------------------------------


def test_unmapped_labels_are_summed_away_and_missing_ones_leave_their_tag_out() -> None:
    mapping = {"Tenant": "tenant", "Project": "project"}
    assert tags_of((("project", "x"), ("tenant", "acme")), mapping) == (
        ("Project", "x"),
        ("Tenant", "acme"),
    )
    assert tags_of((("region", "eu"), ("tenant", "acme")), mapping) == (("Tenant", "acme"),)
    assert tags_of((("region", "eu"),), mapping) == ()
    labels = {"region": "eu", "tenant": "acme"}
    by_region = {(("region", r), ("tenant", "acme")): D(v) for r, v in (("eu", "2"), ("us", "3"))}
    p = Point(0, D(5), 60.0, by_region)
    assert shares("sum", [p], {"Tenant": "tenant"}) == {(("Tenant", labels["tenant"]),): D(5)}


def test_values_outside_the_character_set_are_replaced_and_cut() -> None:
    assert tag_value("acme corp/eu-1:a=b+c@d.e_f") == "acme corp/eu-1:a=b+c@d.e_f"
    assert tag_value("ünï#cøde!") == "_n__c_de_"
    assert tag_value("x" * 300) == "x" * 256


def test_values_that_sanitize_alike_are_one_allocation(tmp_path: Path) -> None:
    points = [point(0, {"a b#c": "2", "a b$c": "3", "acme": "1"})]
    q, allocs, _ = seal(dim(tmp_path), points)
    assert allocs == {"Tenant=a b_c": 5, "Tenant=acme": 1}
    assert q.text == "6"


def test_zero_allocations_and_zero_hours_send_none(tmp_path: Path) -> None:
    points = [point(0, {"acme": "0.2", "globex": "3", "initech": "0"})]
    assert seal(dim(tmp_path), points)[1] == {"Tenant=globex": 3}
    assert seal(dim(tmp_path), [point(0, {"acme": "0.2"})])[1] == {}
    assert seal(dim(tmp_path), [point(0, {"acme": "0"})])[1] == {}
    assert seal(dim(tmp_path, allocations=None), points)[1] == {}


def test_beyond_2499_tag_sets_the_smallest_go_untagged(tmp_path: Path) -> None:
    n = MAX_ALLOCATIONS + 10
    split: dict[str | None, str] = {f"t{i:05d}": str(i + 1) for i in range(n)}
    split[None] = "1"
    q, allocs, folded = seal(dim(tmp_path), [point(0, split)])
    assert len(allocs) == MAX_ALLOCATIONS
    assert folded == 11  # 2,510 tagged: 2,499 kept
    assert allocs["-"] == 1 + sum(range(1, 12))  # t00000..t00010 (1..11) went untagged
    assert "Tenant=t00010" not in allocs and allocs["Tenant=t00011"] == 12
    assert sum(int(v) for v in allocs.values()) == int(q.text)
    # exactly 2,500 tagged and nothing untagged fit as they are
    split = {f"t{i:05d}": "1" for i in range(MAX_ALLOCATIONS)}
    _, allocs, folded = seal(dim(tmp_path), [point(0, split)])
    assert (len(allocs), folded) == (MAX_ALLOCATIONS, 0)


def test_request_fields_round_trip() -> None:
    a = Allocation((("Tenant", "acme"),), "1.50")
    assert a.request_fields() == {
        "AllocatedUsageQuantityAsDecimal": "1.50",
        "Tags": [{"Key": "Tenant", "Value": "acme"}],
    }
    assert Allocation.from_request(a.request_fields()) == a
    b = Allocation((), 3)
    assert b.request_fields() == {"AllocatedUsageQuantity": 3}
    assert Allocation.from_request(b.request_fields()) == b
