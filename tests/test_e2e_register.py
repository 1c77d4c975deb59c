"""`run` with `register_usage:` (issue 15): the real daemon process registers with RegisterUsage (in
its short-lived child) before it samples, then meters; a refusal ends it with 77.

The agent and the emulator share one clock at 60x (an hour a minute), so the token's `iat` is
checked against the same time the emulator signed it at. Oracles: the order of the calls the
emulator received, its records, the ledger, `status`, exit codes."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.clock import Clock, hour_start, iso
from agent.emulator import Emulator, Settings
from tests.conftest import PRODUCT, run_cli
from tests.e2e import Agent, ledger_hours, ledger_samples, wait_for

pytestmark = pytest.mark.e2e
RATE = 60.0
CPUS = os.cpu_count()


@pytest.fixture
def fast(tmp_path: Path):
    """A 60x clock ten clock minutes (ten seconds) before an hour boundary, shared by the
    emulator and the agent."""
    now = time.time()
    clock = Clock(rate=RATE, origin=now - now % 3600 - 86400 + 3600 - 600, wall0=now)
    emulator = Emulator(Settings(product_codes={PRODUCT}), clock)
    url = emulator.serve(0)
    key = tmp_path / "marketplace.pem"
    key.write_bytes(emulator.public_key_pem())
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{url}", send_window: 0}}
            sampling: {{interval: 60s}}
            dimensions:
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            register_usage:
              public_key_version: 1
              public_key: {key}
            """
        )
    )
    agent = Agent(config, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": url}, ["--clock", clock.spec or ""])
    yield clock, emulator, agent
    if agent.alive():
        agent.kill9()
    emulator.stop()


def operations(emulator: Emulator) -> list[str]:
    """Each call as it arrived: RegisterUsage, DryRun or MeterUsage."""
    return [
        "DryRun" if c.get("request", {}).get("DryRun") else c["operation"]
        for c in emulator.received()
    ]


def status_json(config: Path) -> dict:
    result = run_cli("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_run_registers_before_sampling_then_meters(fast, tmp_path: Path) -> None:
    clock, emulator, agent = fast
    first_hour = hour_start(clock.time())
    agent.start()
    wait_for(
        "the first hour accepted",
        lambda: any(r.hour == first_hour for r in emulator.records()),
        40,
        agent,
    )
    ops = operations(emulator)
    assert ops[0] == "RegisterUsage" and ops.count("RegisterUsage") == 1
    assert {"DryRun", "MeterUsage"} <= set(ops[1:])
    (record,) = [r for r in emulator.records() if r.hour == first_hour]
    assert record.quantity_text == str(CPUS)
    reg = status_json(agent.config)["register_usage"]
    assert reg["signature_verified"] is True and reg["rotation_timestamp"] is None
    assert reg["registered_at"] is not None
    assert agent.terminate() == 0


def other_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("refusal", ["not entitled", "forged signature"])
def test_run_exits_77_before_sampling(fast, tmp_path: Path, refusal: str) -> None:
    _clock, emulator, agent = fast
    if refusal == "not entitled":
        emulator.configure(entitled=False)
        needle = "CustomerNotEntitledException"
    else:
        (tmp_path / "marketplace.pem").write_bytes(other_key_pem())
        needle = "does not verify"
    agent.start()
    assert agent.proc is not None
    assert agent.proc.wait(timeout=45) == 77
    out = agent.output()
    assert "Traceback" not in out
    (line,) = [x for x in out.splitlines() if x.startswith("metering-agent: ")]
    assert needle in line
    assert operations(emulator) == ["RegisterUsage"]  # no DryRun, no MeterUsage
    assert ledger_samples(tmp_path / "state") == 0 and ledger_hours(tmp_path / "state") == []


def test_run_retries_throttling_and_shows_the_rotation_in_status(fast, tmp_path: Path) -> None:
    _clock, emulator, agent = fast
    rotation = 1_900_000_000
    emulator.configure(rotation_timestamp=rotation)
    emulator.inject(
        "error", code="ThrottlingException", status=400, operation="RegisterUsage", count=2
    )
    agent.start()
    wait_for(
        "the registration in the ledger",
        lambda: (
            (tmp_path / "state" / "ledger.db").exists()
            and status_json(agent.config)["register_usage"]["registered_at"]
        ),
        45,
        agent,
    )
    outcomes = [
        c.get("code") or c["outcome"] for c in emulator.calls() if c["operation"] == "RegisterUsage"
    ]
    assert outcomes == ["ThrottlingException", "ThrottlingException", "ok"]
    wait_for("sampling", lambda: ledger_samples(tmp_path / "state") > 0, 20, agent)
    reg = status_json(agent.config)["register_usage"]
    assert reg["rotation_timestamp"] == iso(rotation)
    assert "rotated out" in reg["warning"]
    text = run_cli("status", "-c", str(agent.config)).stdout
    assert "warning [key_rotation] RegisterUsage: public key version 1 is being rotated out" in text
    assert agent.terminate() == 0


def test_trial_registers_with_the_emulators_own_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seller's config with the listing's key: `trial` points it at the emulator's key, so the
    whole container path runs offline."""
    import io

    from agent.commands import trial

    kept: list[Emulator] = []

    class KeptEmulator(Emulator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            kept.append(self)

    monkeypatch.setattr(trial, "Emulator", KeptEmulator)
    listing_key = tmp_path / "listing.pem"
    listing_key.write_bytes(other_key_pem())
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            dimensions:
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            register_usage: {{public_key_version: 2, public_key: {listing_key}}}
            """
        )
    )
    out = io.StringIO()
    assert trial.main(cfg, hours=1, speed=240, dimensions=None, out=out) == 0, out.getvalue()
    (emulator,) = kept
    ops = operations(emulator)
    assert ops[0] == "RegisterUsage" and ops.count("RegisterUsage") == 1
    (call,) = [c for c in emulator.calls() if c["operation"] == "RegisterUsage"]
    assert call["outcome"] == "ok" and call["request"]["PublicKeyVersion"] == 2
    assert {r.dimension for r in emulator.records()} == {"vcpus"}


def test_sigterm_during_a_slow_register_usage_exits_0_at_once(fast, tmp_path: Path) -> None:
    """In a container the agent is PID 1: SIGTERM must stop it while RegisterUsage still runs
    (its budget is 120 s), not be ignored until the kill."""
    _clock, emulator, agent = fast
    emulator.inject("slow", operation="RegisterUsage", delay=60.0)
    agent.start()
    # in flight now: `run` sets its SIGTERM handler as it starts the child, long before the child
    # (its imports, its credentials) sends anything
    wait_for("RegisterUsage to arrive", lambda: "RegisterUsage" in operations(emulator), 30, agent)
    begun = time.monotonic()
    assert agent.terminate(timeout=30) == 0
    assert time.monotonic() - begun < 5
    assert ledger_samples(tmp_path / "state") == 0  # nothing sampled, nothing to lose
