"""Review 16's seams of SaaS sending: records of the other mode, whole-call errors that are not
about one record, per-record refusals and idle zeros in health, health on a large ledger, and
held usage at a month boundary."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.aggregate import Quantity
from agent.clock import iso_hour
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.modes.instance import Sender
from agent.modes.saas import BatchSender
from agent.sending import health
from agent.sending.outcomes import BatchOutcome, Outcome
from agent.sending.policy import due, sendable_at
from tests import test_batching
from tests.conftest import PRODUCT
from tests.fakes import FakeClock
from tests.saas import add_customers, license_arn, seal, subscribed
from tests.test_batching import H, Saas, labels

saas = test_batching.saas  # the fixture


def instance_hour(ledger: Ledger, hour: int, quantity: int = 3) -> None:
    with ledger.transaction() as db:
        ledger.insert_sealed(db, dimension="requests", hour=hour, product_code=PRODUCT,
                             quantity=Quantity(quantity), timestamp=hour + 3599,
                             client_token=str(uuid.uuid4()), samples=60, raw=str(quantity),
                             sealed_at=hour + 3600, next_attempt=hour + 3600)  # fmt: skip


class MeterUsage:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def meter_usage(self, h: Any) -> Outcome:
        self.sent.append(h)
        return Outcome("sent", record_id=f"r-{len(self.sent)}")

    def dry_run(self, *args: Any) -> Outcome:
        return Outcome("dryrun_ok")


def test_instance_sender_sends_its_hours_and_leaves_saas_records(tmp_path: Path) -> None:
    log = tmp_path / "u.log"
    log.touch()
    (tmp_path / "c.yaml").write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        "metering: {region: us-east-1, send_window: 0, startup_check: false}\n"
        f"dimensions:\n  - name: requests\n    collector: {{type: log, path: {log}, pattern: x}}\n"
    )
    cfg = config_mod.load(tmp_path / "c.yaml")
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(Customer("acme", "123456789012", license_arn("a"), None, None, None, 0.0))
    seal(ledger, "acme", "requests", H, 7)  # left from saas mode
    instance_hour(ledger, H + 3600)
    client = MeterUsage()
    clock = FakeClock(H + 7300)
    for _ in range(2):
        Sender(ledger, cfg, client, clock, random.Random(1)).run()
    assert [(h.customer, h.hour) for h in client.sent] == [("", H + 3600)]
    assert {(h.customer, h.state) for h in ledger.hours()} == {("", "sent"), ("acme", "pending")}
    # past the SaaS record's window too: the instance sender never expires it
    clock.t = H + 3 * 86400
    Sender(ledger, cfg, client, clock, random.Random(1)).run()
    assert [h.state for h in ledger.hours() if h.customer] == ["pending"]
    assert due(ledger.send_state(), ledger.pending_bounds(saas=False)) is None
    assert ledger.pending_other_kind(saas=False) == (1, H)


def test_instance_leftover_in_saas_mode_is_not_due(saas: Saas) -> None:
    instance_hour(saas.ledger, H - 7 * 3600)
    for _ in range(3):
        saas.sender().run()
        saas.clock.t += 15
    assert [(h.customer, h.state) for h in saas.ledger.hours()] == [("", "pending")]
    assert due(saas.ledger.send_state(), saas.ledger.pending_bounds(saas=True)) is None
    assert saas.ledger.pending_other_kind(saas=True) == (1, H - 7 * 3600)


class Refusing:
    """The emulator's client, but every BatchMeterUsage call is refused whole with `code`."""

    def __init__(self, real: Any, code: str) -> None:
        self.real, self.code, self.calls = real, code, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def batch_meter_usage(self, records: Any, product_code: Any) -> BatchOutcome:
        self.calls += 1
        return BatchOutcome(Outcome("rejected", code=self.code, message="not now"))


def test_a_whole_call_error_not_about_a_record_keeps_every_record_pending(saas: Saas) -> None:
    for c in add_customers(saas.ledger, labels(60)):
        seal(saas.ledger, c.label, "requests", H, 7)
    client = Refusing(saas.client, "DisabledApiException")
    BatchSender(saas.ledger, saas.config, client, saas.clock, random.Random(1)).run()
    hours = saas.ledger.hours()
    assert {h.state for h in hours} == {"pending"} and len(hours) == 60
    state = saas.ledger.send_state()
    assert all((sendable_at(state, h.next_attempt) or 0) > saas.clock.time() for h in hours)
    assert client.calls == 1  # no halving, and the pass ends: the next calls would fail alike
    assert due(state, saas.ledger.pending_bounds(saas=True)) == state.backoff_until
    snap = health.snapshot(saas.ledger, saas.clock.time())
    assert snap["ok"] is False and snap["failing_since"] is not None
    assert "DisabledApiException" in (snap["reason"] or "")
    # the service comes back: every record goes out
    saas.emulator.configure(customers=subscribed(saas.ledger.customers()))
    saas.clock.t = max(h.next_attempt for h in hours) + 1
    saas.sender().run()
    assert {h.state for h in saas.ledger.hours()} == {"sent"}
    assert health.snapshot(saas.ledger, saas.clock.time())["ok"] is True


def test_a_lone_invalid_record_is_still_rejected(saas: Saas) -> None:
    (c,) = add_customers(saas.ledger, ["bad"])
    seal(saas.ledger, c.label, "requests", H, 7)
    client = Refusing(saas.client, "ValidationException")
    BatchSender(saas.ledger, saas.config, client, saas.clock, random.Random(1)).run()
    assert [h.state for h in saas.ledger.hours()] == ["rejected"]


def test_idle_zero_for_an_unsubscribed_customer_keeps_health_ok(saas: Saas) -> None:
    ok, _gone = add_customers(saas.ledger, ["ok", "gone"])
    saas.emulator.configure(customers=subscribed([ok]))
    seal(saas.ledger, "ok", "requests", H, 7)
    seal(saas.ledger, "gone", "requests", H, 0)  # its idle zero
    saas.sender().run()
    assert {h.customer: h.state for h in saas.ledger.hours()} == {"ok": "sent", "gone": "rejected"}
    snap = health.snapshot(saas.ledger, saas.clock.time())
    assert snap["ok"] is True and snap["failing_since"] is None, snap
    # marked removed: no more idle zeros for it, its row kept
    assert [c.label for c in saas.ledger.customers()] == ["ok"]
    assert saas.ledger.customer("gone") is not None


def test_a_refused_record_with_usage_shows_in_health_without_failing_since(saas: Saas) -> None:
    add_customers(saas.ledger, ["gone"])
    saas.emulator.configure(customers=[])
    seal(saas.ledger, "gone", "requests", H, 5)
    saas.sender().run()
    snap = health.snapshot(saas.ledger, saas.clock.time())
    assert snap["ok"] is False and snap["failing_since"] is None
    assert "customer gone rejected" in (snap["reason"] or "")


def test_health_reason_counts_refused_records_in_sql(tmp_path: Path) -> None:
    """The count and the newest refused record, as the Python filter over every row gave."""
    ledger = Ledger(tmp_path)
    for i, label in enumerate(["a", "b", "c", "d"]):
        seal(ledger, label, "requests", H + i * 3600, i)  # d's quantity: 3; a's: 0
    for label, hour in (("a", H), ("b", H + 3600), ("d", H + 3 * 3600)):
        ledger.settle_records(H + 5 * 3600, rejected=[
            (h, "CustomerNotSubscribed: x") for h in ledger.hours()
            if (h.customer, h.hour) == (label, hour)])  # fmt: skip
    (c,) = [h for h in ledger.hours() if h.customer == "c"]
    ledger.settle_records(H, retry=[(c, "InvalidUsageDimensionException: no", H + 9 * 3600)])
    n, newest = ledger.lost_records(H - 3600, {"InvalidUsageDimensionException"})
    assert n == 3 and newest is not None and (newest.customer, newest.hour) == ("d", H + 3 * 3600)
    snap = health.snapshot(ledger, H + 5 * 3600)
    assert snap["reason"].startswith(f"hour {iso_hour(H + 3 * 3600)} dimension requests customer d")
    assert snap["reason"].endswith("(and 2 more hour(s) in the last 24 h)")


def test_status_names_the_other_modes_pending_records(saas: Saas) -> None:
    from agent.commands import status

    add_customers(saas.ledger, ["acme"])
    seal(saas.ledger, "acme", "requests", H, 7)
    instance_hour(saas.ledger, H - 7 * 3600)
    report = status.collect(saas.ledger, saas.config, saas.clock)
    assert report["other_mode_pending"] == {
        "mode": "instance", "records": 1, "oldest_hour": iso_hour(H - 7 * 3600)
    }  # fmt: skip
    assert "mode: instance" in status.render(report)
