"""End to end, the real daemon and the emulator: refusals that must not lose an hour, health that
names what was lost, one sender per product, and a baked ledger on a slow first boot."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from agent.clock import hour_start, iso_hour
from agent.emulator import Emulator, Settings
from agent.errors import EX_NOPERM
from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from tests.billing import make_config
from tests.conftest import PRODUCT, run_cli
from tests.e2e import Agent, faketime_env, ledger_hours, offset_to_before_boundary, wait_for
from tests.test_e2e import assert_no_duplicates, meter_calls
from tests.test_sealing import fill

pytestmark = pytest.mark.e2e
WRONG = "zzzz1234efgh5678ijkl90mn"


def config_text(
    state: Path,
    url: str,
    product: str = PRODUCT,
    dims: tuple[str, ...] = ("vcpus", "vcpu_hours"),
    startup_check: bool = True,
) -> str:
    lines = [
        f"product_code: {product}",
        f"state_dir: {state}",
        f'metering: {{endpoint_url: "{url}", send_window: 0, '
        f"startup_check: {str(startup_check).lower()}}}",
        "sampling: {interval: 5s}",
        "dimensions:",
    ]
    for name in dims:
        lines.append(f"  - name: {name}\n    collector: {{type: system, metric: cpu_count}}")
        if name.endswith("_hours"):
            lines.append("    aggregate: integral\n    decimals: 6")
    return "\n".join(lines) + "\n"


def hours(state: Path) -> list:
    """The ledger's hours, or none while the daemon is still creating it."""
    try:
        return ledger_hours(state)
    except sqlite3.Error:
        return []


def health(state: Path) -> dict:
    path = state / "health.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill9()


def start(agents: list[Agent], config: Path, env: dict[str, str]) -> Agent:
    agent = Agent(config, env).start()
    agents.append(agent)
    return agent


def test_a_signature_error_then_success_sends_the_hour(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emulator.url))
    offset = offset_to_before_boundary(8)
    emulator.inject(
        "error",
        count=2,
        code="InvalidSignatureException",
        status=403,
        message="Signature expired: 20261127T100000Z is now earlier than 20261127T100500Z",
    )
    agent = start(agents, cfg, faketime_env(offset, emulator.url))
    wait_for("both records", lambda: len(emulator.records()) == 2, 60, agent)
    wait_for(
        "the ledger to show both sent",
        lambda: [h.state for h in hours(state)] == ["sent", "sent"],
        20,
        agent,
    )
    refused = [c for c in emulator.calls() if c.get("code") == "InvalidSignatureException"]
    assert len(refused) == 2  # the faults were met, and the same hours then went out
    for dim in ("vcpus", "vcpu_hours"):
        bodies = {json.dumps(c["request"], sort_keys=True) for c in meter_calls(emulator, dim)}
        assert len(bodies) == 1
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0


def test_an_unknown_dimension_is_named_in_health_status_and_check(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    emulator.configure(dimensions={"vcpus", "vcpu_hours"})
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emulator.url, dims=("vcpus", "egress_gb")))
    offset = offset_to_before_boundary(8)
    agent = start(agents, cfg, faketime_env(offset, emulator.url))
    wait_for("the vcpus record", lambda: len(emulator.records()) == 1, 60, agent)
    wait_for(
        "health to name the refused dimension",
        lambda: "egress_gb" in (health(state).get("reason") or ""),
        30,
        agent,
    )
    data = health(state)
    assert data["ok"] is False and "InvalidUsageDimensionException" in data["reason"]
    states = {h.dimension: h.state for h in hours(state)}
    assert states == {"vcpus": "sent", "egress_gb": "pending"}  # held, not lost
    status = run_cli("status", "--json", "-c", str(cfg))
    assert json.loads(status.stdout)["health"]["ok"] is False
    check = run_cli(
        "check", "-c", str(cfg), env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    )
    assert check.returncode == EX_NOPERM
    (line,) = check.stderr.strip().splitlines()
    assert "egress_gb" in line
    assert agent.terminate() == 0


def test_a_wrong_then_fixed_product_code_sends_the_held_hours(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emulator.url, product=WRONG, startup_check=False))
    offset = offset_to_before_boundary(8)
    hour = hour_start(time.time() + offset)
    env = faketime_env(offset, emulator.url)
    agent = start(agents, cfg, env)
    wait_for(
        "both hours refused for the product code",
        lambda: (
            sum(1 for h in hours(state) if (h.last_error or "").startswith("InvalidProductCode"))
            == 2
        ),
        60,
        agent,
    )
    # the sender records the refusals in the ledger, then rewrites health.json: wait for that
    wait_for("health not ok", lambda: health(state)["ok"] is False, 10, agent)
    assert agent.terminate() == 0  # the stop seals the partial next hour too (also held)
    held = {(h.dimension, h.hour): h for h in hours(state)}
    assert {h.state for h in held.values()} == {"pending"}
    assert {h.product_code for h in held.values()} == {WRONG}
    assert emulator.records() == []
    cfg.write_text(config_text(state, emulator.url))  # the seller fixes product_code
    agent = start(agents, cfg, env)  # same faked clock, later
    wait_for(
        "every held hour accepted",
        lambda: {(h.dimension, h.hour) for h in hours(state) if h.state == "sent"} >= set(held),
        60,
        agent,
    )
    records = {(r.dimension, r.hour): r for r in emulator.records()}
    assert {("vcpus", hour), ("vcpu_hours", hour)} <= set(records)
    after = {(h.dimension, h.hour): h for h in hours(state)}
    for key, old in held.items():
        new = after[key]
        assert new.product_code == PRODUCT and new.reissues == 1
        assert new.client_token != old.client_token
        assert records[key].client_token == new.client_token
        assert records[key].product_code == PRODUCT
        assert new.quantity == old.quantity and new.timestamp == old.timestamp
    status = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
    assert {h["reissues"] for h in status["hours"] if h["hour"] == iso_hour(hour)} == {1}
    assert_no_duplicates(emulator)
    assert agent.terminate() == 0


def non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return str(a.address)
    return None


def test_a_second_agent_for_the_product_exits_1_naming_the_first(
    tmp_path: Path, agents: list[Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("no non-loopback IPv4 address to serve the emulator on")
    emulator = Emulator(Settings(product_codes={PRODUCT}))
    url = emulator.serve(0, host=address)  # not loopback: the product lock is taken
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first, second = tmp_path / "a" / "config.yaml", tmp_path / "b" / "config.yaml"
        first.write_text(config_text(tmp_path / "a" / "state", url))
        second.write_text(config_text(tmp_path / "b" / "state", url))
        lock = tmp_path / "run" / f"{PRODUCT}.lock"
        agent = start(agents, first, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
        wait_for(
            "the product lock", lambda: lock.exists() and str(first) in lock.read_text(), 20, agent
        )
        result = run_cli("run", "-c", str(second), timeout=30)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()
        assert str(first) in line and PRODUCT in line
        assert not (tmp_path / "b" / "state" / "ledger.db").exists()  # it sampled nothing
        assert agent.terminate() == 0
        # with the first one gone, the second may run
        agent = start(agents, second, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
        wait_for("the lock to name the second", lambda: str(second) in lock.read_text(), 20, agent)
        wait_for(
            "its DryRun", lambda: health(tmp_path / "b" / "state").get("authorized"), 30, agent
        )
        assert agent.terminate() == 0
    finally:
        emulator.stop()


def samples_in(db_path: Path, since: float = 0.0) -> set[tuple[str, float]]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT dimension, t FROM samples WHERE t >= ?", (since,)).fetchall()
    return {(d, t) for d, t in rows}


def instance_of(db_path: Path) -> str | None:
    """The instance id the ledger at `db_path` names (the file there now: the swap is atomic)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
    return None if row is None else json.loads(row[0])


def test_a_baked_ledger_is_never_sent_when_imds_is_slow_at_first_boot(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """The image carries the build instance's ledger with a pending hour and a few unsealed
    samples. First boot: IMDS silent and the agent stopped before it answers; second start: IMDS
    silent for a while, then it answers. Nothing from the build instance is sent or carried; the
    ledger is moved aside and both buyer runs' samples are carried into the fresh one and sent."""
    state = tmp_path / "state"
    build = make_config(tmp_path)  # writes tmp_path/config.yaml; replaced below
    ledger = Ledger(state)
    ledger.update_meta(instance_id="i-0build000000000", instance_id_source="imds")
    now = time.time()
    baked_hour = hour_start(now) - 3600
    fill(ledger, "vcpus", baked_hour, 3)
    seal_hours(ledger, build, now, offset=0)
    (baked,) = ledger.pending()
    built_at = max(hour_start(now), now - 30)  # sampled on the build instance, before baking
    ledger.record_sample("vcpus", built_at, Decimal(2), 1, None, carry=False)
    ledger.close()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emulator.url))
    emulator.configure(imds_hang=2.0)
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}

    # first boot: IMDS never answers; the agent samples, then stops
    agent = start(agents, cfg, env)
    wait_for(
        "health to say the identity is unverified",
        lambda: "not verified" in (health(state).get("reason") or ""),
        15,
        agent,
    )
    assert health(state)["ok"] is False
    wait_for("a few samples", lambda: len(samples_in(state / "ledger.db", now)) >= 4, 20, agent)
    assert agent.terminate() == 0
    assert list(state.glob("ledger.db.instance-*")) == []  # not decided without IMDS
    first_run = samples_in(state / "ledger.db", now)
    assert ("vcpus", built_at) not in first_run and len(first_run) >= 4

    # second start: IMDS silent a while longer, then it answers
    agent = start(agents, cfg, env)
    wait_for(
        "the second run to sample",
        lambda: samples_in(state / "ledger.db") - first_run - {("vcpus", built_at)},
        20,
        agent,
    )
    assert list(state.glob("ledger.db.instance-*")) == []
    emulator.configure(imds_hang=0.0)
    wait_for(
        "the baked ledger moved aside and a fresh one in its place",
        lambda: (
            list(state.glob("ledger.db.instance-*"))
            and instance_of(state / "ledger.db") not in (None, "i-0build000000000")
        ),
        40,
        agent,
    )
    carried = samples_in(state / "ledger.db")
    assert first_run <= carried, "the first run's samples are carried into the fresh ledger"
    assert ("vcpus", built_at) not in carried, "the build instance's samples are not"
    wait_for(
        "the fresh ledger's DryRun", lambda: health(state).get("authorized") is True, 30, agent
    )
    assert agent.terminate() == 0  # the stop seals and sends the buyer's partial hour
    sent = [c["request"] for c in emulator.received() if not c["request"].get("DryRun")]
    assert sent, "the buyer's own partial hour goes out"
    assert all(r.get("ClientToken") != baked.client_token for r in sent)
    assert all(hour_start(r.hour) != baked_hour for r in emulator.records())
    (moved,) = [
        p for p in state.glob("ledger.db.instance-i-0build000000000.*") if p.name[-1].isdigit()
    ]
    with sqlite3.connect(moved) as db:  # the baked hour is kept there, unsent
        assert db.execute("SELECT state, client_token FROM hours").fetchall() == [
            ("pending", baked.client_token)
        ]
    assert ("vcpus", built_at) in samples_in(moved)
    fresh = hours(state)
    assert all(h.hour != baked_hour for h in fresh)
    assert samples_in(state / "ledger.db") == set(), "every carried sample was sealed"
    assert health(state)["ok"] is True
