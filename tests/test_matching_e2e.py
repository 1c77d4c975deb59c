"""The real daemon against a log line written to make a backtracking engine run for ever.

`"(GET|POST) /api/(\\w+/?)+ HTTP` against `"GET /api/` + 40 letters + `!`: Python's `re` needs
2**40 steps there and holds the GIL throughout, so with it the daemon stopped whole (no dimension
sampled, no hour sealed, SIGTERM unanswered). Any end user of the buyer's product can write that
line. Here the daemon crosses an hour boundary (libfaketime) with that line in the log, beside a
`system` dimension: both hours reach the emulator with the lines written that match, the other
dimension sampled all along, and SIGTERM ends `run` with exit 0 at once.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from agent.clock import hour_start
from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import (
    Agent,
    faketime_env,
    ledger_hours,
    offset_to_before_boundary,
    stored_total,
    wait_for,
)
from tests.test_matching import BAD, HOSTILE, NORMAL

pytestmark = pytest.mark.e2e


def write(log: Path, groups: int) -> int:
    """Append `groups` times the normal lines and the crafted line; returns the lines that match
    (the oracle: 2 of the 4 normal lines, never the crafted one)."""
    with open(log, "ab") as f:
        f.write(b"".join(line + b"\n" for line in [*NORMAL, BAD]) * groups)
    return 2 * groups


def test_a_hostile_line_stops_neither_sampling_nor_sealing_nor_sigterm(
    emulator: Emulator, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"")
    before = write(log, 300)
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{emulator.url}", send_window: 0}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '{HOSTILE}', start_at: beginning}}
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            """
        )
    )
    offset = offset_to_before_boundary(12)
    hour = hour_start(time.time() + offset)  # the hour the faked clock is finishing
    agent = Agent(config, faketime_env(offset, emulator.url)).start()
    try:
        wait_for(
            "both dimensions' records for the finished hour",
            lambda: (
                {(r.dimension, r.hour) for r in emulator.records()}
                >= {("api_requests", hour), ("vcpus", hour)}
            ),
            60,
            agent,
        )
        first = {r.dimension: r for r in emulator.records() if r.hour == hour}
        assert first["api_requests"].quantity_text == str(before)
        assert first["vcpus"].quantity_text == str(os.cpu_count())
        sealed = {h.dimension: h for h in ledger_hours(tmp_path / "state") if h.hour == hour}
        assert sealed["vcpus"].samples >= 5  # one a second while the log was being read

        after = write(log, 200)  # the next hour: read while it is open
        state = tmp_path / "state"
        wait_for(
            "the next hour's lines read, and a vcpus sample in it",
            lambda: (
                stored_total(state, "api_requests", hour + 3600) >= after
                and _samples(state, "vcpus", hour + 3600) >= 1
            ),
            30,
            agent,
        )
        start = time.monotonic()
        assert agent.terminate(timeout=20) == 0
        assert time.monotonic() - start < 5
    finally:
        if agent.alive():
            agent.kill9()
    second = {r.dimension: r for r in emulator.records() if r.hour == hour + 3600}
    assert second["api_requests"].quantity_text == str(after)  # the partial hour, sent at stop
    assert "vcpus" in second
    billed = sum(int(r.quantity_text) for r in emulator.records() if r.dimension == "api_requests")
    assert billed == before + after


def _samples(state: Path, dimension: str, hour: int) -> int:
    """Stored samples of `dimension` in `hour` with a value above zero."""
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{state / 'ledger.db'}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute(
                "SELECT value FROM samples WHERE dimension = ? AND hour = ?", (dimension, hour)
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return sum(1 for (v,) in rows if float(v) > 0)
