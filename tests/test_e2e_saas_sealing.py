"""SaaS mode through the real daemon across an hour boundary (libfaketime): each customer's sealed
record per dimension and hour is what its own lines on disk bill; known customers without usage
get idle zeros; a label no customer has is held, then sealed once the ledger names it; the stop
sends every record once by BatchMeterUsage (the emulator's records equal the ledger's), never by
MeterUsage.
"""

from __future__ import annotations

import math
import random
import re
import textwrap
import time
from collections import Counter
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import pytest

from agent.clock import hour_start
from agent.emulator import Emulator
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.conftest import PRODUCT
from tests.e2e import (
    Agent,
    faketime_env,
    ledger_hours,
    ledger_samples,
    offset_to_before_boundary,
    stored_total,
    wait_for,
)

pytestmark = pytest.mark.e2e
CUSTOMERS = ("acme", "globex", "initech")  # known, with usage
IDLE = ("hooli", "umbrella")  # known, never any usage
STRANGER = "stranger"  # usage first, customer later
LINE = re.compile(rb'"GET /api/v1(?: customer=(?P<customer>[a-z]+))?')


def customer(label: str) -> Customer:
    arn = f"arn:aws:license-manager::111122223333:license:l-{label}"
    return Customer(label, "111122223333", arn, f"agmt-{label}", None, None, 0.0)


def on_disk(data: bytes) -> Counter[str]:
    """The oracle: matching lines per customer label ('' for none), counted by a plain loop."""
    counts: Counter[str] = Counter()
    for line in data.splitlines():
        m = LINE.search(line)
        if m:
            counts[(m.group("customer") or b"").decode()] += 1
    return counts


def write_lines(log: Path, until: float, rng: random.Random) -> None:
    """Append lines for each customer, the stranger and none, until the real time `until`."""
    with open(log, "a", buffering=1) as f:
        while time.time() < until:
            for _ in range(rng.randint(1, 25)):
                who = rng.choice((*CUSTOMERS, STRANGER, None, "acme"))
                tail = f" customer={who}" if who else ""
                f.write(f'10.0.0.1 "GET /api/v1{tail} HTTP/1.1" 200\n')
                if rng.random() < 0.3:
                    f.write(f'10.0.0.1 "GET /static/app.js{tail} HTTP/1.1" 200\n')
            time.sleep(rng.uniform(0.01, 0.1))


def hundreds(n: int) -> str:
    """`api_hundreds`: scale 0.01, rounding up, of one customer's own count."""
    return str(int((Decimal(n) * Decimal("0.01")).to_integral_value(ROUND_CEILING)))


def test_saas_records_per_customer_idle_zeros_and_held_usage(
    emulator: Emulator, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    state = tmp_path / "state"
    pattern = '"GET /api/v1(?: customer=(?P<customer>[a-z]+))?'
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {state}
            mode: saas
            saas: {{customer_label: customer, idle_zero: true}}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600, startup_check: false}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '{pattern}', start_at: beginning}}
              - name: api_hundreds
                collector: {{type: log, path: {log}, pattern: '{pattern}', start_at: beginning}}
                scale: 0.01
                rounding: up
            """
        )
    )
    ledger = Ledger(state)
    for label in (*CUSTOMERS, *IDLE):
        ledger.add_customer(customer(label))
    ledger.close()
    offset = offset_to_before_boundary(24)
    first = hour_start(time.time() + offset)  # the hour the faked clock is finishing
    boundary = first + 3600 - offset  # in real time
    agent = Agent(config, faketime_env(offset, emulator.url)).start()
    rng = random.Random(16)
    try:
        wait_for("the daemon's first round", lambda: ledger_samples(state) > 0, 20, agent)
        write_lines(log, boundary - 6, rng)  # the first hour's lines, all read before its end
        cut = log.stat().st_size
        in_first = lambda: [h for h in ledger_hours(state) if h.hour == first]  # noqa: E731
        wait = boundary - time.time() + 20
        wait_for("the first hour sealed", lambda: len(in_first()) == 10, wait, agent)
        write_lines(log, time.time() + 4, rng)  # the second hour's
        data = log.read_bytes()
        one, two = on_disk(data[:cut]), on_disk(data[cut:])
        assert all(one[c] > 0 for c in (*CUSTOMERS, STRANGER, ""))
        # first hour: each customer's own lines, idle zeros, the stranger's and unlabelled held
        rows = {(h.customer, h.dimension): h for h in in_first()}
        for c in CUSTOMERS:
            assert rows[(c, "api_requests")].quantity.text == str(one[c])
            assert rows[(c, "api_hundreds")].quantity.text == hundreds(one[c])
        for c in IDLE:
            assert rows[(c, "api_requests")].quantity.text == "0"
            assert rows[(c, "api_hundreds")].quantity.text == "0"
        assert all(first + 3500 <= h.timestamp < first + 3600 for h in rows.values())
        # the per-customer rounding is not a split of the total's
        total = sum(one[c] for c in CUSTOMERS)
        billed = sum(int(rows[(c, "api_hundreds")].quantity.text) for c in CUSTOMERS)
        assert billed >= math.ceil(total / 100)
        ledger = Ledger(state, readonly=True)
        held = {(h.customer, h.dimension): h for h in ledger.held_usage()}
        ledger.close()
        assert set(held) == {
            (x, d) for x in (STRANGER, "") for d in ("api_requests", "api_hundreds")
        }
        assert sum(p.value for p in held[(STRANGER, "api_requests")].points) == one[STRANGER]
        assert sum(p.value for p in held[("", "api_requests")].points) == one[""]
        # the stranger becomes a customer (what `customers add` stores): its usage is sealed
        writer = Ledger(state)
        writer.add_customer(customer(STRANGER))
        writer.close()
        wait_for(
            "the held usage sealed",
            lambda: len([h for h in in_first() if h.customer == STRANGER]) == 2,
            20,
            agent,
        )
        wait_for(
            "the second hour's last lines read",
            lambda: stored_total(state, "api_requests", first + 3600) >= sum(two.values()),
            20,
            agent,
        )
    finally:
        assert agent.terminate() == 0  # a stop for shutdown seals the partial hour
    hours = ledger_hours(state)
    by = {(h.customer, h.dimension, h.hour): h.quantity.text for h in hours}
    assert by[(STRANGER, "api_requests", first)] == str(one[STRANGER])
    assert by[(STRANGER, "api_hundreds", first)] == hundreds(one[STRANGER])
    second = first + 3600
    for c in (*CUSTOMERS, STRANGER, *IDLE):  # the stranger is a customer in the second hour
        assert by[(c, "api_requests", second)] == str(two[c])
        assert by[(c, "api_hundreds", second)] == hundreds(two[c])
    assert len(hours) == len(by) == 2 * 2 * 6  # once each: 6 customers, 2 dimensions, 2 hours
    assert all(h.state == "sent" for h in hours)  # the stop flushed them; none expired or refused
    license_of = {customer(c).license_arn: c for c in (*CUSTOMERS, STRANGER, *IDLE)}
    received = {
        (license_of[r.customer.split("|")[1]], r.dimension, r.hour): r.quantity_text
        for r in emulator.records()
        if r.customer
    }
    assert received == by  # every record billed once, with its sealed quantity
    ledger = Ledger(state, readonly=True)
    still = {(h.customer, h.dimension, h.hour) for h in ledger.held_usage()}
    ledger.close()
    assert still == {("", d, h) for d in ("api_requests", "api_hundreds") for h in (first, second)}
    assert not [c for c in emulator.received() if c.get("operation") == "MeterUsage"]
