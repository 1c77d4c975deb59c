"""End to end: the real daemon, under libfaketime across an hour boundary, reads a real
prometheus_client exporter whose series come and go and whose process restarts, and is itself
killed with -9 several times. Billed (the ledger's sealed hours after a SIGTERM) must equal the
increments the test applied after the dimension's first reading.

An increase made after the agent's last reading and lost before the next (a series removed, the
exporter restarted) is in no counter anyone can read. So before each removal or exporter restart
the test waits until the agent has committed a baseline equal to the exporter's current values:
everything applied so far is then billable, and must be billed.
"""

from __future__ import annotations

import random
import sqlite3
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agent.collectors import series_key
from agent.emulator import Emulator
from agent.ledger import Ledger
from tests.conftest import PRODUCT
from tests.e2e import Agent, faketime_env, ledger_hours, offset_to_before_boundary, wait_for
from tests.test_prometheus_exporter import OPENMETRICS, Exporter

pytestmark = pytest.mark.e2e


def committed_series(state: Path) -> dict[str, Decimal] | None:
    if not (state / "ledger.db").exists():
        return None
    try:
        ledger = Ledger(state, readonly=True)
    except sqlite3.Error:  # the daemon is still creating it
        return None
    try:
        position = ledger.position("jobs")
    except sqlite3.Error:
        return None
    finally:
        ledger.close()
    if not position or "counter" not in position:
        return None
    return {k: Decimal(v) for k, v in position["counter"]["series"].items()}


def test_exporter_churn_and_kill9_across_an_hour(emulator: Emulator, tmp_path: Path) -> None:
    exporter = Exporter(tmp_path)
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
              - name: jobs
                collector: {{type: http, url: 'http://127.0.0.1:{exporter.port}/metrics',
                             format: prometheus, query: jobs_total, counter: true,
                             headers: {{Accept: '{OPENMETRICS}'}}}}
            """
        )
    )
    offset = offset_to_before_boundary(12)  # the boundary passes during the churn below
    env = faketime_env(offset, emulator.url)
    agent = Agent(config, env).start()
    live: dict[str, Decimal] = {}  # the exporter's current values, as the test applied them
    applied = Decimal(0)
    kills = 0
    rng = random.Random(7)
    try:
        # before the first reading, but the series began after this machine booted (its
        # _created): all of it is this boot's usage, billed (a fresh ledger counts it from 0)
        exporter.inc("early", 1000)
        live["early"] = Decimal(1000)
        applied += 1000
        wait_for("the first baseline", lambda: committed_series(state), 20, agent)

        def settle() -> None:
            want = {series_key({"tenant": t, "kind": "batch"}): v for t, v in live.items()}
            wait_for("a baseline with every increment", lambda: committed_series(state) == want,
                     30, agent)  # fmt: skip

        for phase in range(6):
            deadline = time.monotonic() + rng.uniform(2.0, 4.0)
            killed = False
            while time.monotonic() < deadline:
                tenant = rng.choice(["acme", "globex", 'C:\\new "x"', "early"])
                amount = rng.randint(1, 50)
                exporter.inc(tenant, amount)
                live[tenant] = live.get(tenant, Decimal(0)) + amount
                applied += amount
                if not killed and rng.random() < 0.05:
                    agent.kill9()  # power loss mid-round; increments go on meanwhile
                    time.sleep(rng.uniform(0, 0.5))
                    agent = Agent(config, env).start()
                    killed = True
                    kills += 1
                time.sleep(rng.uniform(0.005, 0.05))
            settle()
            if phase % 3 == 0 and len(live) > 1:
                gone = rng.choice(sorted(live))
                exporter.remove(gone)  # the series goes; the others must not look new
                del live[gone]
            elif phase % 3 == 1:
                exporter.restart()  # every series from 0, new _created times
                live.clear()
        settle()
        assert agent.terminate() == 0  # seals and sends the partial hour
    finally:
        if agent.alive():
            agent.kill9()
        exporter.stop()
    hours = [h for h in ledger_hours(state) if h.dimension == "jobs"]
    billed = sum((Decimal(h.quantity.text) for h in hours), Decimal(0))
    assert billed == applied
    assert kills >= 3
    assert len(hours) == 2  # the faked clock crossed an hour boundary
