"""SaaS sealing: each customer billed exactly what it alone would have been billed (SPEC "SaaS mode").

The oracle is the plain reading of the rule: filter each sample down to one customer's usage (0
where it had none) and run the dimension's arithmetic over that customer's samples alone.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config as config_mod
from agent.aggregate import LabelSet, Point, to_json, to_quantity
from agent.billing.allocations import allocate
from agent.billing.hour import billed
from agent.billing.saas_sealing import split_by_customer
from agent.config import Config, Dimension
from agent.errors import ConfigError
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.modes.saas import seal_hours
from agent.windows import SAAS_EXPIRY, span_for
from tests.billing import H
from tests.conftest import PRODUCT

D = Decimal
KNOWN = ("acme", "globex", "initech")  # customers in the ledger
LABELS = (*KNOWN, "stranger", None)  # a label no customer has, and usage without one
LICENSE = "arn:aws:license-manager::111122223333:license:l-{}"


def saas_config(tmp_path: Path, dims: str, idle_zero: bool = True) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\nmode: saas\n"
        f"saas: {{customer_label: customer, idle_zero: {str(idle_zero).lower()}}}\n"
        "dimensions:\n" + dims
    )
    return config_mod.load(path)


LOG_DIMS = """\
  - name: api
    collector: {type: log, path: /nonexistent/app.log,
                pattern: 'c=(?P<customer>\\w+) t=(?P<tenant>\\w+) n=(?P<value>[0-9.]+)',
                mode: sum}
    aggregate: sum
    scale: 0.1
    rounding: up
    allocations: {tags: {Tenant: tenant}}
"""


def add(ledger: Ledger, label: str, t: float = H) -> None:
    ledger.add_customer(
        Customer(label, "111122223333", LICENSE.format(label), f"agmt-{label}", None, None, t)
    )


def key(customer: str | None, tenant: str | None) -> LabelSet:
    pairs = [("customer", customer), ("tenant", tenant)]
    return tuple((k, v) for k, v in pairs if v is not None)


def oracle(
    dim: Dimension, samples: list[tuple[float, dict[LabelSet, Decimal]]], customer: str
) -> tuple[list[Point], str]:
    """One customer's samples: every sample, its own usage only (0 where it had none), its
    breakdown by the other labels; and what the dimension bills for them."""
    points = []
    for t, parts in samples:
        mine = {
            tuple(p for p in k if p[0] != "customer"): v
            for k, v in parts.items()
            if dict(k).get("customer") == customer
        }
        points.append(Point(t, sum(mine.values(), D(0)), span_for(t, 60), mine))
    return points, billed(dim, points)[1].text


parts_strategy = st.dictionaries(
    st.tuples(st.sampled_from(LABELS), st.sampled_from(("t1", "t2", None))),
    st.decimals(min_value=0, max_value=1000, places=2, allow_nan=False),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(parts_strategy, min_size=1, max_size=12),
    minutes=st.lists(st.integers(0, 59), min_size=12, max_size=12, unique=True),
    aggregate=st.sampled_from(["sum", "integral", "avg", "max", "min", "last"]),
    scale=st.sampled_from([D("1"), D("0.1"), D("0.37")]),
    rounding=st.sampled_from(["up", "down", "nearest"]),
    decimals=st.sampled_from([None, 2]),
    tags=st.sampled_from([None, {"Tenant": "tenant"}]),
)
def test_each_customer_is_billed_what_it_alone_would_be(
    samples: list[dict[tuple[str | None, str | None], Decimal]],
    minutes: list[int],
    aggregate: str,
    scale: Decimal,
    rounding: str,
    decimals: int | None,
    tags: dict[str, str] | None,
) -> None:
    dim = Dimension(
        "api", config_mod.CollectorConfig("log", {}, False, "level", False), aggregate, scale,
        rounding, decimals, 60, "dimensions[0]", tags,
    )  # fmt: skip
    hour = [
        (H + 60.0 * m, {key(c, t): v for (c, t), v in parts.items() if v})
        for m, parts in zip(sorted(minutes), samples, strict=False)
    ]
    points = [Point(t, sum(p.values(), D(0)), span_for(t, 60), p) for t, p in hour]
    split = split_by_customer(points, "customer", dim)
    for customer in {dict(k).get("customer", "") for _, p in hour for k, v in p.items() if v}:
        expected_points, expected = oracle(dim, hour, customer or "\0none")
        if customer == "":  # usage without the label
            expected_points = [
                Point(t, sum((v for k, v in p.items() if "customer" not in dict(k)), D(0)),
                      span_for(t, 60), {k: v for k, v in p.items() if "customer" not in dict(k)})
                for t, p in hour
            ]  # fmt: skip
            expected = billed(dim, expected_points)[1].text
        mine = split[customer]
        assert billed(dim, mine)[1].text == expected
        assert max(p.t for p in mine) == hour[-1][0]  # the Timestamp: the hour's last sample
        q = billed(dim, mine)[1]
        assert allocate(dim, mine, q) == allocate(dim, expected_points, q)


def record(ledger: Ledger, t: float, parts: dict[LabelSet, Decimal]) -> None:
    value = sum(parts.values(), D(0))
    ledger.record_sample("api", t, value, span_for(t, 60), None, carry=True, increment=True,
                         breakdown=parts)  # fmt: skip


def test_sealing_per_customer_idle_zeros_and_held_usage_released(tmp_path: Path) -> None:
    cfg = saas_config(tmp_path, LOG_DIMS)
    dim = cfg.dimensions[0]
    ledger = Ledger(cfg.state_dir)
    for label in KNOWN:
        add(ledger, label)
    add(ledger, "hooli")  # known, no usage: idle zero
    add(ledger, "gone")
    ledger.remove_customer("gone", H)  # removed: no idle zero
    hour = [
        (H + 60, {key("acme", "t1"): D(3), key("globex", None): D(4), key("stranger", "t2"): D(2)}),
        (H + 120, {key("acme", "t2"): D(5), key(None, None): D(1)}),
        (H + 3540, {key("initech", "t1"): D("0.5"), key("stranger", None): D(7)}),
    ]
    for t, parts in hour:
        record(ledger, t, parts)
    seal_hours(ledger, cfg, H + 3700, offset=0)
    rows = {h.customer: h for h in ledger.hours()}
    assert set(rows) == {"acme", "globex", "initech", "hooli"}
    for c in ("acme", "globex", "initech"):
        pts, expected = oracle(dim, hour, c)
        assert rows[c].quantity.text == expected
        assert rows[c].allocations == allocate(dim, pts, rows[c].quantity).allocations
        assert rows[c].timestamp == H + 3540
    assert rows["acme"].quantity.text == "1" and to_json(rows["acme"].allocations) == [
        {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "Tenant", "Value": "t2"}]}
    ]
    assert rows["hooli"].quantity.text == "0" and rows["hooli"].samples == 0
    held = {h.customer: h for h in ledger.held_usage()}
    assert set(held) == {"stranger", ""}
    assert ledger.unsealed_sample_count() == 0
    # a late sample of the sealed hour carries to the next hour, never into the held one
    record(ledger, H + 3599, {key("acme", "t1"): D(1)})
    assert ledger.unsealed_sample_count() == 1
    # the label becomes a customer: the next pass seals its held usage, once
    add(ledger, "stranger", H + 7000)
    seal_hours(ledger, cfg, H + 7200, offset=0)
    (stranger,) = [h for h in ledger.hours(until=H + 3600) if h.customer == "stranger"]
    assert stranger.quantity.text == oracle(dim, hour, "stranger")[1] == "1"
    assert stranger.state == "pending" and stranger.timestamp == H + 3540
    assert [h.customer for h in ledger.held_usage()] == [""]
    seal_hours(ledger, cfg, H + 7300, offset=0)
    assert len([h for h in ledger.hours(until=H + 3600) if h.customer == "stranger"]) == 1
    nxt = {h.customer: h.quantity.text for h in ledger.hours(since=H + 3600)}
    assert nxt == {"acme": "1", "globex": "0", "initech": "0", "hooli": "0", "stranger": "0"}
    # past the 24 h window, usage nobody claimed is kept as expired, never sent
    seal_hours(ledger, cfg, H + 3540 + SAAS_EXPIRY, offset=0)
    (nobody,) = [h for h in ledger.hours() if h.customer == ""]
    assert nobody.state == "expired" and nobody.quantity.text == "1"
    assert ledger.held_usage() == []


def test_a_customer_added_after_the_window_gets_an_expired_record(tmp_path: Path) -> None:
    cfg = saas_config(tmp_path, LOG_DIMS, idle_zero=False)
    ledger = Ledger(cfg.state_dir)
    record(ledger, H + 600, {key("late", None): D(20)})
    seal_hours(ledger, cfg, H + 3600, offset=0)
    assert ledger.hours() == [] and len(ledger.held_usage()) == 1
    add(ledger, "late")
    seal_hours(ledger, cfg, H + 600 + SAAS_EXPIRY, offset=0)
    (h,) = ledger.hours()
    assert (h.customer, h.state, h.quantity.text) == ("late", "expired", "2")
    from agent.sending import health

    snap = health.snapshot(ledger, H + 600 + SAAS_EXPIRY)
    assert snap["ok"] is False and "expired" in snap["reason"]


def test_max_label_sets_never_folds_a_customer(tmp_path: Path) -> None:
    from agent.collecting.sampling import Sampler
    from agent.collectors import Reading

    cfg = saas_config(tmp_path, LOG_DIMS + "    max_label_sets: 2\n")
    sampler = Sampler(cfg)
    dim = cfg.dimensions[0]
    parts = {key(f"c{i}", f"t{i}"): D(1) for i in range(5)} | {key("c9", None): D(2)}
    reading = Reading(D(7), breakdown=parts)
    out = sampler._bounded(dim, H, dict(reading.breakdown or {}))
    assert sum(out.values(), D(0)) == 7
    by_customer: dict[str, Decimal] = {}
    for k, v in out.items():
        by_customer[dict(k)["customer"]] = by_customer.get(dict(k)["customer"], D(0)) + v
    assert by_customer == {"c0": 1, "c1": 1, "c2": 1, "c3": 1, "c4": 1, "c9": 2}
    assert sum(1 for k in out if len(k) == 2) == 2  # the cap bounds the tenant combinations


def test_a_dimension_that_cannot_name_the_customer_is_a_config_error(tmp_path: Path) -> None:
    dims = "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
    with pytest.raises(ConfigError) as e:
        saas_config(tmp_path, dims)
    assert "customer_label" in str(e.value) and "dimensions[0].collector" in str(e.value)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(samples=st.lists(parts_strategy, min_size=1, max_size=8))
def test_through_the_ledger_every_customer_matches_the_oracle(
    tmp_path_factory: pytest.TempPathFactory,
    samples: list[dict[tuple[str | None, str | None], Decimal]],
) -> None:
    tmp = tmp_path_factory.mktemp("saas")
    cfg = saas_config(tmp, LOG_DIMS)
    dim = replace(cfg.dimensions[0])
    ledger = Ledger(cfg.state_dir)
    for label in KNOWN:
        add(ledger, label)
    hour = [
        (H + 60.0 * (i + 1), {key(c, t): v for (c, t), v in parts.items() if v})
        for i, parts in enumerate(samples)
    ]
    for t, parts in hour:
        record(ledger, t, parts)
    seal_hours(ledger, cfg, H + 3700, offset=0)
    add(ledger, "stranger")
    seal_hours(ledger, cfg, H + 3800, offset=0)
    rows = {h.customer: h.quantity.text for h in ledger.hours()}
    for c in (*KNOWN, "stranger"):
        used = any(dict(k).get("customer") == c for _, p in hour for k in p)
        zero = to_quantity(D(0), dim.scale, dim.rounding, dim.decimals).text
        assert rows.get(c) == (oracle(dim, hour, c)[1] if used else (zero if c in KNOWN else None))
    ledger.close()


def test_a_reading_of_more_customers_than_the_collector_cap_keeps_each(tmp_path: Path) -> None:
    """Beyond the collectors' 10,000 label sets a reading folds the rest under `()`; in SaaS mode
    a set keeps its customer label, so no customer's lines become nobody's usage."""
    from agent.collecting.sampling import Sampler
    from agent.collectors.base import MAX_LABEL_SETS

    log = tmp_path / "app.log"
    n = MAX_LABEL_SETS + 50
    log.write_text("".join(f"c={i} t=x{i % 3} n=1\n" for i in range(n)) + "c=7 t=y n=2\n")
    dims = LOG_DIMS.replace("/nonexistent/app.log", str(log)).replace(
        "mode: sum}", "mode: sum, start_at: beginning}"
    )
    cfg = saas_config(tmp_path, dims)
    sample = Sampler(cfg).take(cfg.dimensions[0], H, None)
    assert sample.error is None and sample.value == n + 2
    by: dict[str, Decimal] = {}
    for k, v in (sample.breakdown or {}).items():
        who = dict(k).get("customer", "")
        by[who] = by.get(who, D(0)) + v
    assert "" not in by and len(by) == n
    assert by["7"] == 3 and all(by[str(i)] == 1 for i in range(n) if i != 7)


def test_held_usage_of_last_month_expires_at_0600_on_the_1st(tmp_path: Path) -> None:
    """Held usage follows sending.expires_at's rule: a previous month's usage is released only
    before 06:00 UTC on the 1st, whatever is left of its 24 h; status shows that deadline."""
    from datetime import datetime, timezone

    from agent.billing.saas_sealing import held_rows
    from agent.clock import iso

    hour = int(datetime(2027, 1, 31, 23, tzinfo=timezone.utc).timestamp())
    cutoff = int(datetime(2027, 2, 1, 6, tzinfo=timezone.utc).timestamp())
    cfg = saas_config(tmp_path, LOG_DIMS, idle_zero=False)
    ledger = Ledger(cfg.state_dir)
    for label, t in (("early", hour + 600), ("late", hour + 900)):
        record(ledger, t, {key(label, None): D(20)})
    seal_hours(ledger, cfg, hour + 3600, offset=0)
    rows = held_rows(ledger.held_usage(), {d.name: d for d in cfg.dimensions})
    assert {r["expires_at"] for r in rows} == {iso(cutoff)}
    add(ledger, "early")
    seal_hours(ledger, cfg, cutoff - 60, offset=0)  # before the cutoff: released, sendable
    add(ledger, "late")
    seal_hours(ledger, cfg, cutoff + 3600, offset=0)  # 7 h after: the month is closed
    states = {h.customer: h.state for h in ledger.hours()}
    assert states == {"early": "pending", "late": "expired"}
