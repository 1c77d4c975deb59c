"""SaaS subscription notifications: parsing AWS Marketplace's messages (SNS envelope or raw
delivery), applying them to the ledger (idempotent, ordered by the notification's own time),
deleting a message only once applied, and what each state does to sealing: an unsubscribe seals
the customer's open usage at once, later usage is held, an unsubscribed customer gets no idle
zeros. All on an injected clock; the SQS side is a recording fake (test_e2e_subscriptions.py
drives a real SQS implementation)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent.billing.saas_sealing import UNSUBSCRIBED, status_sections
from agent.clock import iso
from agent.commands.customers import customers_table
from agent.config import Config
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.modes.saas import SaasMode, settings
from agent.sending import subscriptions
from agent.sending.client import QueueError, queue_endpoint
from agent.sending.notices import Ignored, Malformed, Notice, parse
from agent.windows import span_for
from tests.billing import H
from tests.conftest import PRODUCT
from tests.fakes import FakeClock

ACME, GLOBEX = "111111111111", "222222222222"


def payload(action: str, account: str | None = ACME, **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "action": action,
        "customer-identifier": f"cid-{account}",
        "product-code": PRODUCT,
        "offer-identifier": "offer-abc123",
        "isFreeTrialTermPresent": "false",
    }
    if account is not None:
        p["customer-aws-account-id"] = account
    p.update(extra)
    return p


def sns(body: Mapping[str, Any], at: str = "2027-01-15T08:20:00.000Z", mid: str = "n-1") -> str:
    """The SNS envelope SQS holds when raw message delivery is off (AWS's documented shape)."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": mid,
            "TopicArn": f"arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-"
            f"{PRODUCT}",
            "Message": json.dumps(body),
            "Timestamp": at,
            "SignatureVersion": "1",
            "Signature": "EXAMPLE",
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/cert.pem",
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        }
    )


def message(body: str, n: int = 1, sent_ms: int | None = None) -> dict[str, Any]:
    attrs = {"ApproximateReceiveCount": "1"}
    if sent_ms is not None:
        attrs["SentTimestamp"] = str(sent_ms)
    return {"MessageId": f"sqs-{n}", "ReceiptHandle": f"rh-{n}", "Body": body, "Attributes": attrs}


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, state",
    [
        ("subscribe-success", "subscribed"),
        ("subscribe-fail", "subscribe-failed"),
        ("unsubscribe-pending", "unsubscribe-pending"),
        ("unsubscribe-success", "unsubscribed"),
    ],
)
def test_an_sns_envelope_gives_the_action_buyer_and_the_notifications_own_time(
    action: str, state: str
) -> None:
    got = parse(message(sns(payload(action)), sent_ms=1), PRODUCT, received_at=0.0)
    assert isinstance(got, Notice)
    assert (got.action, got.state, got.account_id, got.customer_identifier) == (
        action, state, ACME, f"cid-{ACME}",
    )  # fmt: skip
    assert got.event_at == H + 1200  # the SNS Timestamp, not SQS's SentTimestamp
    assert (got.offer, got.free_trial, got.message_id) == ("offer-abc123", False, "n-1")


def test_raw_delivery_is_the_payload_itself_timed_by_sqs() -> None:
    body = json.dumps(payload("subscribe-success", isFreeTrialTermPresent="true"))
    got = parse(message(body, sent_ms=(H + 5) * 1000), PRODUCT, received_at=H + 99)
    assert isinstance(got, Notice)
    assert (got.event_at, got.free_trial, got.message_id) == (H + 5, True, "sqs-1")
    legacy = json.dumps(payload("subscribe-success", account=None))
    got = parse(message(legacy), PRODUCT, received_at=H + 99)
    assert isinstance(got, Notice)
    assert (got.account_id, got.buyer, got.event_at) == (None, "cid-None", H + 99)


@pytest.mark.parametrize(
    "body",
    [
        sns(payload("subscribe-success", **{"product-code": "otherproduct0000000000001"})),
        sns(payload("entitlement-updated")),
        json.dumps({"Type": "SubscriptionConfirmation", "TopicArn": "arn:x", "Message": "x"}),
    ],
)
def test_another_products_and_not_applied_messages_are_ignored(body: str) -> None:
    assert isinstance(parse(message(body), PRODUCT, 0.0), Ignored)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        json.dumps(
            {"Type": "Notification", "Message": "not json", "Timestamp": "2027-01-15T08:00Z"}
        ),
        sns(payload("subscribe-success"), at="yesterday"),
        json.dumps({"Type": "Weird"}),
        sns(payload("renamed-action")),
        sns({"action": "subscribe-success", "product-code": PRODUCT}),  # no buyer
        sns(payload("subscribe-success", account="12345")),
        sns({k: v for k, v in payload("subscribe-success").items() if k != "product-code"}),
    ],
)
def test_malformed_messages_are_named_not_applied(body: str) -> None:
    got = parse(message(body), PRODUCT, 0.0)
    assert isinstance(got, Malformed) and got.reason


def test_a_queue_url_names_its_region_or_is_the_endpoint() -> None:
    assert queue_endpoint("https://sqs.eu-west-1.amazonaws.com/123456789012/mp") == (
        "eu-west-1", None,
    )  # fmt: skip
    assert queue_endpoint("http://127.0.0.1:5000/123456789012/mp") == (
        None, "http://127.0.0.1:5000",
    )  # fmt: skip


# -- applying, deleting --------------------------------------------------------------------------


@dataclass
class FakeQueue:
    """Recording SQS: what was deleted, and receives scripted as answers or errors."""

    answers: list[Any] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def receive(self) -> Sequence[Mapping[str, Any]]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    def delete(self, receipt_handle: str) -> None:
        self.deleted.append(receipt_handle)


def customer(label: str, account: str) -> Customer:
    arn = f"arn:aws:license-manager::{account}:license:l-{label}"
    return Customer(label, account, arn, f"agmt-{label}", None, PRODUCT, float(H))


def test_a_message_is_deleted_only_after_it_is_applied_and_a_duplicate_changes_nothing(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    ledger.add_customer(customer("acme", ACME))
    queue = FakeQueue()
    clock = FakeClock(H + 1300)
    msgs = [
        message(sns(payload("subscribe-success"), at="2027-01-15T08:20:00Z"), 1),
        message("garbage", 2),
        message(sns(payload("subscribe-success", **{"product-code": "x" * 25})), 3),
        message(sns(payload("subscribe-success"), at="2027-01-15T08:20:00Z"), 4),  # SQS's duplicate
        message(sns(payload("unsubscribe-pending"), at="2027-01-15T08:10:00Z"), 5),  # late, older
    ]
    tally = subscriptions.handle(queue, ledger, PRODUCT, msgs, clock.time)
    assert tally.applied == ["applied", "duplicate", "stale"]
    assert (tally.ignored, tally.malformed) == (1, 1)
    assert queue.deleted == ["rh-1", "rh-3", "rh-4", "rh-5"]  # the malformed one stays
    state = ledger.subscription_states()["acme"]
    assert (state.state, state.event_at, state.applied_at) == ("subscribed", H + 1200, H + 1300)
    assert state.flush_due is None
    ledger.close()


def test_a_ledger_that_cannot_apply_leaves_every_message_in_the_queue(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.close()  # applying raises: the child would die, the messages come back
    queue = FakeQueue()
    msgs = [message(sns(payload("subscribe-success")), 1)]
    with pytest.raises(Exception, match="closed"):
        subscriptions.handle(queue, ledger, PRODUCT, msgs, lambda: float(H))
    assert queue.deleted == []


def test_a_failing_receive_backs_off_and_the_poll_goes_on(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    denied = QueueError("AccessDenied", "not authorized to sqs:ReceiveMessage", denied=True)
    queue = FakeQueue([denied, denied, [message(sns(payload("subscribe-success")), 1)]])
    clock = FakeClock(H)
    polls = iter([True, True, True, False])
    subscriptions.watch(queue, ledger, PRODUCT, clock, lambda: next(polls))
    assert clock.slept == [1.0, 2.0]
    assert queue.deleted == ["rh-1"]
    assert [s.state for s in ledger.subscriptions()] == ["subscribed"]
    ledger.close()


# -- what the states do to sealing ---------------------------------------------------------------


def saas_config(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\nmode: saas\n"
        "saas: {customer_label: customer, idle_zero: true,\n"
        "       notifications: {queue_url: 'http://127.0.0.1:9/123456789012/mp'}}\n"
        "dimensions:\n"
        "  - name: api\n"
        "    collector: {type: log, path: /nonexistent/app.log, pattern: 'c=(?P<customer>\\w+)'}\n"
        "    aggregate: sum\n"
        "  - name: seats\n"
        "    collector: {type: log, path: /nonexistent/app.log, pattern: 'c=(?P<customer>\\w+)'}\n"
        "    aggregate: max\n"
    )
    return config_mod.load(path)


def record(ledger: Ledger, t: float, **by: int) -> None:
    """One round's readings: `api` increments and `seats` levels, by customer."""
    parts = {(("customer", c),): Decimal(n) for c, n in by.items()}
    for name, increment in (("api", True), ("seats", False)):
        ledger.record_sample(name, t, sum(parts.values(), Decimal(0)), span_for(t, 60), None,
                             carry=increment, increment=increment, breakdown=parts)  # fmt: skip


def notify(ledger: Ledger, action: str, account: str, at: float) -> str:
    got = parse(message(json.dumps(payload(action, account)), sent_ms=int(at * 1000)), PRODUCT, at)
    assert isinstance(got, Notice)
    return subscriptions.apply(ledger, got, at)


def records(ledger: Ledger) -> dict[tuple[str, str, int], tuple[str, float]]:
    return {(h.customer, h.dimension, h.hour): (h.quantity.text, h.next_attempt)
            for h in ledger.hours()}  # fmt: skip


def test_unsubscribe_pending_seals_the_open_hour_now_and_later_usage_is_held(
    tmp_path: Path,
) -> None:
    cfg = saas_config(tmp_path)
    mode = SaasMode(settings(cfg))
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(customer("acme", ACME))
    ledger.add_customer(customer("globex", GLOBEX))
    for i in range(10):  # 08:00-08:09: acme 3 a minute (4 seats), globex 1 (2 seats)
        record(ledger, H + 60 * i, acme=3, globex=1)
    assert not mode.sealing_due(ledger)
    assert notify(ledger, "unsubscribe-pending", ACME, H + 600) == "applied"
    assert mode.sealing_due(ledger)  # the daemon's send tick seals at once, not at a round
    sealed = mode.seal_hours(ledger, cfg, H + 605, offset=900)
    assert {(s.dimension, s.quantity) for s in sealed} == {("api", "30"), ("seats", "3")}
    # acme's usage so far, due now (not at the hour's send slot); globex's hour stays open
    assert records(ledger) == {("acme", "api", H): ("30", H + 605),
                               ("acme", "seats", H): ("3", H + 605)}  # fmt: skip
    assert not mode.sealing_due(ledger)
    assert mode.seal_hours(ledger, cfg, H + 700, offset=900) == []  # nothing sealed twice
    for i in range(10, 60):  # the rest of the hour: both go on using it
        record(ledger, H + 60 * i, acme=5, globex=1)
    mode.seal_hours(ledger, cfg, H + 3605, offset=900)
    got = records(ledger)
    assert got[("globex", "api", H)] == ("60", H + 3600 + 900)  # all of its own hour
    assert got[("globex", "seats", H)] == ("1", H + 3600 + 900)
    assert got[("acme", "api", H)] == ("30", H + 605)  # unchanged: sealed once
    held = {(h.customer, h.dimension): h for h in ledger.held_usage()}
    assert set(held) == {("acme", "api"), ("acme", "seats")}
    assert sum(p.value for p in held[("acme", "api")].points) == 250  # 50 rounds of 5
    report = status_sections(ledger, cfg, "customer", H + 3605)
    assert {r["customer"] for r in report["held"]} == {UNSUBSCRIBED}
    assert report["subscriptions"]["by_state"] == {"not notified": 1, "unsubscribe-pending": 1}
    [row] = report["subscriptions"]["attention"]
    assert (row["customer"], row["state"], row["unsubscribe_sealed_at"]) == (
        "acme", "unsubscribe-pending", iso(H + 605),
    )  # fmt: skip
    ledger.close()


def test_an_unsubscribe_sealed_between_two_steps_of_its_hours_seal_is_not_sealed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hour's seal runs in steps (one customer a step here) and gives way between them; the
    daemon's send tick may seal an unsubscribing customer's open usage right then (seal_leaving).
    The step that reaches that customer must see it: no second record for the hour (before, the
    ledger's unique index refused one and the seal failed), no idle zero; its share held."""
    from agent.billing import saas_sealing
    from tests.test_saas_seal_steps import Steps

    cfg = saas_config(tmp_path)
    saas = settings(cfg)
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(customer("acme", ACME))
    ledger.add_customer(customer("globex", GLOBEX))
    for i in range(60):
        record(ledger, H + 60 * i, acme=3, globex=1)
    monkeypatch.setattr(saas_sealing, "STEP", 1)

    def unsubscribe_before_the_first_step(n: int) -> None:
        if n == 1:  # the seal has begun: the hour's points are read, no customer written yet
            assert notify(ledger, "unsubscribe-pending", ACME, H + 3601) == "applied"
            assert saas_sealing.seal_leaving(ledger, cfg, saas, H + 3602)  # acme's hour, now

    api = next(d for d in cfg.dimensions if d.name == "api")
    saas_sealing.seal_one(
        ledger, cfg, saas, api, H, H + 3602, 900, Steps(unsubscribe_before_the_first_step)
    )
    got = [(h.customer, h.quantity.text) for h in ledger.hours() if h.dimension == "api"]
    assert sorted(got) == [("acme", "180"), ("globex", "60")]  # one record each
    ledger.close()


def test_unsubscribe_success_stops_idle_zeros_and_resubscribing_bills_again(
    tmp_path: Path,
) -> None:
    cfg = saas_config(tmp_path)
    mode = SaasMode(settings(cfg))
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(customer("acme", ACME))
    ledger.add_customer(customer("globex", GLOBEX))
    assert notify(ledger, "subscribe-success", ACME, H - 10) == "applied"
    assert notify(ledger, "unsubscribe-success", ACME, H + 10) == "applied"
    mode.seal_hours(ledger, cfg, H + 15, offset=0)  # its flush: nothing open to seal
    record(ledger, H + 60, globex=2)
    record(ledger, H + 120, acme=7, globex=2)  # after unsubscribe-success: held
    mode.seal_hours(ledger, cfg, H + 3600, offset=0)
    assert set(records(ledger)) == {("globex", "api", H), ("globex", "seats", H)}  # no acme zero
    assert {h.customer for h in ledger.held_usage()} == {"acme"}
    assert notify(ledger, "subscribe-success", ACME, H + 3700) == "applied"
    record(ledger, H + 3720, acme=1)
    mode.seal_hours(ledger, cfg, H + 7200, offset=0)
    got = records(ledger)
    assert got[("acme", "api", H + 3600)][0] == "1"  # billed again
    assert got[("acme", "api", H)][0] == "7"  # its held hour had no record: released, sent
    lines = customers_table(ledger.customers(), ledger.subscription_states())
    assert f"subscribed {iso(H + 3700)}" in lines and "not notified" in lines
    ledger.close()


def test_subscribe_fail_is_kept_and_shown_and_billing_is_unchanged(tmp_path: Path) -> None:
    cfg = saas_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(customer("acme", ACME))
    assert notify(ledger, "subscribe-fail", ACME, H + 5) == "applied"
    record(ledger, H + 60, acme=4)
    SaasMode(settings(cfg)).seal_hours(ledger, cfg, H + 3600, offset=0)
    assert records(ledger)[("acme", "api", H)][0] == "4"  # the service decides; nothing lost
    report = status_sections(ledger, cfg, "customer", H + 3600)
    assert [r["state"] for r in report["subscriptions"]["attention"]] == ["subscribe-failed"]
    ledger.close()


def test_a_notification_before_the_registration_applies_once_the_customer_is_added(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    assert notify(ledger, "subscribe-success", GLOBEX, H) == "applied"
    assert ledger.subscription_states() == {}
    ledger.add_customer(customer("globex", GLOBEX))
    assert ledger.subscription_states()["globex"].state == "subscribed"
    ledger.close()


def test_migration_9_keeps_records_and_customers_and_a_reader_of_an_older_ledger_sees_none(
    tmp_path: Path,
) -> None:
    from tests.test_ledger import older_ledger

    db = older_ledger(tmp_path, 8)
    db.execute(
        "INSERT INTO customers (label, account_id, license_arn, added_at) VALUES (?, ?, ?, ?)",
        ("acme", ACME, "arn:l-acme", H),
    )
    db.execute(
        "INSERT INTO hours (customer, dimension, hour, product_code, quantity, is_decimal, "
        "timestamp, client_token, samples, raw, state, sealed_at, next_attempt) "
        "VALUES ('acme', 'api', ?, ?, '5', 0, ?, 'tok', 1, '5', 'pending', ?, ?)",
        (H, PRODUCT, H + 3599, H + 3600, H + 3600),
    )
    db.commit()
    db.close()
    old = Ledger(tmp_path, readonly=True)  # `status` before the agent migrated it
    assert old.subscription_states() == {} and old.flushes_due() == []
    old.close()
    ledger = Ledger(tmp_path)
    assert ledger.db.execute("SELECT customer, quantity, early FROM hours").fetchall() == [
        ("acme", "5", 0)
    ]
    assert notify(ledger, "unsubscribe-success", ACME, H + 4000) == "applied"
    assert ledger.flushes_due() == [(ACME, ["acme"])]
    ledger.close()


# -- the daemon: the kept child, the send tick, a reload ------------------------------------------


@dataclass
class KeptChild:
    """Records what the daemon asks of a kept child (fulfillment.process.HandlerProcess)."""

    calls: list[str] = field(default_factory=list)

    def ensure(self) -> None:
        self.calls.append("ensure")

    def restart(self) -> None:
        self.calls.append("restart")

    def stop(self) -> None:
        self.calls.append("stop")


def saas_daemon(tmp_path: Path, clock: FakeClock, child: KeptChild) -> Any:
    from agent.collecting.sampling import Sampler
    from agent.daemon.daemon import Daemon
    from agent.daemon.sender import SenderProcess
    from agent.host import identity
    from agent.modes.choose import mode_for
    from tests.test_daemon import FakeImds

    cfg = saas_config(tmp_path)
    state = Path(cfg.state_dir)
    ident = identity.Identity(FakeImds("i-1"), clock, state)
    ledger = ident.start(Ledger(state))
    sender = SenderProcess(lambda *_: ["true"], clock.monotonic)
    return Daemon(cfg, clock, ledger, ident, Sampler(cfg), sender, modes=mode_for,
                  notifications=child)  # fmt: skip


def test_the_send_tick_seals_an_unsubscribe_at_once_and_keeps_the_queue_child(
    tmp_path: Path,
) -> None:
    clock, child = FakeClock(H + 600), KeptChild()
    d = saas_daemon(tmp_path, clock, child)
    d.ledger.add_customer(customer("acme", ACME))
    record(d.ledger, H + 60, acme=3)
    d.send_tick()  # nothing due: the child kept, nothing sealed
    assert child.calls == ["ensure"] and d.ledger.hours() == []
    notify(d.ledger, "unsubscribe-pending", ACME, H + 601)
    clock.advance(15)
    d.send_tick()  # the next tick, not the next round (whatever the sampling interval)
    assert records(d.ledger) == {("acme", "api", H): ("3", H + 615),
                                 ("acme", "seats", H): ("3", H + 615)}  # fmt: skip
    text = d.config.source.read_text()
    d.config.source.write_text(text.replace(
        "       notifications: {queue_url: 'http://127.0.0.1:9/123456789012/mp'}}", "}"))  # fmt: skip
    before = d.config
    d.reload()  # the child set is chosen at start: refused, the running config kept
    assert d.config is before
    d.config.source.write_text(text.replace("127.0.0.1:9/", "127.0.0.1:10/"))
    d.reload()  # another queue: the child restarted to read it
    assert d.config is not before and child.calls[-1] == "restart"
    d.shutdown()
    assert child.calls[-1] == "stop"


def test_a_flush_that_fails_is_retried_and_meanwhile_the_customer_is_billed_with_its_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = saas_config(tmp_path)
    mode = SaasMode(settings(cfg))
    ledger = Ledger(cfg.state_dir)
    ledger.add_customer(customer("acme", ACME))
    record(ledger, H + 60, acme=3)
    notify(ledger, "unsubscribe-pending", ACME, H + 100)

    def broken(*_: Any) -> None:
        raise RuntimeError("injected: the early mark fails")

    monkeypatch.setattr(Ledger, "mark_early", broken)
    assert mode.seal_hours(ledger, cfg, H + 200, offset=0) == []  # contained, rolled back
    assert mode.sealing_due(ledger) and records(ledger) == {}
    record(ledger, H + 120, acme=2)
    mode.seal_hours(ledger, cfg, H + 3600, offset=0)  # still failing: billed with its hour
    assert records(ledger)[("acme", "api", H)] == ("5", H + 3600)
    assert ledger.held_usage() == []
    monkeypatch.undo()
    record(ledger, H + 3660, acme=4)
    mode.seal_hours(ledger, cfg, H + 3700, offset=0)  # works again: the open hour sealed now
    assert records(ledger)[("acme", "api", H + 3600)] == ("4", H + 3700)
    assert not mode.sealing_due(ledger)
    ledger.close()


@pytest.mark.parametrize(
    "notifications, key",
    [
        ("{queue_url: 'sqs queue'}", "saas.notifications.queue_url"),
        ("{}", "saas.notifications.queue_url"),
        ("{queue_url: 'http://127.0.0.1:9/1/q', wait: 5}", "saas.notifications.wait"),
        (None, "saas.notifications"),  # watch-subscriptions without it
    ],
)
def test_config_errors_name_the_key_in_one_line_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], notifications: str | None, key: str
) -> None:
    from agent import cli

    text = saas_config(tmp_path).source.read_text()
    old = "notifications: {queue_url: 'http://127.0.0.1:9/123456789012/mp'}"
    new = f"notifications: {notifications}" if notifications else "registration: null"
    (tmp_path / "bad.yaml").write_text(text.replace(old, new))
    command = "check" if notifications else "watch-subscriptions"
    extra = ["--offline"] if notifications else []
    assert cli.main([command, *extra, "-c", str(tmp_path / "bad.yaml")]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert any(key in line for line in err) and "Traceback" not in "\n".join(err)


def test_a_ledger_that_cannot_store_leaves_the_messages_and_the_poll_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    ledger = Ledger(tmp_path)
    batch = [message(sns(payload("subscribe-success")), 1)]
    queue = FakeQueue([batch, batch])  # not deleted: SQS shows it again
    real = subscriptions.apply
    fails = iter([True])

    def apply(*args: Any) -> str:
        if next(fails, False):
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args)

    monkeypatch.setattr(subscriptions, "apply", apply)
    clock = FakeClock(H)
    polls = iter([True, True, False])
    subscriptions.watch(queue, ledger, PRODUCT, clock, lambda: next(polls))
    assert clock.slept == [1.0] and queue.deleted == ["rh-1"]
    assert [s.state for s in ledger.subscriptions()] == ["subscribed"]
    ledger.close()


def test_one_buyer_named_with_and_without_its_account_id_is_one_subscription(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    ledger.add_customer(Customer("old", None, None, None, f"cid-{ACME}", PRODUCT, float(H)))
    legacy = parse(message(json.dumps(payload("unsubscribe-pending", account=None)).replace(
        "cid-None", f"cid-{ACME}"), sent_ms=(H + 10) * 1000), PRODUCT, H)  # fmt: skip
    assert isinstance(legacy, Notice) and subscriptions.apply(ledger, legacy, H + 10) == "applied"
    assert notify(ledger, "subscribe-success", ACME, H + 20) == "applied"  # with the account id
    [row] = ledger.subscriptions()
    assert (row.buyer, row.account_id, row.state) == (f"cid-{ACME}", ACME, "subscribed")
    assert ledger.subscription_states()["old"].state == "subscribed"
    with ledger.transaction() as db:
        assert ledger.leaving_labels(db) == set()
    ledger.close()
