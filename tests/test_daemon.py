"""The daemon's pieces, driven by a fake clock (no scheduler, no child processes)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.clock import Clock, iso_hour
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.config import Config
from agent.config import load as config_load
from agent.config.loader import RUNNING_CONFIG
from agent.daemon import daemon
from agent.daemon.daemon import Daemon
from agent.daemon.sender import SenderProcess, send_command
from agent.daemon.triggers import ClockTrigger, snap
from agent.errors import LockHeld
from agent.host import identity
from agent.host.imds import ImdsError
from agent.host.locks import StateLock
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.billing import H, make_config
from tests.conftest import PRODUCT
from tests.fakes import FakeClock, FakePsutil, RecordingLog


class FakeImds:
    def __init__(self, instance_id: str | None) -> None:
        self.id = instance_id

    def instance_id(self) -> str:
        if self.id is None:
            raise ImdsError("IMDS unreachable")
        return self.id


def test_clock_trigger_fires_on_the_grid_of_the_agent_clock() -> None:
    clock = Clock(rate=60.0, origin=H - 30, wall0=1000.0)  # one real second is a clock minute
    trigger = ClockTrigger(clock, 60)
    now = datetime.fromtimestamp(1000.0, tz=timezone.utc)
    fire = trigger.get_next_fire_time(None, now)
    assert clock.from_wall(fire.timestamp()) == pytest.approx(H)
    after = trigger.get_next_fire_time(fire, fire)
    assert clock.from_wall(after.timestamp()) == pytest.approx(H + 60)


def test_clock_trigger_with_phase() -> None:
    clock = Clock(rate=1.0, origin=H + 10, wall0=H + 10)
    now = datetime.fromtimestamp(H + 10, tz=timezone.utc)
    fire = ClockTrigger(clock, 3600, phase=42).get_next_fire_time(None, now)
    assert fire.timestamp() == pytest.approx(H + 42)


@pytest.mark.parametrize(
    ("t", "interval", "expected"),
    [
        (H - 0.001, 60, H),
        (H + 0.4, 60, H),
        (H + 2, 60, H + 2),
        (H + 59.9, 60, H + 60),
        (H + 0.2, 1, H),
        (H + 0.3, 1, H + 0.3),
    ],
)
def test_snap(t: float, interval: int, expected: float) -> None:
    assert snap(t, interval) == expected


def test_snap_allows_one_real_second_on_an_accelerated_clock() -> None:
    """At 120x a round 50 ms (real) late is 6 clock seconds late: still its instant's reading."""
    assert snap(H + 6, 60, rate=120) == H
    assert snap(H + 6, 60) == H + 6
    assert snap(H + 16, 60, rate=120) == H + 16  # a quarter interval stays the bound


def test_second_run_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    held = StateLock(tmp_path)
    held.acquire()
    with pytest.raises(LockHeld, match="another metering-agent run holds"):
        StateLock(tmp_path).acquire()


def open_daemon(
    cfg: Config,
    clock: Clock,
    imds: Any,
    sampler: Sampler | None = None,
    sender_command: Callable[[bool, float | None], list[str]] | None = None,
) -> Daemon:
    """A Daemon on its ledger as `daemon.start` builds it, without the locks (two daemons on one
    state dir, one after the other, is how these tests restart) and with a fake IMDS."""
    state = Path(cfg.state_dir)
    ident = identity.Identity(imds, clock, state)
    ledger = ident.start(Ledger(state))
    command = sender_command or functools.partial(
        send_command, state / RUNNING_CONFIG, clock, "text"
    )
    sender = SenderProcess(command, clock.monotonic)
    return Daemon(cfg, clock, ledger, ident, sampler or Sampler(cfg), sender)


def resolve_identity(ledger: Ledger, imds: FakeImds, state_dir: Path, now: float) -> Ledger:
    return identity.settle(ledger, identity.ask(imds), state_dir, now)  # type: ignore[arg-type]


class TestIdentity:
    def test_records_the_imds_id(self, tmp_path: Path) -> None:
        ledger = resolve_identity(Ledger(tmp_path), FakeImds("i-1"), tmp_path, H)
        assert (ledger.get_meta("instance_id"), ledger.get_meta("instance_id_source")) == (
            "i-1",
            "imds",
        )

    def test_a_ledger_from_another_instance_is_moved_aside(self, tmp_path: Path) -> None:
        baked = resolve_identity(Ledger(tmp_path), FakeImds("i-build"), tmp_path, H)
        baked.record_sample("vcpus", H, 4, 60, None, carry=False)  # type: ignore[arg-type]
        baked.close()
        fresh = resolve_identity(Ledger(tmp_path), FakeImds("i-buyer"), tmp_path, H)
        assert fresh.get_meta("instance_id") == "i-buyer"
        assert fresh.unsealed_sample_count() == 0  # nothing from the old one is sent
        assert list(tmp_path.glob("ledger.db.instance-i-build.*"))

    def test_no_imds_keeps_a_random_id(self, tmp_path: Path) -> None:
        ledger = resolve_identity(Ledger(tmp_path), FakeImds(None), tmp_path, H)
        first = ledger.get_meta("instance_id")
        assert first.startswith("local-")
        ledger = resolve_identity(ledger, FakeImds(None), tmp_path, H)
        assert ledger.get_meta("instance_id") == first

    def test_imds_down_at_boot_keeps_the_known_id(self, tmp_path: Path) -> None:
        ledger = resolve_identity(Ledger(tmp_path), FakeImds("i-1"), tmp_path, H)
        ledger = resolve_identity(ledger, FakeImds(None), tmp_path, H)
        assert ledger.get_meta("instance_id") == "i-1"


def daemon_for(tmp_path: Path, clock: FakeClock, ps: FakePsutil) -> Daemon:
    cfg = make_config(tmp_path)
    sampler = Sampler(cfg, Registry(), Sources(psutil=ps, proc=tmp_path / "proc"))
    return open_daemon(
        cfg, clock, FakeImds("i-1"), sampler=sampler, sender_command=lambda *_: ["true"]
    )


def run_round(d: Daemon, interval: int = 60) -> None:
    """One sampling round, waiting for its reads (each runs in its own thread)."""
    d.sample_round(interval)
    assert d.reads.wait(10)


def test_rounds_across_an_hour_boundary_seal_it_once(tmp_path: Path) -> None:
    clock = FakeClock(H - 120)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    for _ in range(4):  # H-2m, H-1m, H, H+1m
        run_round(d)
        ps.user_list = [*ps.user_list, object()]  # one more user each minute: +1 per round
        clock.advance(60)
    hours = {(h.dimension, h.hour): h for h in d.ledger.hours()}
    assert set(hours) == {("vcpus", H - 3600), ("requests", H - 3600), ("vcpu_hours", H - 3600)}
    assert hours[("vcpus", H - 3600)].quantity.value == 4
    assert hours[("requests", H - 3600)].quantity.value == 1  # first reading has no baseline
    assert hours[("vcpu_hours", H - 3600)].quantity.value == "0.133"  # 4 vCPUs x 2 min
    assert d.ledger.unsealed_sample_count() == 6  # H and H+1m for three dimensions


def test_restart_within_a_sealed_hour_carries_sums_and_drops_levels(tmp_path: Path) -> None:
    clock = FakeClock(H + 600)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    run_round(d)
    # a stop at H+10m seals the partial hour H (what shutdown() does, minus the child)
    from agent.modes.instance import seal_hours

    seal_hours(d.ledger, d.config, clock.time(), 0, include_current=True)
    clock.advance(60)
    ps.user_list = [*ps.user_list, object(), object()]
    run_round(d)  # restarted: the hour H is sealed already
    status = {s.dimension: s for s in d.ledger.dimension_status()}
    assert status["vcpus"].dropped == 1
    clock.t = H + 3600 + 60
    run_round(d)
    clock.t = H + 7200
    run_round(d)
    requests = [h for h in d.ledger.hours() if h.dimension == "requests" and h.hour == H + 3600]
    assert requests[0].quantity.value == 2  # the two users that arrived after the stop


def test_a_failing_collector_is_counted_every_round_but_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(H)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    journal = RecordingLog()
    monkeypatch.setattr(daemon, "log", journal)

    def broken(logical: bool = True) -> int:
        raise RuntimeError("psutil exploded")

    ps.cpu_count = broken  # type: ignore[method-assign]
    for _ in range(3):
        run_round(d)
        clock.advance(60)
    failed = journal.at("warning")
    ps.cpu_count = lambda logical=True: 4  # type: ignore[method-assign]
    run_round(d)
    status = {s.dimension: s for s in d.ledger.dimension_status()}
    assert status["vcpus"].errors == 3  # status counts every failed round
    assert sorted(args[0] for args in failed) == ["vcpu_hours", "vcpus"]  # once each
    assert ("vcpus",) in journal.at("info")  # and once that it works again
    assert journal.at("warning") == failed  # the good round warned of nothing
    assert status["requests"].errors == 0  # the other dimensions kept billing


def test_an_unwritable_state_dir_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"product_code: p1\nstate_dir: {blocker / 'state'}\n"
        "dimensions:\n  - name: v\n    collector: {type: system, metric: cpu_count}\n"
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"state_dir {blocker / 'state'}: Not a directory" in line


def _vcpus(d: Daemon) -> dict[int, str]:
    return {h.hour: str(h.quantity.text) for h in d.ledger.hours() if h.dimension == "vcpus"}


def test_a_restart_leaves_the_hour_open_for_the_restarted_agent(tmp_path: Path) -> None:
    clock = FakeClock(H + 600)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    d.sample_round(60)
    assert d.reads.wait(10)
    d.restarting = lambda: True
    d.shutdown()  # systemctl restart at H+10m
    clock.advance(60)
    ps.cpus = 8  # the hour's max comes after the restart
    d2 = daemon_for(tmp_path, clock, ps)
    d2.sample_round(60)
    assert d2.reads.wait(10)
    assert _vcpus(d2) == {}  # still open
    clock.t = H + 3600
    d2.sample_round(60)
    assert d2.reads.wait(10)
    assert _vcpus(d2) == {H: "8"}  # one record, the whole hour's max
    status = {s.dimension: s for s in d2.ledger.dimension_status()}
    assert status["vcpus"].dropped == 0


def test_a_stop_seals_at_once_and_late_drops_warn_once_per_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(H + 600)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    d.sample_round(60)
    assert d.reads.wait(10)
    d.restarting = lambda: False
    d.shutdown()  # a shutdown at H+10m: sealed and sent at once
    d2 = daemon_for(tmp_path, clock, ps)
    assert _vcpus(d2) == {H: "4"}
    journal = RecordingLog()
    monkeypatch.setattr(daemon, "log", journal)
    for _ in range(5):  # booted again within the same hour
        clock.advance(60)
        d2.sample_round(60)
        assert d2.reads.wait(10)
    status = {s.dimension: s for s in d2.ledger.dimension_status()}
    assert status["vcpus"].dropped == 5  # status counts every dropped sample
    (dropped,) = journal.at("warning")  # the journal hears of it once this hour
    assert dropped[0] == "vcpus" and dropped[2] == iso_hour(H)


def test_reload_takes_a_good_config_and_keeps_the_running_one_on_a_bad(tmp_path: Path) -> None:
    clock = FakeClock(H + 600)
    d = daemon_for(tmp_path, clock, FakePsutil())
    source = d.config.source
    good = source.read_text().replace(
        "  - name: requests",
        "  - name: extra\n    collector: {type: system, metric: cpu_count}\n  - name: requests",
    )
    source.write_text(good)
    d.reload()
    assert [x.name for x in d.config.dimensions] == ["vcpus", "extra", "requests", "vcpu_hours"]
    d.sample_round(60)  # the new dimension samples with the rest
    assert d.reads.wait(10)
    assert {s.dimension for s in d.ledger.dimension_status()} >= {"extra"}
    for bad in [
        "dimensions: [",
        good.replace("name: extra", "name: extra\n    oops: 1"),
        good.replace(f"state_dir: {tmp_path / 'state'}", f"state_dir: {tmp_path / 'x'}"),
    ]:
        source.write_text(bad)
        d.reload()
        assert [x.name for x in d.config.dimensions] == ["vcpus", "extra", "requests", "vcpu_hours"]
        assert d.state_dir == tmp_path / "state"


def _sealed(d: Daemon) -> dict[tuple[str, int], str]:
    return {(h.dimension, h.hour): h.quantity.text for h in d.ledger.hours()}


def test_reload_seals_a_dimension_it_bills_differently_as_it_was_sampled(tmp_path: Path) -> None:
    """vcpus sampled as `max` for 10 minutes, then reloaded as `sum`: its hour so far is sealed
    as the max it was (4), not summed under the new aggregate; a dropped dimension is sealed too;
    an unchanged one stays open."""
    clock = FakeClock(H + 600)
    d = daemon_for(tmp_path, clock, FakePsutil())
    for _ in range(10):
        run_round(d)
        clock.advance(60)
    source = d.config.source
    text = source.read_text()
    text = text.replace(
        "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n",
        "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n    aggregate: sum\n",
    )
    text = text[: text.index("  - name: vcpu_hours")]  # dropped
    source.write_text(text)
    d.reload()
    assert d.config.dimensions[0].aggregate == "sum"
    sealed = _sealed(d)
    assert sealed[("vcpus", H)] == "4"
    assert ("vcpu_hours", H) in sealed
    assert ("requests", H) not in sealed  # unchanged: its hour goes on


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (f"product_code: {PRODUCT}", "product_code: zzzz1234efgh5678ijkl90mn"),
        ("dimensions:", "metering: {endpoint_url: 'http://127.0.0.1:9'}\ndimensions:"),
    ],
)
def test_reload_refuses_what_needs_a_restart(tmp_path: Path, old: str, new: str) -> None:
    d = daemon_for(tmp_path, FakeClock(H + 600), FakePsutil())
    before = d.config
    d.config.source.write_text(d.config.source.read_text().replace(old, new, 1))
    d.reload()
    assert d.config is before


def test_the_sender_reads_the_running_config_not_the_edited_file(tmp_path: Path) -> None:
    """An edit not yet reloaded (or one a reload refused) never reaches the send child."""
    from agent.config.loader import keep_snapshot, snapshot_config

    cfg = make_config(tmp_path)
    Path(cfg.state_dir).mkdir()
    cfg, snap = snapshot_config(cfg.source, Path(cfg.state_dir))
    keep_snapshot(Path(cfg.state_dir), snap)
    d = open_daemon(cfg, FakeClock(H + 600), FakeImds("i-1"))
    running = d.config.source.read_text()
    d.config.source.write_text("dimensions: [")  # a broken edit
    d.reload()  # refused
    cmd = d.sender.command(False, None)
    child_config = Path(cmd[cmd.index("-c") + 1])
    assert child_config != d.config.source.resolve()
    assert child_config.read_text() == running
    assert config_load(child_config).product_code == PRODUCT


def test_a_restart_whose_config_no_longer_loads_seals_as_a_stop(tmp_path: Path) -> None:
    clock = FakeClock(H + 600)
    d = daemon_for(tmp_path, clock, FakePsutil())
    run_round(d)
    d.restarting = lambda: True
    d.config.source.write_text("dimensions: [")  # the restarted agent would not start
    d.shutdown()
    d2 = daemon_for_existing(tmp_path, clock)
    assert _vcpus(d2) == {H: "4"}  # sealed at once, not left open for an agent that won't run


def test_a_restart_seals_the_dimensions_the_new_config_changes(tmp_path: Path) -> None:
    clock = FakeClock(H + 600)
    d = daemon_for(tmp_path, clock, FakePsutil())
    run_round(d)
    d.restarting = lambda: True
    source = d.config.source
    source.write_text(source.read_text()[: source.read_text().index("  - name: vcpu_hours")])
    d.shutdown()
    d2 = daemon_for_existing(tmp_path, clock)
    sealed = _sealed(d2)
    assert ("vcpu_hours", H) in sealed  # dropped by the new config: sealed as sampled
    assert ("vcpus", H) not in sealed  # unchanged: left open for the restarted agent


def daemon_for_existing(tmp_path: Path, clock: FakeClock) -> Daemon:
    """A second daemon on the same state dir, whatever the config file says now."""
    (tmp_path / "again").mkdir(exist_ok=True)
    cfg = make_config(tmp_path / "again")
    cfg = dataclasses.replace(cfg, state_dir=tmp_path / "state")
    return open_daemon(cfg, clock, FakeImds("i-1"), sampler=Sampler(cfg))


def test_start_builds_the_whole_daemon_on_a_verified_ledger_under_its_lock(
    tmp_path: Path, emulator
) -> None:
    """What `run` runs on is there before it runs: the lock held, the running config copied for
    the sender, the ledger named by IMDS's instance id, the start-up DryRun due."""
    from agent.commands.run import start

    cfg = make_config(tmp_path, f"metering: {{endpoint_url: '{emulator.url}'}}\n")
    clock = FakeClock(H + 600)
    d = start(cfg, clock)
    assert d.identity.verified.is_set()
    assert d.ledger.get_meta("instance_id") == emulator.settings.instance_id
    assert d.ledger.send_state().dryrun_due == H + 600
    running = Path(cfg.state_dir) / RUNNING_CONFIG
    assert running.read_text() == cfg.source.read_text()
    cmd = d.sender.command(False, None)
    assert cmd[cmd.index("-c") + 1] == str(running.resolve())
    assert not d.scheduler.running  # jobs are made, started by run()
    with pytest.raises(LockHeld):
        start(cfg, clock)


def test_a_status_probe_of_the_lock_does_not_make_a_starting_run_fail(tmp_path: Path) -> None:
    """`status` takes a shared flock for a moment; a `run` starting then waits it out."""
    import fcntl
    import threading

    (tmp_path / "lock").write_text("")
    probe = open(tmp_path / "lock")  # noqa: SIM115 - closed by the thread
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.1, probe.close)
    release.start()
    held = StateLock(tmp_path)
    held.acquire()  # raised LockHeld before the retry
    release.join()
    with pytest.raises(LockHeld):
        StateLock(tmp_path).acquire()  # a real holder is still refused


def test_a_saas_ledger_is_never_moved_aside_for_another_instance(tmp_path: Path, emulator) -> None:
    """SaaS mode on EC2: the ledger holds the seller's customers, pending records and held usage.
    An instance replaced with its state volume re-attached (IMDS names another instance) keeps
    it: nothing is moved aside, the records are still pending and sent from here."""
    from agent.commands.run import start
    from tests.saas import license_arn, saas_config, seal

    cfg = saas_config(tmp_path, emulator.url)
    ledger = Ledger(cfg.state_dir)
    ledger.update_meta(instance_id="i-0ld0ld0ld0ld0ld0", instance_id_source="imds")
    ledger.add_customer(
        Customer("acme", "123456789012", license_arn("acme"), None, None, None, 0.0)
    )
    seal(ledger, "acme", "requests", H, 7)
    ledger.close()
    d = start(cfg, FakeClock(H + 4000))
    try:
        assert d.identity.verified.is_set()
        assert [c.label for c in d.ledger.customers()] == ["acme"]
        assert [(h.customer, h.quantity.text) for h in d.ledger.pending()] == [("acme", "7")]
        assert d.ledger.get_meta("previous_instance_id") == "i-0ld0ld0ld0ld0ld0"
        assert sorted(p.name for p in Path(cfg.state_dir).glob("ledger.db.*")) == []
    finally:
        d.ledger.close()
