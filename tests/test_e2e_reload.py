"""End to end: SIGHUP (systemctl reload) re-reads the config in the running daemon; a bad config
is refused and the running one kept. Oracle: what the daemon writes to its ledger."""

from __future__ import annotations

import signal
import sqlite3
import textwrap
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.ledger import Ledger
from tests.conftest import PRODUCT
from tests.e2e import Agent, wait_for

pytestmark = pytest.mark.e2e

DIMENSION = """
  - name: {name}
    collector: {{type: system, metric: cpu_count}}
"""


def write(path: Path, url: str, names: list[str]) -> None:
    path.write_text(
        textwrap.dedent(
            f"""\
            product_code: {PRODUCT}
            state_dir: {path.parent / "state"}
            metering: {{endpoint_url: "{url}", send_window: 0}}
            sampling: {{interval: 1s}}
            dimensions:
            """
        )
        + "".join(DIMENSION.format(name=n) for n in names)
    )


def last_sampled(state: Path) -> dict[str, float]:
    if not (state / "ledger.db").exists():
        return {}
    try:
        ledger = Ledger(state, readonly=True)
    except sqlite3.OperationalError:  # the daemon is still creating it
        return {}
    try:
        return {s.dimension: s.last_t for s in ledger.dimension_status() if s.last_t}
    except sqlite3.OperationalError:
        return {}
    finally:
        ledger.close()


def test_sighup_reloads_the_config_and_keeps_running_on_a_bad_one(
    emulator: Emulator, tmp_path: Path
) -> None:
    config, state = tmp_path / "config.yaml", tmp_path / "state"
    write(config, emulator.url, ["vcpus"])
    agent = Agent(config, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}).start()
    assert agent.proc is not None
    try:
        wait_for("vcpus sampled", lambda: "vcpus" in last_sampled(state), 20, agent)
        write(config, emulator.url, ["vcpus", "users_now"])
        agent.proc.send_signal(signal.SIGHUP)
        wait_for("the new dimension sampled", lambda: "users_now" in last_sampled(state), 20, agent)

        config.write_text("dimensions: [\n")  # a bad edit: refused, the running config kept
        agent.proc.send_signal(signal.SIGHUP)
        before = last_sampled(state)
        wait_for(
            "both dimensions still sampled after the bad reload",
            lambda: all(last_sampled(state).get(d, 0) > before[d] + 2 for d in before),
            20,
            agent,
        )
        assert agent.alive()
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
