"""End to end: the real daemon process, a real boto3 client, the emulator, real hour boundaries.

Each scenario asserts the first law: every hour ends in exactly one accepted record with the
sealed quantity, and the service never sees a DuplicateRequestException.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from agent.clock import Clock, hour_start
from agent.emulator import Emulator, Settings
from tests.conftest import PRODUCT, run_cli
from tests.e2e import (
    Agent,
    faketime_env,
    ledger_hours,
    ledger_samples,
    offset_to_before_boundary,
    wait_for,
    wait_round_after,
)

pytestmark = pytest.mark.e2e
CPUS = os.cpu_count()


def write_config(tmp_path: Path, url: str, interval: str = "5s") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{url}", send_window: 0}}
            sampling: {{interval: {interval}}}
            dimensions:
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
              - name: vcpu_hours
                collector: {{type: system, metric: cpu_count}}
                aggregate: integral
                decimals: 6
            """
        )
    )
    return path


def meter_calls(emulator: Emulator, dimension: str = "vcpus") -> list[dict]:
    """MeterUsage requests (not DryRuns) for a dimension, as they arrived."""
    return [
        c
        for c in emulator.received()
        if c.get("request", {}).get("UsageDimension") == dimension
        and not c["request"].get("DryRun")
    ]


def assert_no_duplicates(emulator: Emulator) -> None:
    codes = [c.get("code") for c in emulator.calls()]
    assert "DuplicateRequestException" not in codes
    assert "IdempotencyConflictException" not in codes


def assert_no_secrets(log: str, emulator: Emulator) -> None:
    """No credential, session token, IMDS token or ClientToken in any log line, even at debug."""
    assert "sent quantity" in log  # the log is there at all
    secrets = [
        "ASIAEMULATOREXAMPLE1",
        "emulatorsecretkey",
        "emulator-session-token",
        "emulator-imds-token-",
    ]
    secrets += [r.client_token for r in emulator.records() if r.client_token]
    for secret in secrets:
        assert secret not in log


def authorized(state: Path) -> bool:
    path = state / "health.json"
    return path.exists() and json.loads(path.read_text())["authorized"] is True


@pytest.fixture
def faketime_agent(emulator: Emulator, tmp_path: Path):
    """Start the agent `lead` seconds before an hour boundary (faked wall clock)."""
    agents: list[Agent] = []

    def start(
        lead: float, offset: int | None = None, extra: list[str] | None = None
    ) -> tuple[Agent, int]:
        offset = offset_to_before_boundary(lead) if offset is None else offset
        agent = Agent(
            write_config(tmp_path, emulator.url), faketime_env(offset, emulator.url), extra
        )
        agents.append(agent.start())
        return agent, offset

    yield start
    for agent in agents:
        if agent.alive():
            agent.kill9()


def boundary_hour(offset: int) -> int:
    """The hour that the faked clock is finishing when the test starts."""
    return hour_start(time.time() + offset)


def test_hour_boundary_sends_the_exact_quantity(
    faketime_agent, emulator: Emulator, tmp_path: Path
) -> None:
    agent, offset = faketime_agent(lead=8)
    hour = boundary_hour(offset)
    wait_for("records for the finished hour", lambda: len(emulator.records()) == 2, 60, agent)
    by_dim = {r.dimension: r for r in emulator.records()}
    assert by_dim["vcpus"].hour == hour
    assert by_dim["vcpus"].quantity_text == str(CPUS)
    assert hour + 3500 <= by_dim["vcpus"].timestamp < hour + 3600  # the hour's last sample
    # the integral covers only the seconds the agent ran in that hour
    assert 0 < float(by_dim["vcpu_hours"].quantity_text) <= CPUS * 10 / 3600
    wait_for(
        "the ledger to record the answers",
        lambda: [h.state for h in ledger_hours(tmp_path / "state")] == ["sent", "sent"],
        20,
        agent,
    )
    sealed = {h.dimension: h for h in ledger_hours(tmp_path / "state")}
    assert sealed["vcpus"].record_id == by_dim["vcpus"].record_id
    assert sealed["vcpus"].client_token == by_dim["vcpus"].client_token
    # status reads the ledger while the daemon runs
    status = run_cli("status", "--json", "-c", str(tmp_path / "config.yaml"))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert {h["record_id"] for h in report["hours"]} == {r.record_id for r in emulator.records()}
    assert report["health"]["ok"] is True
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0


def test_faults_end_in_one_record(faketime_agent, emulator: Emulator, tmp_path: Path) -> None:
    agent, _offset = faketime_agent(lead=10, extra=["--log-level", "debug"])
    wait_for("the start-up DryRun", lambda: authorized(tmp_path / "state"), 20, agent)
    # 5xx, throttling, a dropped connection, and a lost answer (recorded, never answered)
    emulator.inject("error", code="InternalServiceErrorException", status=500)
    emulator.inject("error", code="ThrottlingException", status=400)
    emulator.inject("drop")
    emulator.inject("lose")
    wait_for("both records", lambda: len(emulator.records()) == 2, 150, agent)
    wait_for(
        "ledger shows both sent",
        lambda: (
            all(h.state == "sent" for h in ledger_hours(tmp_path / "state"))
            and len(ledger_hours(tmp_path / "state")) == 2
        ),
        30,
        agent,
    )
    calls = meter_calls(emulator, "vcpus") + meter_calls(emulator, "vcpu_hours")
    assert len(calls) >= 6  # four faults, then the answers
    for dim in ("vcpus", "vcpu_hours"):
        bodies = {json.dumps(c["request"], sort_keys=True) for c in meter_calls(emulator, dim)}
        assert len(bodies) == 1, "every retry must send the identical sealed request"
    record = {r.dimension: r.record_id for r in emulator.records()}
    assert {h.dimension: h.record_id for h in ledger_hours(tmp_path / "state")} == record
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0
    assert_no_secrets(agent.output(), emulator)


def test_kill9_mid_hour_keeps_the_samples(
    faketime_agent, emulator: Emulator, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    agent, offset = faketime_agent(lead=22)
    before = wait_for(
        "samples before the crash", lambda: (n := ledger_samples(state)) >= 6 and n, 20, agent
    )
    agent.kill9()
    kept = ledger_samples(state)
    assert kept >= before
    agent, _ = faketime_agent(lead=0, offset=offset)  # the same faked clock continues
    wait_for("records", lambda: len(emulator.records()) == 2, 60, agent)
    sealed = {h.dimension: h for h in ledger_hours(state)}
    assert sealed["vcpus"].samples > kept // 2  # per dimension: the pre-crash ones plus newer
    assert sealed["vcpus"].quantity.text == str(CPUS)
    assert_no_duplicates(emulator)
    agent.terminate()


def test_kill9_with_a_request_in_flight_resends_it_identically(
    faketime_agent, emulator: Emulator, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    agent, offset = faketime_agent(lead=6)
    wait_for("the start-up DryRun", lambda: authorized(state), 20, agent)
    emulator.inject("slow", delay=4.0)  # the first MeterUsage is recorded 4 s after it arrives
    wait_for(
        "a MeterUsage in flight",
        lambda: meter_calls(emulator, "vcpus") or meter_calls(emulator, "vcpu_hours"),
        60,
        agent,
    )
    agent.kill9()
    assert {h.state for h in ledger_hours(state)} == {"pending"}
    # the service finishes recording the request whose answer nobody read (4 s after it came)
    wait_for("the unanswered request recorded", lambda: emulator.records(), 20)
    assert len(emulator.records()) == 1
    agent, _ = faketime_agent(lead=0, offset=offset)
    wait_for(
        "both hours sent",
        lambda: [h.state for h in ledger_hours(state)] == ["sent", "sent"],
        60,
        agent,
    )
    for dim in ("vcpus", "vcpu_hours"):
        bodies = {json.dumps(c["request"], sort_keys=True) for c in meter_calls(emulator, dim)}
        assert len(bodies) == 1
    assert len(emulator.records()) == 2
    assert {h.record_id for h in ledger_hours(state)} == {r.record_id for r in emulator.records()}
    assert_no_duplicates(emulator)
    agent.terminate()


def test_sigterm_sends_the_partial_hour(faketime_agent, emulator: Emulator, tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent, offset = faketime_agent(lead=1200)  # 20 minutes before the boundary
    wait_for("a few samples", lambda: ledger_samples(state) >= 4, 20, agent)
    started = time.monotonic()
    assert agent.terminate(timeout=45) == 0
    assert time.monotonic() - started < 35
    by_dim = {r.dimension: r for r in emulator.records()}
    assert by_dim["vcpus"].hour == boundary_hour(offset) and by_dim["vcpus"].quantity_text == str(
        CPUS
    )
    assert [h.state for h in ledger_hours(state)] == ["sent", "sent"]


def test_a_second_run_exits_1_with_one_line(
    faketime_agent, emulator: Emulator, tmp_path: Path
) -> None:
    agent, _offset = faketime_agent(lead=600)
    wait_for("the state lock", lambda: (tmp_path / "state" / "lock").exists(), 20, agent)
    result = run_cli("run", "-c", str(tmp_path / "config.yaml"), timeout=30)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "another metering-agent run holds" in line
    agent.terminate()


# -- multi-hour outages on the accelerated clock (same engine, one clock shared with the emulator)


RATE = 600.0  # an hour passes in 6 s


@pytest.fixture
def fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    now = time.time()
    clock = Clock(rate=RATE, origin=now - now % 3600 - 3 * 86400 + 1800, wall0=now)
    emulator = Emulator(Settings(product_codes={PRODUCT}), clock)
    url = emulator.serve(0)
    agent = Agent(
        write_config(tmp_path, url, interval="60s"),
        {"AWS_EC2_METADATA_SERVICE_ENDPOINT": url},
        ["--clock", clock.spec or ""],
    )
    yield clock, emulator, agent
    if agent.alive():
        agent.kill9()
    emulator.stop()


@pytest.mark.parametrize(("outage_hours", "expired"), [(4, 0), (7, 1)])
def test_outage_then_recovery(fast, tmp_path: Path, outage_hours: int, expired: int) -> None:
    clock, emulator, agent = fast
    first_hour = hour_start(clock.time())
    emulator.inject("error", count=1_000_000, code="InternalServiceErrorException", status=503)
    agent.start()
    wait_for(
        f"{outage_hours} hours of outage",
        lambda: clock.time() >= first_hour + outage_hours * 3600 + 600,
        outage_hours * 8 + 20,
        agent,
    )
    health = json.loads((tmp_path / "state" / "health.json").read_text())
    assert health["ok"] is False and health["pending_hours"] >= outage_hours - expired
    emulator.clear_faults()
    hours = range(first_hour, first_hour + outage_hours * 3600, 3600)
    wait_for(
        "every outage hour settled",
        lambda: (
            {
                h.hour
                for h in ledger_hours(tmp_path / "state")
                if h.state != "pending" and h.dimension == "vcpus"
            }
            >= set(hours)
        ),
        60,
        agent,
    )
    states = {h.hour: h.state for h in ledger_hours(tmp_path / "state") if h.dimension == "vcpus"}
    assert [states[h] for h in hours] == ["expired"] * expired + ["sent"] * (outage_hours - expired)
    sent = {r.hour for r in emulator.records() if r.dimension == "vcpus"}
    assert sent >= set(list(hours)[expired:])
    assert first_hour not in sent or expired == 0
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0


def test_clock_jump_seals_the_skipped_hour_once(emulator: Emulator, tmp_path: Path) -> None:
    """A suspend (or an NTP step) moves the wall clock three hours ahead while the agent runs:
    the hour it was in is sealed once and sent once; the empty hours send nothing."""
    state = tmp_path / "state"
    stamp = tmp_path / "faketime"
    offset = offset_to_before_boundary(600)  # ten minutes before an hour boundary
    stamp.write_text(f"{offset:+d}\n")
    env = faketime_env(offset, emulator.url)
    del env["FAKETIME"]
    env.update(FAKETIME_TIMESTAMP_FILE=str(stamp), FAKETIME_NO_CACHE="1")
    agent = Agent(write_config(tmp_path, emulator.url), env).start()
    hour = boundary_hour(offset)
    wait_for("a few samples", lambda: ledger_samples(state) >= 4, 20, agent)
    stamp.write_text(f"{offset + 3 * 3600:+d}\n")  # the jump
    wait_for("the hour before the jump sent", lambda: len(emulator.records()) == 2, 60, agent)
    # A negative check, bounded by rounds, not seconds: a whole round after the hour was sent
    # (its reads and its seal pass, at an instant after now on the jumped clock) seals nothing
    # again; a second seal would show in the ledger's hours below, before any send of it.
    now = time.time() + offset + 3 * 3600
    wait_round_after(state, now, 5, "a whole round after the send", 30, agent)
    assert {(r.hour, r.dimension) for r in emulator.records()} == {
        (hour, "vcpus"),
        (hour, "vcpu_hours"),
    }
    assert [h.hour for h in ledger_hours(state)] == [hour, hour]
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0


def test_failure_hooks_run_once_each_way(fast, tmp_path: Path) -> None:
    """The daemon runs on_metering_failure after `after` of failures, and on_recovery once sends
    work again (accelerated clock: an hour in 6 s)."""
    clock, emulator, agent = fast
    events = tmp_path / "events"
    with open(agent.config, "a") as f:
        f.write(
            textwrap.dedent(
                f"""
                on_metering_failure:
                  after: 1h
                  command: [sh, -c, 'echo "$METERING_AGENT_EVENT" >> {events}']
                on_recovery:
                  command: [sh, -c, 'echo "$METERING_AGENT_EVENT" >> {events}']
                """
            )
        )
    start = clock.time()
    emulator.inject("error", count=1_000_000, code="InternalServiceErrorException", status=503)
    agent.start()
    wait_for("two hours of failures", lambda: clock.time() >= start + 2 * 3600, 30, agent)
    assert events.read_text().splitlines() == ["on_metering_failure"]
    emulator.clear_faults()
    wait_for(
        "the recovery hook",
        lambda: events.read_text().splitlines() == ["on_metering_failure", "on_recovery"],
        60,
        agent,
    )
    assert agent.terminate() == 0
    assert events.read_text().splitlines() == ["on_metering_failure", "on_recovery"]
