"""A SaaS record's customer identity: sealed with the record (a customers row may change after a
crash mid-call without the resend becoming another record), one label per buyer (two labels' records
for one hour would share a key in a call), and a label added by mistake that can be given to the
right buyer once nothing is pending under it. Through the real ledger, the emulator and a real
boto3 client (review 16's reproductions, turned into tests)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.fulfillment import customers as customers_mod
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.ledger.hours import CustomerRef
from agent.modes.saas import seal_hours
from agent.sending.batches import plan, record_key, usage_record
from tests import test_batching, test_customers
from tests.saas import license_arn, seal
from tests.test_batching import H, Saas
from tests.test_customers import cli_main, customers_in
from tests.test_customers import saas_config as cli_saas_config
from tests.test_saas_sealing import LOG_DIMS, key, record
from tests.test_saas_sealing import saas_config as sealing_config

ACCT = "123456789012"
saas, emu, creds = test_batching.saas, test_customers.emu, test_customers.creds  # fixtures


def billed(saas: Saas) -> list[tuple[str | None, str]]:
    """What the service recorded: (customer key, quantity) per record."""
    return [(r.customer, r.quantity_text) for r in saas.emulator.records() if r.customer]


# -- (1) the identity is sealed with the record -----------------------------------------------


def test_license_update_after_a_crash_mid_call_resends_the_same_record(saas: Saas) -> None:
    """The send child is killed after BatchMeterUsage left (attempt begun, nothing settled); the
    buyer comes back with a new license before the resend. The resend is the same record: the
    service records the hour once, under the license it was sealed with."""
    old = Customer("acme", ACCT, license_arn("old"), None, None, None, 0.0)
    customers_mod.store(saas.ledger, old)
    seal(saas.ledger, "acme", "requests", H, 7)
    (h,) = saas.ledger.pending()
    saas.ledger.begin_attempts([h], saas.clock.time())
    first = saas.client.batch_meter_usage([usage_record(h)], None)  # the killed child's call
    assert [r.status for r in first.results] == ["Success"]
    new = Customer("acme", ACCT, license_arn("new"), None, None, None, 10.0)
    assert customers_mod.store(saas.ledger, new).outcome == "updated"
    saas.sender().run()
    assert billed(saas) == [(f"{ACCT}|{license_arn('old')}", "7")]
    (sent,) = saas.ledger.hours()
    assert sent.state == "sent" and sent.record_id == first.results[0].record_id
    assert sent.customer_ref == CustomerRef(ACCT, license_arn("old"), None)
    # hours sealed after the update bill the new license
    seal(saas.ledger, "acme", "requests", H + 3600, 2)
    saas.clock.t += 3600
    saas.sender().run()
    assert billed(saas)[-1] == (f"{ACCT}|{license_arn('new')}", "2")


def test_every_sealing_path_copies_the_customers_ids(tmp_path: Path) -> None:
    """Usage, idle zeros and released held usage: each record holds its customer's ids as they
    were when it was sealed; a later change of the customers row leaves them alone, and the
    ledger refuses to change them."""
    cfg = sealing_config(tmp_path, LOG_DIMS)
    ledger = Ledger(cfg.state_dir)
    acme = Customer("acme", ACCT, license_arn("acme"), None, None, None, H)
    idle = Customer("idle", None, None, None, "cid-idle", None, H)  # legacy
    for c in (acme, idle):
        ledger.add_customer(c)
    record(ledger, H + 60, {key("acme", "t1"): Decimal(30), key("late", None): Decimal(20)})
    seal_hours(ledger, cfg, H + 3700, offset=0)
    late = Customer("late", "210987654321", license_arn("late"), None, None, None, H + 3800)
    ledger.add_customer(late)
    seal_hours(ledger, cfg, H + 3900, offset=0)  # releases late's held usage
    rows = {h.customer: h for h in ledger.hours(until=H + 3600)}
    assert {k: h.quantity.text for k, h in rows.items()} == {"acme": "3", "idle": "0", "late": "2"}
    for c in (acme, idle, late):
        assert rows[c.label].customer_ref == CustomerRef.of(c)
    assert rows["idle"].customer_ref == CustomerRef(None, None, "cid-idle")
    assert "CustomerIdentifier" in usage_record(rows["idle"])
    ledger.add_customer(replace(acme, license_arn=license_arn("acme-2")))
    assert ledger.hours(until=H + 3600)[0].customer_ref == CustomerRef.of(acme)
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as db:
        db.execute("UPDATE hours SET customer_ref = NULL WHERE customer = 'acme'")
    ledger.close()


# -- (3) one label per buyer ------------------------------------------------------------------


def test_a_second_label_for_one_buyer_is_refused(saas: Saas) -> None:
    """Review 16: two labels naming one account+license put two records with one key in a call
    and one's usage was lost. The second label is refused, naming the first; the first bills."""
    customers_mod.store(saas.ledger, Customer("tenant-a", ACCT, license_arn("x"), None, None,
                                              None, 0.0))  # fmt: skip
    with pytest.raises(customers_mod.BuyerTaken, match="'tenant-a'") as refused:
        customers_mod.store(saas.ledger, Customer("tenant-b", ACCT, license_arn("x"), None,
                                                  None, None, 0.0))  # fmt: skip
    assert refused.value.exit_code == 1
    legacy = Customer("old-a", None, None, None, "cid-1", None, 0.0)
    customers_mod.store(saas.ledger, legacy)
    with pytest.raises(customers_mod.BuyerTaken, match="'old-a'"):
        customers_mod.store(saas.ledger, replace(legacy, label="old-b"))
    # the ledger's own rule: never a second row for the buyer, never the first one replaced
    with pytest.raises(sqlite3.IntegrityError):
        saas.ledger.add_customer(Customer("tenant-c", ACCT, license_arn("x"), None, None, None, 1))
    assert [c.label for c in saas.ledger.customers(include_removed=True)] == ["old-a", "tenant-a"]
    seal(saas.ledger, "tenant-a", "requests", H, 7)
    saas.sender().run()
    assert billed(saas) == [(f"{ACCT}|{license_arn('x')}", "7")]


def test_customers_add_of_a_buyer_under_a_second_label_exits_1(
    emu: Emulator, tmp_path: Path
) -> None:
    cfg = str(cli_saas_config(tmp_path, emu.url))
    args = ["--account", ACCT, "--license", license_arn("x")]
    assert cli_main("customers", "add", "-c", cfg, *args, "--as", "acme") == 0
    assert cli_main("customers", "add", "-c", cfg, *args, "--as", "acme-2") == 1
    token = emu.issue_token(account=ACCT, license=license_arn("x"))
    assert cli_main("customers", "add", "-c", cfg, "--token", token) == 1  # label: the account id
    assert [c.label for c in customers_in(tmp_path)] == ["acme"]


def test_plan_never_puts_one_key_twice_in_a_call(saas: Saas) -> None:
    """Defence in depth: records with one (customer ids, dimension, Timestamp) go in separate
    calls, so each result lands on its own record."""
    customers_mod.store(saas.ledger, Customer("a", ACCT, license_arn("x"), None, None, None, 0.0))
    customers_mod.store(saas.ledger, Customer("b", ACCT, license_arn("y"), None, None, None, 0.0))
    seal(saas.ledger, "a", "requests", H, 7)
    seal(saas.ledger, "b", "requests", H, 5)
    seal(saas.ledger, "b", "users", H, 1)
    a, b, b_users = saas.ledger.pending()
    twin = replace(b, customer_ref=a.customer_ref)  # as if two labels held one buyer
    calls = plan([a, twin, b_users])
    assert [[h.customer for h in c.records] for c in calls] == [["a"], ["b", "b"]]
    for c in calls:
        keys = [record_key(h) for h in c.records]
        assert len(keys) == len(set(keys))
    assert len(plan([a, b, b_users])) == 1


# -- (10) a label added by mistake ------------------------------------------------------------


def test_a_removed_label_with_nothing_pending_may_name_another_buyer(saas: Saas) -> None:
    """Review 16: `customers remove` then `add` with the right buyer still failed "label taken".
    Refused while the label may still bill (not removed, or a record pending); then given to the
    right buyer, the old records keeping the ids they were sealed with."""
    wrong = Customer("acme", "111111111111", license_arn("a"), None, None, None, 0.0)
    right = Customer("acme", "222222222222", license_arn("b"), None, None, None, 3.0)
    customers_mod.store(saas.ledger, wrong)
    seal(saas.ledger, "acme", "requests", H, 4)
    with pytest.raises(customers_mod.LabelTaken, match="customers remove acme"):
        customers_mod.store(saas.ledger, right)  # not removed
    assert saas.ledger.remove_customer("acme", 2.0)
    with pytest.raises(customers_mod.LabelTaken):
        customers_mod.store(saas.ledger, right)  # its record is still pending
    saas.sender().run()  # sent: every record under the label is final
    assert customers_mod.store(saas.ledger, right).outcome == "updated"
    now = saas.ledger.customer("acme")
    assert now is not None and (now.account_id, now.removed_at) == ("222222222222", None)
    (old,) = saas.ledger.hours()
    assert old.state == "sent" and old.customer_ref == CustomerRef.of(wrong)
    seal(saas.ledger, "acme", "requests", H + 3600, 6)
    saas.clock.t += 3600
    saas.sender().run()
    assert billed(saas) == [
        (f"111111111111|{license_arn('a')}", "4"),
        (f"222222222222|{license_arn('b')}", "6"),
    ]


def test_customers_remove_then_add_another_buyer(emu: Emulator, tmp_path: Path) -> None:
    cfg = str(cli_saas_config(tmp_path, emu.url))
    add = ["customers", "add", "-c", cfg, "--as", "acme", "--license", license_arn("a")]
    assert cli_main(*add, "--account", "111111111111") == 0
    assert cli_main(*add, "--account", "222222222222") == 1  # still the first buyer's
    assert cli_main("customers", "remove", "-c", cfg, "acme") == 0
    assert cli_main(*add, "--account", "222222222222") == 0
    assert [(c.account_id, c.removed_at) for c in customers_in(tmp_path)] == [
        ("222222222222", None)
    ]


def test_the_registration_page_of_a_buyer_added_by_hand_keeps_its_label(
    emu: Emulator, tmp_path: Path
) -> None:
    """A buyer the seller added by hand under 'acme' registers on the fulfillment page (label:
    the account id): redirected as registered under 'acme', no second label stored."""
    import urllib.parse

    from agent import config
    from agent.fulfillment import make_app
    from tests.test_customers import wsgi

    path = cli_saas_config(tmp_path, emu.url)
    args = ["--account", ACCT, "--license", license_arn("x"), "--as", "acme"]
    assert cli_main("customers", "add", "-c", str(path), *args) == 0
    token = emu.issue_token(account=ACCT, license=license_arn("x"))
    body = urllib.parse.urlencode({"x-amzn-marketplace-token": token}).encode()
    status, headers, _ = wsgi(make_app(config.load(path)), "POST", body)
    assert status.startswith("302") and headers["Location"].endswith("&c=acme")
    assert [c.label for c in customers_in(tmp_path)] == ["acme"]
