"""SaaS sending through a real boto3 client against the emulator's BatchMeterUsage, on a fake
clock shared by the agent and the emulator (Timestamps, windows and throttling)."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.aggregate import Allocation, Quantity
from agent.emulator import Emulator, Settings
from agent.ledger import Ledger
from agent.modes.saas import BatchSender
from agent.sending.batches import plan, usage_record
from agent.sending.budget import INTERVAL
from agent.sending.client import MeteringClient
from agent.sending.policy import due, expires_at
from agent.windows import SAAS_EXPIRY
from tests.conftest import PRODUCT, run_cli
from tests.saas import ServiceClock, add_customers, license_arn, saas_config, seal, subscribed

H = 1_800_000_000  # 2027-01-15T08:00:00Z


class Saas:
    def __init__(self, tmp_path: Path, clock: ServiceClock, emulator: Emulator) -> None:
        self.tmp_path, self.clock, self.emulator = tmp_path, clock, emulator
        self.config = saas_config(tmp_path, emulator.url)
        self.ledger = Ledger(self.config.state_dir)
        self.client = MeteringClient("us-east-1", emulator.url, clock=clock)

    def sender(self) -> BatchSender:
        return BatchSender(self.ledger, self.config, self.client, self.clock, random.Random(1))

    def batches(self) -> list[dict[str, Any]]:
        """The BatchMeterUsage requests the emulator received that carried records."""
        return [
            c["request"]
            for c in self.emulator.received()
            if c["operation"] == "BatchMeterUsage" and c["request"]["UsageRecords"]
        ]

    def states(self) -> dict[tuple[str, str, int], tuple[str, str | None]]:
        return {
            (h.customer, h.dimension, h.hour): (h.state, h.record_id) for h in self.ledger.hours()
        }


@pytest.fixture
def saas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Saas]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSAASTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "saas-test-secret")
    clock = ServiceClock(H + 3600 + 30)
    emulator = Emulator(Settings(product_codes={PRODUCT}), clock)
    emulator.serve(0)
    s = Saas(tmp_path, clock, emulator)
    yield s
    s.ledger.close()
    emulator.stop()


def labels(n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def emulated_ids(emulator: Emulator) -> dict[tuple[str, int], str]:
    """The service's own records: (customer key, hour) -> MeteringRecordId, one dimension."""
    return {(r.customer or "", r.hour): r.record_id for r in emulator.records() if r.customer}


def test_60_customers_go_in_3_calls_and_every_record_lands(saas: Saas) -> None:
    customers = add_customers(saas.ledger, labels(60))
    for c in customers:
        seal(saas.ledger, c.label, "requests", H, 7)
    saas.sender().run()
    assert [len(b["UsageRecords"]) for b in saas.batches()] == [25, 25, 10]
    assert all("ProductCode" not in b for b in saas.batches())  # license records
    records = saas.emulator.records()
    assert len(records) == 60  # the service's own count: each customer once
    by_customer = {r.customer: r.record_id for r in records}
    for c in customers:
        state, record_id = saas.states()[(c.label, "requests", H)]
        assert state == "sent" and record_id == by_customer[f"{c.account_id}|{c.license_arn}"]


def test_per_record_status_lands_on_each_record(saas: Saas) -> None:
    ok, gone, dup = add_customers(saas.ledger, ["ok", "gone", "dup"])
    saas.emulator.configure(customers=subscribed([ok, dup]))  # `gone` unsubscribed
    # the service already holds another quantity for dup's hour
    other = _sealed_copy(saas, dup.label, 5)
    earlier = saas.client.batch_meter_usage([usage_record(other)], None)
    assert [r.status for r in earlier.results] == ["Success"]
    for c in (ok, gone, dup):
        seal(saas.ledger, c.label, "users", H, 9)
    saas.sender().run()
    got = {h.customer: (h.state, h.last_error) for h in saas.ledger.hours() if h.customer}
    assert got["ok"] == ("sent", None)
    assert got["gone"][0] == "rejected" and got["gone"][1].startswith("CustomerNotSubscribed")
    assert got["dup"][0] == "rejected" and got["dup"][1].startswith("DuplicateRecord")
    assert [r.quantity_text for r in saas.emulator.records() if "l-dup" in (r.customer or "")] == [
        "5"
    ]  # never overwritten


def _sealed_copy(saas: Saas, label: str, quantity: int) -> Any:
    """A sealed record in a scratch ledger (to make the service hold another quantity)."""
    scratch = Ledger(saas.tmp_path / "scratch")
    known = saas.ledger.customer(label)
    assert known is not None
    scratch.add_customer(known)
    seal(scratch, label, "users", H, quantity)
    (h,) = scratch.pending()
    scratch.close()
    return h


def test_an_identical_resend_is_success_with_the_same_record_id(saas: Saas) -> None:
    (c,) = add_customers(saas.ledger, ["again"])
    seal(saas.ledger, c.label, "requests", H, 3)
    (h,) = saas.ledger.pending()
    saas.sender().run()
    (sent,) = saas.ledger.hours()
    again = saas.client.batch_meter_usage([usage_record(h)], None)
    assert [(r.status, r.record_id) for r in again.results] == [("Success", sent.record_id)]
    assert len(saas.emulator.records()) == 1


def test_unprocessed_records_are_resubmitted_identically_after_a_backoff(saas: Saas) -> None:
    customers = add_customers(saas.ledger, labels(10))
    for c in customers:
        seal(saas.ledger, c.label, "requests", H, 4)
    saas.emulator.configure(unprocessed=3)  # the call's first 3 records come back unprocessed
    saas.sender().run()
    first, second = saas.batches()
    assert second["UsageRecords"] == first["UsageRecords"][:3]  # the same records, identical
    assert saas.clock.slept and max(saas.clock.slept) > INTERVAL  # a backoff, not pacing
    hours = saas.ledger.hours()
    assert [h.state for h in hours] == ["sent"] * 10
    assert sorted(h.attempts for h in hours) == [1] * 7 + [2] * 3
    assert len(saas.emulator.records()) == 10


def halving_calls(n: int, bad: int) -> int:
    """Calls the bisection makes for one bad record at index `bad` of `n` (the first call
    included): at each level both halves go, the good one succeeds."""
    calls, lo, hi = 1, 0, n
    while hi - lo > 1:
        mid = lo + (hi - lo + 1) // 2
        calls += 2
        lo, hi = (lo, mid) if bad < mid else (mid, hi)
    return calls


@pytest.mark.parametrize("bad", [0, 11, 24])
def test_one_bad_record_is_found_by_halving_and_alone_rejected(saas: Saas, bad: int) -> None:
    customers = add_customers(saas.ledger, labels(25))
    # a customer stored with a malformed license: the service refuses the whole call
    broken = customers[bad]
    saas.ledger.add_customer(
        type(broken)(broken.label, broken.account_id, "arn:aws:license-manager::bad license",
                     None, None, PRODUCT, 0.0)
    )  # fmt: skip
    for c in customers:
        seal(saas.ledger, c.label, "requests", H, 2)
    saas.sender().run()
    calls = saas.batches()
    assert len(calls) == halving_calls(25, bad) <= 1 + 2 * math.ceil(math.log2(25))
    states = {h.customer: (h.state, h.last_error or "") for h in saas.ledger.hours()}
    assert states.pop(broken.label)[0] == "rejected"
    assert set(states.values()) == {("sent", "")}
    assert len(saas.emulator.records()) == 24


def test_records_out_of_the_24h_window_expire_before_sending_and_the_rest_go(saas: Saas) -> None:
    add_customers(saas.ledger, ["old", "edge", "fresh"])
    now = saas.clock.time()
    for label, ts in (("old", now - 24 * 3600 - 100), ("edge", now - SAAS_EXPIRY + 10)):
        seal(saas.ledger, label, "requests", int(ts // 3600 * 3600), 1, timestamp=int(ts))
    seal(saas.ledger, "fresh", "requests", H, 1)
    saas.sender().run()
    states = {h.customer: h.state for h in saas.ledger.hours()}
    assert states == {"old": "expired", "edge": "sent", "fresh": "sent"}
    sent = [r["LicenseArn"] for b in saas.batches() for r in b["UsageRecords"]]
    assert sorted(sent) == [license_arn("edge"), license_arn("fresh")]
    assert len(saas.emulator.records()) == 2


def test_the_service_refuses_a_whole_call_holding_one_record_past_24h(saas: Saas) -> None:
    add_customers(saas.ledger, ["a", "b"])
    now = saas.clock.time()
    seal(saas.ledger, "a", "requests", H - 24 * 3600, 1, timestamp=int(now - 24 * 3600 - 1))
    seal(saas.ledger, "b", "requests", H, 1)
    pending = {h.customer: h for h in saas.ledger.pending()}
    out = saas.client.batch_meter_usage(
        [usage_record(pending["a"]), usage_record(pending["b"])], None
    )
    assert out.call.code == "TimestampOutOfBoundsException" and not saas.emulator.records()


def month_start(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp())


@pytest.mark.parametrize(("after_six", "expected"), [(False, "sent"), (True, "expired")])
def test_last_months_records_expire_at_0600_on_the_1st(
    saas: Saas, after_six: bool, expected: str
) -> None:
    first = month_start(2027, 2)
    saas.clock.t = first + 6 * 3600 + (10 if after_six else -60)
    add_customers(saas.ledger, ["jan", "feb"])
    seal(saas.ledger, "jan", "users", first - 3600, 5)  # Jan 31 23:00, Timestamp 23:59:59
    seal(saas.ledger, "feb", "users", first, 5)  # Feb 1 00:00
    (jan,) = [h for h in saas.ledger.pending() if h.customer == "jan"]
    assert expires_at(jan) == first + 6 * 3600  # sooner than its 24 h
    assert due(saas.ledger.send_state(), saas.ledger.pending()) <= first + 6 * 3600
    saas.sender().run()
    assert {h.customer: h.state for h in saas.ledger.hours()} == {"jan": expected, "feb": "sent"}
    sent = [r["LicenseArn"] for b in saas.batches() for r in b["UsageRecords"]]
    assert (license_arn("jan") in sent) is (not after_six) and license_arn("feb") in sent


def test_legacy_and_license_records_never_share_a_call(saas: Saas) -> None:
    new = add_customers(saas.ledger, labels(30, "n"))
    old = add_customers(saas.ledger, labels(30, "o"), legacy=True)
    for c in new + old:
        seal(saas.ledger, c.label, "requests", H, 1)
    saas.sender().run()
    kinds = []
    for b in saas.batches():
        legacy = {"CustomerIdentifier" in r for r in b["UsageRecords"]}
        assert len(legacy) == 1  # never mixed
        assert ("ProductCode" in b) == legacy.pop()  # ProductCode only on legacy calls
        assert b.get("ProductCode") in (None, PRODUCT)
        kinds.append(("ProductCode" in b, len(b["UsageRecords"])))
    assert sorted(kinds) == [(False, 5), (False, 25), (True, 5), (True, 25)]
    assert {h.state for h in saas.ledger.hours()} == {"sent"}
    assert len(saas.emulator.records()) == 60


def test_calls_stay_under_1mb_with_large_allocations(saas: Saas) -> None:
    customers = add_customers(saas.ledger, labels(7))
    allocations = [Allocation((("Tenant", f"t{i:04d}-" + "x" * 140),), 1) for i in range(2500)]
    for c in customers:
        seal(saas.ledger, c.label, "requests", H, 2500, allocations=allocations)
    saas.sender().run()
    sizes = [c["size"] for c in saas.emulator.received() if c["request"]["UsageRecords"]]
    assert sizes and all(s < 1_000_000 for s in sizes)
    assert max(sizes) > 500_000  # calls are filled, not one record each
    assert sum(len(b["UsageRecords"]) for b in saas.batches()) == 7
    assert {h.state for h in saas.ledger.hours()} == {"sent"}


def test_calls_are_paced_under_10_a_second_on_the_clock(saas: Saas) -> None:
    customers = add_customers(saas.ledger, labels(100))
    for c in customers:
        for dim, q in (("requests", 3), ("storage_gb", "1.500"), ("users", 2)):
            seal(saas.ledger, c.label, dim, H, q)
    saas.sender().run()
    times = [c["time"] for c in saas.emulator.calls() if c["request"]["UsageRecords"]]
    assert len(times) == 12
    assert times[-1] - times[0] >= (len(times) - 1) / 10
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(times))
    assert not saas.emulator.calls("error")  # the emulator's bucket (on this clock) never throttled
    assert len(saas.emulator.records()) == 300


def test_throttling_is_retried_with_backoff_and_the_identical_call(saas: Saas) -> None:
    customers = add_customers(saas.ledger, labels(5))
    for c in customers:
        seal(saas.ledger, c.label, "requests", H, 1)
    saas.emulator.inject(
        "error", code="ThrottlingException", status=400, operation="BatchMeterUsage"
    )
    saas.sender().run()
    first, second = saas.batches()
    assert first == second
    assert {h.state for h in saas.ledger.hours()} == {"sent"}
    assert saas.ledger.send_state().failures == 0  # a success ends the streak


def test_denied_probe_pauses_sending_until_it_passes(saas: Saas) -> None:
    (c,) = add_customers(saas.ledger, ["p"])
    seal(saas.ledger, c.label, "requests", H, 1)
    saas.ledger.schedule_dryrun(saas.clock.time())  # what `run` does at startup
    saas.emulator.configure(authorized=False)
    report = saas.sender().run()
    assert report.paused and saas.batches() == []
    probes = [c["request"] for c in saas.emulator.received()]
    assert probes == [{"UsageRecords": [], "ProductCode": PRODUCT}]
    assert saas.ledger.send_state().authorized is False
    saas.emulator.configure(authorized=True)
    saas.clock.advance(300)
    saas.sender().run()
    assert [h.state for h in saas.ledger.hours()] == ["sent"]


@pytest.mark.parametrize(("authorized", "code"), [(True, 0), (False, 77)])
def test_check_in_saas_mode_probes_with_an_empty_batch(
    saas: Saas, authorized: bool, code: int
) -> None:
    saas.emulator.configure(authorized=authorized)
    env = {"AWS_ACCESS_KEY_ID": "AKIDSAASTEST", "AWS_SECRET_ACCESS_KEY": "s"}
    result = run_cli("check", "-c", str(saas.config.source), env=env)
    assert result.returncode == code, result.stdout + result.stderr
    assert [c["request"] for c in saas.emulator.received()] == [
        {"UsageRecords": [], "ProductCode": PRODUCT}
    ]
    assert "Traceback" not in result.stderr


def test_plan_is_deterministic_and_keeps_the_limits(saas: Saas) -> None:
    new = add_customers(saas.ledger, labels(40, "n"))
    old = add_customers(saas.ledger, labels(12, "o"), legacy=True)
    for c in new + old:
        seal(saas.ledger, c.label, "users", H, 1)
    by_label = {c.label: c for c in new + old}
    pending = saas.ledger.pending()
    calls = plan(pending)
    assert plan(pending) == calls
    assert [(c.product_code, len(c.records)) for c in calls] == [
        (None, 25), (None, 15), (PRODUCT, 12)
    ]  # fmt: skip
    assert sorted(h.customer for c in calls for h in c.records) == sorted(by_label)
    assert json.dumps([len(c.requests) for c in calls]) == "[25, 15, 12]"


@given(
    ts=st.integers(1_700_000_000, 1_900_000_000),
    age=st.integers(-3600, 40 * 86400),
)
def test_one_timestamp_bound_selects_exactly_the_expired_records(ts: int, age: int) -> None:
    """The pass selects expired records by `timestamp <= expired_upto(now)`: the same set as
    `now >= expires_at(h)` record by record (24 h less a minute, and the month-end cutoff)."""
    from agent.aggregate import Quantity
    from agent.ledger.hours import SealedHour
    from agent.windows import expired_upto

    h = SealedHour("d", ts // 3600 * 3600, PRODUCT, Quantity(1), ts, "t", 1, "1", "pending",
                   None, 0, None, 0.0, 0.0, None, customer="c")  # fmt: skip
    now = float(ts + age)
    assert (now >= expires_at(h)) == (ts <= expired_upto(now))


def test_due_from_the_bounds_is_due_from_every_pending_record(saas: Saas) -> None:
    """The daemon asks `due` on each send tick from two stand-ins per kind of record, not from
    300,000 rows: the answer is the same as from all of them."""
    from agent.ledger import Ledger as L

    assert saas.ledger.pending_bounds() == []
    add_customers(saas.ledger, ["a", "b", "c"])
    first = month_start(2027, 2)
    seal(saas.ledger, "a", "users", first - 3600, 1, next_attempt=first + 9000)  # month cutoff
    seal(saas.ledger, "b", "users", first, 1, next_attempt=first + 5000)
    seal(saas.ledger, "c", "requests", first + 3600, 1, next_attempt=first + 4000)
    instance = L(saas.tmp_path / "inst")
    with instance.transaction() as db:
        instance.insert_sealed(
            db, dimension="vcpus", hour=first, product_code=PRODUCT, quantity=Quantity(2),
            timestamp=first + 3599, client_token="t", samples=1, raw="2", sealed_at=first + 3600,
            next_attempt=first + 7200,
        )  # fmt: skip
    for ledger in (saas.ledger, instance):
        state = ledger.send_state()
        assert due(state, ledger.pending_bounds()) == due(state, ledger.pending())
    assert due(saas.ledger.send_state(), saas.ledger.pending_bounds()) == first + 4000
    saas.ledger.settle_records(first, sent=[(h, "r") for h in saas.ledger.pending()[2:]])
    assert due(saas.ledger.send_state(), saas.ledger.pending_bounds()) == first + 5000
    instance.close()
