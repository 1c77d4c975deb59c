"""End to end: every stop takes one last reading of every dimension before it seals or saves.

The real daemon (libfaketime, half an hour into an hour, a 60 s interval so no round falls between
the lines and the signal) counts a log; lines are written after its last round, then it is stopped.
Oracle: the lines written, against what the emulator received (the stop's flush) or what the
ledger sealed. Platforms: EC2, an ECS task (the container's short grace) and SaaS mode.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent.emulator import Emulator, Settings
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.conftest import PRODUCT
from tests.e2e import Agent, faketime_env, ledger_hours, offset_to_before_boundary, wait_for
from tests.test_prometheus_exporter import Exporter

pytestmark = pytest.mark.e2e
REGION = "eu-west-1"
TASK = "5e1ec7ab1e5e1ec7ab1e5e1ec7ab1e00"
CLOSED = "http://127.0.0.1:9"  # nothing listens: no IMDS, as on Fargate
LINE = '10.0.0.1 "GET /api/v1 customer=acme HTTP/1.1" 200\n'
OTHER = '10.0.0.1 "GET /static/app.js HTTP/1.1" 200\n'
PATTERN = '"GET /api/v1(?: customer=(?P<customer>[a-z]+))?'
ACME = Customer(
    "acme",
    "111122223333",
    "arn:aws:license-manager::111122223333:license:l-acme",
    "agmt-acme",
    None,
    None,
    0.0,
)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = Emulator(Settings(region=REGION, product_codes={PRODUCT}, task_id=TASK))
    emulator.serve(0)
    yield emulator
    emulator.stop()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill9()


@pytest.fixture
def hanging() -> Iterator[str]:
    """An HTTP source that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/metrics"
    done.set()
    thread.join(2)
    server.close()
    for conn in held:
        conn.close()


def config_text(state: Path, log: Path, url: str, saas: bool = False, extra: str = "") -> str:
    lines = [f"product_code: {PRODUCT}", f"state_dir: {state}"]
    if saas:
        lines += ["mode: saas", "saas: {customer_label: customer}"]
    lines += [
        f'metering: {{endpoint_url: "{url}", send_window: 0, startup_check: false}}',
        "sampling: {interval: 60s}",
        "dimensions:",
        "  - name: requests",
        f"    collector: {{type: log, path: {log}, pattern: '{PATTERN}', start_at: beginning}}",
    ]
    return "\n".join(lines) + "\n" + extra


def write(log: Path, lines: int) -> None:
    with open(log, "a") as f:
        for i in range(lines):
            f.write(LINE)
            if i % 3 == 0:
                f.write(OTHER)


def last_t(state: Path, dimension: str = "requests") -> float | None:
    try:
        ledger = Ledger(state, readonly=True)
    except sqlite3.Error:  # the daemon is still creating it
        return None
    try:
        return next((s.last_t for s in ledger.dimension_status() if s.dimension == dimension), None)
    except sqlite3.Error:
        return None
    finally:
        ledger.close()


def start(agents: list[Agent], config: Path, env: dict[str, str]) -> Agent:
    agent = Agent(config, env).start()
    agents.append(agent)
    return agent


def env_for(platform: str, emu: Emulator) -> dict[str, str]:
    offset = offset_to_before_boundary(1795)  # xx:30:05: 55 s until the next round
    if platform == "ecs":
        return {
            **faketime_env(offset, CLOSED),
            "ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{emu.url}/ecs/credentials",
        }
    return faketime_env(offset, emu.url)


def billed(emu: Emulator, dimension: str = "requests") -> Decimal:
    return sum((r.quantity for r in emu.records() if r.dimension == dimension), Decimal(0))


@pytest.mark.parametrize("platform", ["ec2", "ecs", "saas"])
def test_a_stop_counts_the_lines_written_after_the_last_round(
    platform: str, emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """Issue 23 §1: 700 lines written after a round (interval 60 s), then SIGTERM: all billed."""
    state, log, config = tmp_path / "state", tmp_path / "access.log", tmp_path / "config.yaml"
    write(log, 300)  # read by the start-up round
    config.write_text(config_text(state, log, emu.url, saas=platform == "saas"))
    if platform == "saas":
        ledger = Ledger(state)
        ledger.add_customer(ACME)
        ledger.close()
    agent = start(agents, config, env_for(platform, emu))
    wait_for("the start-up round stored", lambda: last_t(state) is not None, 30, agent)
    first = last_t(state)
    write(log, 700)
    assert agent.proc is not None
    begun = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=60) == 0
    took = time.monotonic() - begun
    print(f"{platform}: the stop took {took:.1f} s")
    hours = ledger_hours(state)
    assert [(h.quantity.text, h.state) for h in hours] == [("1000", "sent")]
    assert billed(emu) == 1000  # every line written, once
    assert last_t(state) != first  # a reading after the round: the stop's, not a round's
    if platform == "saas":
        assert {r.customer for r in emu.records()} == {f"111122223333|{ACME.license_arn}"}
    if platform == "ecs":
        assert took < 25  # inside the task's 30 s grace


def test_a_hung_source_does_not_hold_the_stop_past_its_timeout(
    emu: Emulator, tmp_path: Path, agents: list[Agent], hanging: str
) -> None:
    """A source that never answers costs the stop its own timeout at most: the log's last
    lines are still counted and sent, and the stop ends in time."""
    state, log, config = tmp_path / "state", tmp_path / "access.log", tmp_path / "config.yaml"
    write(log, 300)
    probe = (
        "  - name: queue_depth\n"
        f"    collector: {{type: http, url: '{hanging}', format: prometheus, query: queue_depth, counter: true, timeout: 3}}\n"
    )
    config.write_text(config_text(state, log, emu.url, extra=probe))
    agent = start(agents, config, env_for("ec2", emu))
    wait_for("the start-up round stored", lambda: last_t(state) is not None, 30, agent)
    write(log, 700)
    assert agent.proc is not None
    begun = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=60) == 0
    took = time.monotonic() - begun
    print(f"the stop with a hung source took {took:.1f} s")
    assert billed(emu) == 1000
    # the hung read in flight (3 s), the last one behind it (3 s), the flush (a few seconds)
    assert took < 3 + 3 + 8, took


def test_a_reload_seals_a_changed_dimension_with_its_last_reading(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """SIGHUP with the dimension billed differently (scale 2): its hour is sealed as sampled,
    with the old collector's last reading of the lines written since the round."""
    state, log, config = tmp_path / "state", tmp_path / "access.log", tmp_path / "config.yaml"
    write(log, 300)
    config.write_text(config_text(state, log, emu.url))
    agent = start(agents, config, env_for("ec2", emu))
    wait_for("the start-up round stored", lambda: last_t(state) is not None, 30, agent)
    write(log, 700)
    config.write_text(config_text(state, log, emu.url, extra="    scale: 2\n"))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    sealed = wait_for("the hour sealed by the reload", lambda: ledger_hours(state), 30, agent)
    assert [h.quantity.text for h in sealed] == ["1000"]  # the old config's, with its last reading
    write(log, 50)  # read by the new config's collector, at the stop
    assert agent.terminate() == 0
    assert billed(emu) == 1000  # the sealed hour, sent by the stop's flush
    # the hour is sealed, so the new config's lines carry into the next hour (sum), unsealed yet
    db = sqlite3.connect(state / "ledger.db")
    try:
        (carried,) = db.execute("SELECT SUM(value) FROM samples WHERE dimension = 'requests'")
    finally:
        db.close()
    assert carried[0] == 50


def test_a_stop_counts_a_prometheus_counters_increase_since_the_last_round(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """A real prometheus_client exporter: what its counter gained after the start-up round is
    billed by the stop's last reading. (What it counted before that round is billed too: its
    `_created` is after the machine booted, so on a fresh ledger it counts from 0.)"""
    exporter = Exporter(tmp_path)
    try:
        exporter.inc("acme", 5)  # before the first reading: began after boot, so billed (SPEC)
        state, config = tmp_path / "state", tmp_path / "config.yaml"
        config.write_text(
            "\n".join(
                [
                    f"product_code: {PRODUCT}",
                    f"state_dir: {state}",
                    f'metering: {{endpoint_url: "{emu.url}", send_window: 0, '
                    "startup_check: false}",
                    "sampling: {interval: 60s}",
                    "dimensions:",
                    "  - name: jobs",
                    f"    collector: {{type: http, url: 'http://127.0.0.1:{exporter.port}/metrics',"
                    " format: prometheus, query: jobs_total, counter: true}",
                ]
            )
            + "\n"
        )
        agent = start(agents, config, env_for("ec2", emu))
        wait_for("the baseline stored", lambda: last_t(state, "jobs") is not None, 30, agent)
        exporter.inc("acme", 7)
        exporter.inc("globex", 11)  # a series first seen after the first reading: from 0
        assert agent.terminate() == 0
    finally:
        exporter.stop()
    assert billed(emu, "jobs") == 5 + 7 + 11
