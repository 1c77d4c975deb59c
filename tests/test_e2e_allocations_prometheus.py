"""The real daemon allocates a real prometheus_client counter (`counter: true`) per team: the
series' `kind` label is the team (tag `Team`), its `tenant` label is not mapped and is summed
away. Across an hour boundary (libfaketime) and kill -9, each hour's allocations equal the
increments the test applied per team in that hour."""

from __future__ import annotations

import random
import textwrap
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from agent.collectors import series_key
from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import Agent, faketime_env, offset_to_before_boundary, wait_for
from tests.test_e2e_counters import committed_series
from tests.test_prometheus_exporter import Exporter

pytestmark = pytest.mark.e2e
LEAD = 15
TEAMS = ("data", "ml", "platform")


def test_prometheus_teams_across_an_hour_and_kill9(emulator: Emulator, tmp_path: Path) -> None:
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
                             format: prometheus, query: jobs_total, counter: true}}
                allocations: {{tags: {{Team: kind}}}}
            """
        )
    )
    now = time.time()
    hour_b = int(now - now % 3600)
    offset = offset_to_before_boundary(LEAD)
    crossing = hour_b - offset
    env = faketime_env(offset, emulator.url)
    rng = random.Random(21)
    live: dict[str, Decimal] = {}
    applied = {"A": Counter[str](), "B": Counter[str]()}

    def inc(hour: str) -> None:
        tenant, team = rng.choice(("acme", "globex")), rng.choice(TEAMS)
        amount = rng.randint(1, 40)
        exporter.inc(tenant, amount, kind=team)
        key = series_key({"tenant": tenant, "kind": team})
        live[key] = live.get(key, Decimal(0)) + amount
        applied[hour][team] += amount

    def settle() -> None:
        wait_for("a baseline with every increment", lambda: committed_series(state) == live,
                 20, agent)  # fmt: skip

    agent = Agent(config, env).start()
    try:
        # before the first reading, but the series began after boot (its _created): billed
        exporter.inc("acme", 5, kind="data")
        live[series_key({"tenant": "acme", "kind": "data"})] = Decimal(5)
        applied["A"]["data"] += 5
        settle()
        for i in range(60):
            inc("A")
            if i == 30:
                agent.kill9()
                agent = Agent(config, env).start()
            time.sleep(0.02)
        settle()
        assert time.time() < crossing - 1, "hour A was not read before the boundary"
        time.sleep(max(0.0, crossing + 1.5 - time.time()))
        for i in range(60):
            inc("B")
            if i == 20:
                agent.kill9()
                agent = Agent(config, env).start()
            time.sleep(0.02)
        settle()
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
        exporter.stop()
    records = {r.hour: r for r in emulator.records() if r.dimension == "jobs"}
    assert sorted(records) == [hour_b - 3600, hour_b]
    for key, hour in (("A", hour_b - 3600), ("B", hour_b)):
        record = records[hour]
        got = {a["Tags"][0]["Value"]: a["AllocatedUsageQuantity"] for a in record.allocations}
        assert all(
            len(a["Tags"]) == 1 and a["Tags"][0]["Key"] == "Team" for a in record.allocations
        )
        assert got == dict(applied[key]), key
        assert int(record.quantity) == sum(applied[key].values())
