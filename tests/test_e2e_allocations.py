"""The real daemon bills a labelled log per tenant: across an hour boundary (libfaketime) and
kill -9, what MeterUsage receives through the real boto3 client has allocations that sum to the
quantity and equal the lines on disk per tenant, scaled and rounded by the rule (checked here
with integer arithmetic, not the agent's code)."""

from __future__ import annotations

import random
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.aggregate import LabelSet, to_json
from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import (
    Agent,
    faketime_env,
    ledger_hours,
    ledger_samples,
    offset_to_before_boundary,
    wait_for,
)
from tests.test_e2e_labels import stored
from tests.test_labels import PATTERN, TENANTS, oracle

pytestmark = pytest.mark.e2e
LEAD = 25  # seconds of faked time before the boundary
TAG = {"tenant": "Tenant"}  # the config's allocations.tags, label -> key


def line(who: str | None) -> str:
    suffix = f" tenant={who}" if who else ""
    return f'10.0.0.1 "GET /api/v1{suffix} HTTP/1.1" 200\n'


def name(labels: LabelSet) -> str:
    return ",".join(f"{TAG[k]}={v}" for k, v in labels) or "-"


def by_rule(counts: Counter[LabelSet]) -> tuple[int, dict[str, int]]:
    """`scale: 0.001`, `rounding: up`: the quantity is ceil(lines / 1000); each tenant gets
    floor(its lines / 1000), and the units left go to the largest remainders, ties by name."""
    total = sum(counts.values())
    quantity = -(-total // 1000)
    units = {k: c // 1000 for k, c in counts.items()}
    left = quantity - sum(units.values())
    for k in sorted(counts, key=lambda k: (-(counts[k] % 1000), name(k)))[:left]:
        units[k] += 1
    return quantity, {name(k): n for k, n in units.items() if n}


def received(allocations: list[dict[str, Any]]) -> dict[str, int]:
    return {
        ",".join(f"{t['Key']}={t['Value']}" for t in a.get("Tags", [])) or "-": int(
            a["AllocatedUsageQuantity"]
        )
        for a in allocations
    }


def test_tenants_across_an_hour_and_kill9(emulator: Emulator, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {state}
            metering: {{endpoint_url: "{emulator.url}", send_window: 0}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '{PATTERN}'}}
                scale: 0.001
                rounding: up
                allocations: {{tags: {{Tenant: tenant}}}}
            """
        )
    )
    now = time.time()
    hour_b = int(now - now % 3600)  # the faked clock reaches this boundary LEAD s from now
    offset = offset_to_before_boundary(LEAD)
    crossing = hour_b - offset  # the real time at which the faked clock crosses it
    env = faketime_env(offset, emulator.url)
    rng = random.Random(14)
    agent = Agent(config, env).start()
    try:
        wait_for("the first sample", lambda: stored(state)[0] >= 0, 20, agent)
        # Hour A: about 3,000 lines, written in three parts with a kill -9 between them.
        lines = [line(rng.choice((*TENANTS, None))) for _ in range(rng.randint(2600, 3400))]
        with open(log, "a") as f:
            for i, part in enumerate((lines[:900], lines[900:2000], lines[2000:])):
                f.write("".join(part) + '10.0.0.1 "GET /static HTTP/1.1" 200\n')
                f.flush()
                if i == 0:
                    time.sleep(0.4)
                    agent.kill9()
                    agent = Agent(config, env).start()
        split = log.stat().st_size
        wait_for("hour A's lines", lambda: stored(state)[0] == len(lines), 15, agent)
        assert time.time() < crossing - 1, "hour A was not read before the boundary"
        time.sleep(max(0.0, crossing + 1.5 - time.time()))
        # Hour B: a writer for a few seconds, kill -9 twice meanwhile.
        stop = threading.Event()

        def writer() -> None:
            with open(log, "a", buffering=1) as f:
                while not stop.is_set():
                    for _ in range(rng.randint(1, 40)):
                        f.write(line(rng.choice((*TENANTS, None))))
                    time.sleep(rng.uniform(0, 0.01))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for pause in (1.0, 1.3):
                time.sleep(pause)
                agent.kill9()
                before = ledger_samples(state)
                agent = Agent(config, env).start()
            # the lines go on until the last agent has stored a reading of its own
            wait_for(
                "a reading by the restarted agent",
                lambda: ledger_samples(state) > before,
                30,
                agent,
            )
        finally:
            stop.set()
            thread.join()
        text = log.read_bytes()
        (tmp_path / "a.txt").write_bytes(text[:split])
        (tmp_path / "b.txt").write_bytes(text[split:])
        hours = {"A": oracle([tmp_path / "a.txt"]), "B": oracle([tmp_path / "b.txt"])}
        want_b = sum(hours["B"].values())
        wait_for("hour B's lines", lambda: stored(state)[0] == want_b, 30, agent)
        assert agent.terminate() == 0  # a stop seals and sends the open hour
    finally:
        if agent.alive():
            agent.kill9()
    assert set(hours["A"]) == set(hours["B"]) == {(("tenant", t),) for t in TENANTS} | {()}
    records = {r.hour: r for r in emulator.records() if r.dimension == "api_requests"}
    assert sorted(records) == [hour_b - 3600, hour_b]
    sealed = {h.hour: h for h in ledger_hours(state)}
    for key, hour in (("A", hour_b - 3600), ("B", hour_b)):
        quantity, allocations = by_rule(hours[key])
        record = records[hour]
        assert int(record.quantity) == quantity
        assert received(record.allocations) == allocations, key
        assert sum(received(record.allocations).values()) == quantity
        assert record.allocations == to_json(sealed[hour].allocations)  # as stored, as sent
        assert sealed[hour].state == "sent"
