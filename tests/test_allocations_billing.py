"""Allocations through the billing loop: sealed with the quantity, stored immutable, resent
identically through a real boto3 client, shown by status and report, checked by the emulator
as the service checks them."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.aggregate import Allocation, Quantity, to_json
from agent.emulator import Emulator
from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from agent.sending.client import MeteringClient, build_request
from agent.windows import span_for
from tests.billing import H, make_config
from tests.conftest import PRODUCT, run_cli

ALLOCS = (
    Allocation((), 1),
    Allocation((("Project", "x y"), ("Tenant", "acme")), 2),
    Allocation((("Tenant", "globex"),), 4),
)


def seal(ledger: Ledger, hour: float, allocations: tuple[Allocation, ...] = ALLOCS) -> None:
    with ledger.transaction() as db:
        ledger.insert_sealed(
            db, dimension="api", hour=int(hour), product_code=PRODUCT, quantity=Quantity(7),
            timestamp=int(hour) + 3540, client_token=f"tok-{hour}", samples=3, raw="7",
            sealed_at=hour + 3600, next_attempt=hour + 3600, allocations=allocations,
        )  # fmt: skip


def test_allocations_are_stored_with_the_request_and_never_change(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    seal(ledger, H)
    seal(ledger, H + 3600, ())
    ledger.close()
    ledger = Ledger(tmp_path)  # reread from disk
    (h, none) = ledger.pending()
    assert h.allocations == ALLOCS and none.allocations == ()
    for value in (json.dumps(to_json(ALLOCS[:2])), None):
        with (
            pytest.raises(sqlite3.IntegrityError, match="never change"),
            ledger.transaction() as db,
        ):
            db.execute("UPDATE hours SET allocations = ? WHERE hour = ?", (value, H))
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as db:
        db.execute("UPDATE hours SET allocations = '[]' WHERE hour = ?", (H + 3600,))
    # a re-issue under a corrected product code keeps them
    assert ledger.reissue("api", H, product_code="fixedcode", client_token="t2", now=H + 4000)
    (h, _) = ledger.pending()
    assert (h.product_code, h.allocations) == ("fixedcode", ALLOCS)


def test_a_ledger_of_schema_4_migrates_and_its_hours_have_none(tmp_path: Path) -> None:
    from agent.ledger.migrations import _MIGRATIONS, _split_sql

    db = sqlite3.connect(tmp_path / "ledger.db")
    for v in range(1, 5):
        for statement in _split_sql(_MIGRATIONS[v]):
            db.execute(statement)
    db.execute("PRAGMA user_version = 4")
    db.execute(
        "INSERT INTO hours (dimension, hour, product_code, quantity, is_decimal, timestamp, "
        "client_token, samples, raw, state, sealed_at, next_attempt) "
        f"VALUES ('api', {H}, '{PRODUCT}', '7', 0, {H + 60}, 'tok', 1, '7', 'pending', 0, 0)"
    )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    (h,) = ledger.pending()
    assert h.allocations == ()
    assert "UsageAllocations" not in build_request(
        h.product_code, h.dimension, h.timestamp, h.quantity, h.client_token, h.allocations
    )
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as db:
        db.execute("UPDATE hours SET allocations = '[]'")


LABELLED = """
  - name: api
    collector: {type: log, path: /nonexistent/app.log, pattern: 'GET( t=(?P<tenant>[a-z]+))?'}
    scale: 0.5
    rounding: up
    allocations: {tags: {Tenant: tenant}}
  - name: plain
    collector: {type: log, path: /nonexistent/app.log, pattern: GET}
"""


def test_sealing_stores_allocations_summing_to_the_quantity(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, dims=LABELLED)
    ledger = Ledger(cfg.state_dir)
    for i, value in enumerate(("3", "4")):
        for dim in ("api", "plain"):
            t = H + i * 60
            ledger.record_sample(dim, t, Decimal(value), span_for(t, 60),
                                 None, carry=True)  # fmt: skip
    seal_hours(ledger, cfg, H + 3700, offset=0)
    hours = {h.dimension: h for h in ledger.pending()}
    assert hours["api"].quantity == Quantity(4)  # 7 x 0.5 up
    # samples without a breakdown are usage with no label: the untagged allocation
    assert hours["api"].allocations == (Allocation((), 4),)
    assert hours["plain"].allocations == ()


def test_sealing_splits_the_stored_breakdowns_by_tenant(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, dims=LABELLED)
    ledger = Ledger(cfg.state_dir)
    acme, globex = (("tenant", "acme"),), (("tenant", "globex"),)
    for i, split in enumerate(({acme: 3, (): 1}, {acme: 2, globex: 5})):
        t = H + i * 60
        parts = {k: Decimal(v) for k, v in split.items()}
        ledger.record_sample("api", t, sum(parts.values(), Decimal(0)), span_for(t, 60), None,
                             carry=True, increment=True, breakdown=parts)  # fmt: skip
    ledger.close()
    ledger = Ledger(cfg.state_dir)  # the breakdowns come back from disk
    seal_hours(ledger, cfg, H + 3700, offset=0)
    (h,) = ledger.pending()
    # 11 x 0.5 = 5.5, up: 6. acme 2.5, globex 2.5, untagged 0.5: floors 2 + 2 + 0, two units
    # left, all remainders .5: the tie goes in tag order (untagged first, then acme)
    assert h.quantity == Quantity(6)
    assert h.allocations == (
        Allocation((), 1),
        Allocation((("Tenant", "acme"),), 3),
        Allocation((("Tenant", "globex"),), 2),
    )


@pytest.fixture
def client(emulator: Emulator) -> MeteringClient:
    return MeteringClient("us-east-1", emulator.url)


def now_hour() -> int:
    t = int(datetime.now(timezone.utc).timestamp())
    return t - t % 3600 - 3600


def test_the_sealed_allocations_are_sent_and_resent_identically(
    tmp_path: Path, client: MeteringClient, emulator: Emulator
) -> None:
    hour = now_hour()
    ledger = Ledger(tmp_path)
    seal(ledger, hour)
    emulator.inject("lose")  # recorded, answer lost: the sender tries again
    (h,) = Ledger(tmp_path).pending()
    assert client.meter_usage(h).status == "retry"
    (h,) = Ledger(tmp_path).pending()  # as the next send child rereads it
    again = client.meter_usage(h)
    assert again.status == "sent"
    (record,) = emulator.records()
    assert again.record_id == record.record_id
    assert record.allocations == to_json(ALLOCS)
    first, second = (c["request"] for c in emulator.received())
    assert first == second and first["UsageAllocations"] == to_json(ALLOCS)


def test_decimal_quantities_allocate_as_decimals(
    tmp_path: Path, client: MeteringClient, emulator: Emulator
) -> None:
    hour = now_hour()
    allocs = (Allocation((("Tenant", "a"),), "1.250"), Allocation((("Tenant", "b"),), "0.750"))
    request = build_request(PRODUCT, "api", hour + 60, Quantity("2.000"), "t", allocs)
    assert request["UsageAllocations"] == [
        {"AllocatedUsageQuantityAsDecimal": "1.250", "Tags": [{"Key": "Tenant", "Value": "a"}]},
        {"AllocatedUsageQuantityAsDecimal": "0.750", "Tags": [{"Key": "Tenant", "Value": "b"}]},
    ]
    assert client.call(request).status == "sent"


def base_request() -> dict[str, Any]:
    return {
        "ProductCode": PRODUCT,
        "Timestamp": datetime.fromtimestamp(now_hour() + 60, tz=timezone.utc),
        "UsageDimension": "api",
        "UsageQuantity": 3,
    }


def tag(key: str, value: str) -> dict[str, str]:
    return {"Key": key, "Value": value}


@pytest.mark.parametrize(
    ("allocations", "code"),
    [
        ([{"AllocatedUsageQuantity": 1}, {"AllocatedUsageQuantity": 1, "Tags": [tag("T", "a")]}],
         "InvalidUsageAllocationsException"),  # sums to 2, not 3
        ([{"AllocatedUsageQuantityAsDecimal": "3"}], "InvalidUsageAllocationsException"),
        ([{"AllocatedUsageQuantity": 2, "Tags": [tag("T", "a")]},
          {"AllocatedUsageQuantity": 1, "Tags": [tag("T", "a")]}],
         "InvalidUsageAllocationsException"),  # the same tag set twice
        ([{"AllocatedUsageQuantity": 2, "Tags": [tag("T", "a"), tag("U", "b")]},
          {"AllocatedUsageQuantity": 1, "Tags": [tag("U", "b"), tag("T", "a")]}],
         "InvalidUsageAllocationsException"),  # the same set in another order
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag(f"K{i}", "v") for i in range(6)]}],
         "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag("bad#key", "v")]}], "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag("K", "bad!value")]}], "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag("K" * 101, "v")]}], "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag("K", "v" * 257)]}], "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 3, "Tags": [tag("K", "a"), tag("K", "b")]}],
         "InvalidTagException"),
        ([{"AllocatedUsageQuantity": 0, "Tags": [tag("T", f"t{i}")]} for i in range(2500)]
         + [{"AllocatedUsageQuantity": 3}], "ValidationException"),
    ],
)  # fmt: skip
def test_the_emulator_refuses_what_the_service_refuses(
    client: MeteringClient, emulator: Emulator, allocations: list[Any], code: str
) -> None:
    outcome = client.call({**base_request(), "UsageAllocations": allocations})
    assert (outcome.status, outcome.code) == ("rejected", code)
    assert emulator.records() == []


def test_the_emulator_takes_the_limits_themselves(
    client: MeteringClient, emulator: Emulator
) -> None:
    most = [{"AllocatedUsageQuantity": 0, "Tags": [tag("T", f"t{i}")]} for i in range(2499)]
    allowed = "aZ09+ -=._:/@"
    tags = [tag(allowed + "k" * 87, allowed + "v" * 243)] + [tag(f"K{i}", "v") for i in range(4)]
    request = {**base_request(), "UsageAllocations": [*most, {"AllocatedUsageQuantity": 3}]}
    assert client.call(request).status == "sent"
    request = {
        **base_request(),
        "UsageDimension": "other",
        "UsageAllocations": [{"AllocatedUsageQuantity": 3, "Tags": tags}],
    }
    assert client.call(request).status == "sent"
    assert [len(r.allocations) for r in emulator.records()] == [2500, 1]


def test_status_and_report_json_show_the_allocations(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, dims=LABELLED)
    ledger = Ledger(cfg.state_dir)
    hour = now_hour()
    seal(ledger, hour)
    ledger.close()
    status = json.loads(run_cli("status", "--json", "-c", str(cfg.source)).stdout)
    report = json.loads(
        run_cli("report", "--since", "1d", "--format", "json", "-c", str(cfg.source)).stdout
    )
    for rows in (status["hours"], report):
        (row,) = rows
        assert row["allocations"] == to_json(ALLOCS)
