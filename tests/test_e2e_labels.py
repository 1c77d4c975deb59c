"""The real daemon counts a labelled log per tenant across kill -9: the breakdowns stored with the
samples add up, per tenant, to the lines on disk (counted by a plain loop)."""

from __future__ import annotations

import json
import random
import sqlite3
import textwrap
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import Agent, faketime_env, ledger_samples, wait_for
from tests.test_labels import PATTERN, TENANTS, oracle

pytestmark = pytest.mark.e2e


def stored(state: Path) -> tuple[Decimal, Counter[tuple[tuple[str, str], ...]]]:
    """Total and per-label-set sum of every stored sample (the hour is still open)."""
    total, parts = Decimal(0), Counter[tuple[tuple[str, str], ...]]()
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.db'}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT value, breakdown FROM samples").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return Decimal(-1), parts  # the daemon is still creating the ledger
    if not rows:
        return Decimal(-1), parts  # no reading yet
    for value, breakdown in rows:
        total += Decimal(value)
        for labels, v in json.loads(breakdown):
            parts[tuple(tuple(p) for p in labels)] += Decimal(v)  # type: ignore[assignment]
    return total, parts


def test_labelled_log_across_kill9(emulator: Emulator, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '{PATTERN}'}}
                allocations: {{tags: {{Tenant: tenant}}}}  # breakdowns are kept for allocations
            """
        )
    )
    now = time.time()
    # ten minutes into an hour: no boundary seals (and deletes) the samples during the test
    env = faketime_env(int(now - now % 3600 + 600 - now), emulator.url)
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(3)
        with open(log, "a", buffering=1) as f:
            n = 0
            while not stop.is_set():
                for _ in range(rng.randint(1, 30)):
                    n += 1
                    who = rng.choice((*TENANTS, None))
                    suffix = f" tenant={who}" if who else ""
                    f.write(f'10.0.0.1 "GET /api/v1{suffix} HTTP/1.1" 200\n')
                    if n % 3 == 0:
                        f.write(f'10.0.0.1 "GET /static tenant={who} HTTP/1.1" 200\n')
                time.sleep(rng.uniform(0, 0.02))

    agent = Agent(config, env).start()
    wait_for("the first sample", lambda: stored(tmp_path / "state")[0] >= 0, 20, agent)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for pause in (1.2, 0.7, 1.5):
            time.sleep(pause)
            agent.kill9()
            before = ledger_samples(tmp_path / "state")
            agent = Agent(config, env).start()
        # the lines go on until the last agent has stored a reading of its own
        wait_for(
            "a reading by the restarted agent",
            lambda: ledger_samples(tmp_path / "state") > before,
            30,
            agent,
        )
    finally:
        stop.set()
        thread.join()
    expected = oracle([log])
    want = sum(expected.values())
    wait_for("every line", lambda: stored(tmp_path / "state")[0] == want, 30, agent)
    agent.kill9()  # not a stop: a stop would seal the hour, which deletes its samples
    total, parts = stored(tmp_path / "state")
    assert set(expected) == {(("tenant", t),) for t in TENANTS} | {()}
    assert parts == expected and total == want
