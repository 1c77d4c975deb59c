"""The real daemon on the build machine, `prepare-image`, then the first boot of an instance made
from the image (a new instance id from IMDS): the product wrote 4 requests before the agent's first
reading and 9 after; the emulator receives 13. The lines baked into the image are not billed, a
restart continues from saved positions, and without the record `start_at: end` bills only 9.

Oracle: the lines the test wrote on the "buyer's instance", against what MeterUsage received."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.ledger import Ledger
from tests.conftest import PRODUCT, run_cli
from tests.e2e import Agent, ledger_hours, wait_for

pytestmark = pytest.mark.e2e
HIT = '10.0.0.1 - - "GET /api/v1/orders/%d HTTP/1.1" 200 512\n'
MISS = '10.0.0.1 - - "GET /static/app.js?%d HTTP/1.1" 200 512\n'


def write(log: Path, first: int, count: int) -> int:
    with open(log, "a") as f:
        for n in range(first, first + count):
            f.write(HIT % n + MISS % n)
    return count


def position(state: Path) -> dict | None:
    if not (state / "ledger.db").exists():
        return None
    try:
        ledger = Ledger(state, readonly=True)
    except sqlite3.Error:
        return None
    try:
        return ledger.position("api_requests")
    except sqlite3.Error:
        return None
    finally:
        ledger.close()


def offset(state: Path) -> int:
    found = position(state)
    if not found:
        return -1
    return max((s["off"] for s in found["collector"]["streams"]), default=0)


def setup(tmp_path: Path, emulator: Emulator) -> tuple[Path, Path, Path]:
    log = tmp_path / "logs" / "access.log"
    log.parent.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {state}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '"GET /api/'}}
            """
        )
    )
    return log, state, config


def build_machine(emulator: Emulator, log: Path, state: Path, config: Path) -> None:
    """The seller's build instance: the agent runs there once, the product writes its own test
    lines, then prepare-image."""
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    write(log, 0, 5)
    agent = Agent(config, env).start()
    wait_for("the build run's first reading", lambda: offset(state) >= 0, 30, agent)
    write(log, 5, 3)
    agent.kill9()  # (the build's own hour never sent: the emulator keys usage by hour only)
    # the image's config: as the seller ships it, without the emulator (prepare-image refuses a
    # loopback endpoint_url); the same state_dir and logs
    shipped = config.with_name("shipped.yaml")
    shipped.write_text(
        "".join(line for line in config.read_text().splitlines(True) if "endpoint_url" not in line)
    )
    result = run_cli("prepare-image", "--yes", "-c", str(shipped))
    assert result.returncode == 0, result.stderr
    assert not (state / "ledger.db").exists()


def buyer_sent(emulator: Emulator) -> int:
    return sum(int(r.quantity) for r in emulator.records() if r.dimension == "api_requests")


def first_boot(emulator: Emulator, log: Path, state: Path, config: Path) -> int:
    """The buyer's instance: a new instance id; the product writes before the agent starts."""
    before = buyer_sent(emulator)
    emulator.settings.instance_id = "i-0buyer00000000002"
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    written = write(log, 100, 4)  # the product, before the agent's first reading
    agent = Agent(config, env).start()
    wait_for("the first reading", lambda: offset(state) >= 0, 30, agent)
    size = log.stat().st_size
    written += write(log, 200, 9)
    wait_for("the 9 lines read", lambda: offset(state) > size, 30, agent)
    # a restart continues from the saved position, whatever the record says
    agent.kill9()
    written += write(log, 300, 2)
    agent = Agent(config, env).start()
    end = log.stat().st_size
    wait_for("the restart's reading", lambda: offset(state) == end, 30, agent)
    assert agent.terminate() == 0
    billed = sum(int(h.quantity.value) for h in ledger_hours(state))
    assert buyer_sent(emulator) - before == billed
    return billed - written


def test_first_boot_bills_what_the_product_wrote_before_the_first_reading(
    emulator: Emulator, tmp_path: Path
) -> None:
    log, state, config = setup(tmp_path, emulator)
    build_machine(emulator, log, state, config)
    record = json.loads((state / "image.json").read_text())
    assert record["instance_id"] == emulator.settings.instance_id  # the build instance
    assert [(e["path"], e["length"]) for e in record["logs"]] == [(str(log), log.stat().st_size)]
    status = run_cli("status", "-c", str(config))
    assert "the next `run` reads a log in the image from its length there" in status.stdout
    assert first_boot(emulator, log, state, config) == 0  # 4 + 9 + 2 written, 15 billed
    used = json.loads((state / "image.json").read_text())["used"]
    assert used["instance_id"] == "i-0buyer00000000002"
    status = run_cli("status", "-c", str(config))
    assert "in use (this is the first boot)" in status.stdout


def test_without_the_record_start_at_end_decides_and_says_so(
    emulator: Emulator, tmp_path: Path
) -> None:
    log, state, config = setup(tmp_path, emulator)
    build_machine(emulator, log, state, config)
    (state / "image.json").unlink()  # a seller who did not run prepare-image's new version
    status = run_cli("status", "-c", str(config))
    assert "no image record: start_at decides" in status.stdout
    assert first_boot(emulator, log, state, config) == -4  # the 4 early lines lost
