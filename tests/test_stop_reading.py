"""Every stop first takes one last reading of every dimension (the daemon on a fake clock, no
scheduler, the sender a `true`): a shutdown, a restart, a reload that seals a changed dimension;
a hung source costs the stop its timeout at most. Oracles: lines written, users added, the ledger's
sealed hours and samples."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.collecting.reads import Reads
from agent.collecting.sampling import Sampler
from agent.collectors import Reading, Registry, Sources
from agent.daemon.daemon import Daemon
from tests.billing import H, make_config
from tests.fakes import FakeClock, FakePsutil
from tests.test_daemon import FakeImds, open_daemon, run_round

LINE = '"GET /api/v1 HTTP/1.1" 200\n'
DIMS = """
  - name: requests
    collector: {{type: log, path: {log}, pattern: '"GET /api/', start_at: beginning}}
  - name: users
    collector: {{type: system, metric: users, counter: true{timeout}}}
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
  - name: vcpu_seconds
    collector: {{type: system, metric: cpu_count}}
    aggregate: integral
    scale: 3600
"""


def daemon(tmp_path: Path, clock: FakeClock, ps: FakePsutil, dims: str | None = None) -> Daemon:
    log = tmp_path / "access.log"
    log.touch()
    cfg = make_config(tmp_path, dims=dims or DIMS.format(log=log, timeout=""))
    sampler = Sampler(cfg, Registry(), Sources(psutil=ps, proc=tmp_path / "proc"))
    return open_daemon(
        cfg, clock, FakeImds("i-1"), sampler=sampler, sender_command=lambda *_: ["true"]
    )


def write(log: Path, lines: int) -> None:
    with open(log, "a") as f:
        f.write(LINE * lines)


def sealed(d: Daemon) -> dict[tuple[str, int], str]:
    return {(h.dimension, h.hour): h.quantity.text for h in d.ledger.hours()}


def test_a_stop_bills_what_came_after_the_last_round(tmp_path: Path) -> None:
    """700 lines, 2 users and 4 more vCPUs after the H+10m round; a shutdown 30 s later seals
    them all: the log's and the counter's increments, the gauge's new level; the integral ends at
    the stop (4 vCPUs for 30 s = 120 vCPU-seconds, the new level standing for no time)."""
    clock, ps = FakeClock(H + 600), FakePsutil()
    d = daemon(tmp_path, clock, ps)
    write(tmp_path / "access.log", 300)
    run_round(d)
    write(tmp_path / "access.log", 700)
    ps.user_list = [*ps.user_list, object(), object()]
    ps.cpus = 8
    clock.advance(30)
    d.restarting = lambda: False
    d.shutdown()
    d2 = daemon(tmp_path, clock, ps)
    assert sealed(d2) == {
        ("requests", H): "1000",
        ("users", H): "2",
        ("vcpus", H): "8",
        ("vcpu_seconds", H): "120",
    }


def test_a_restart_stores_the_last_reading_for_the_restarted_agent(tmp_path: Path) -> None:
    """A restart 10 s before the hour ends leaves the hour open, and what the stop read (lines,
    a user) is in that hour when the restarted agent seals it after the boundary, not in the
    next: each unit lands in the hour it was read, once."""
    clock, ps = FakeClock(H + 3540), FakePsutil()
    d = daemon(tmp_path, clock, ps)
    write(tmp_path / "access.log", 300)
    run_round(d)
    write(tmp_path / "access.log", 700)
    ps.user_list = [*ps.user_list, object()]
    clock.advance(50)
    d.restarting = lambda: True
    d.shutdown()
    d2 = daemon(tmp_path, clock, ps)
    assert sealed(d2) == {}  # still open
    clock.advance(15)  # the restarted agent's first round is in the next hour
    write(tmp_path / "access.log", 5)
    run_round(d2)
    hours = sealed(d2)
    assert (hours[("requests", H)], hours[("users", H)]) == ("1000", "1")
    clock.t = H + 7200
    run_round(d2)
    hours = sealed(d2)
    assert (hours[("requests", H + 3600)], hours[("users", H + 3600)]) == ("5", "0")


def test_a_reload_reads_a_changed_dimension_before_sealing_it(tmp_path: Path) -> None:
    """A reload that bills `requests` differently seals its hour with the lines written since the
    last round (read by the old collector); the new one goes on from there."""
    clock, ps = FakeClock(H + 600), FakePsutil()
    d = daemon(tmp_path, clock, ps)
    log = tmp_path / "access.log"
    write(log, 300)
    run_round(d)
    write(log, 700)
    clock.advance(30)
    source = d.config.source
    source.write_text(
        source.read_text().replace("start_at: beginning}\n", "start_at: beginning}\n    scale: 2\n")
    )
    d.reload()
    assert d.config.dimensions[0].scale == 2
    assert sealed(d) == {("requests", H): "1000"}  # the others bill alike: still open
    write(log, 40)
    clock.advance(30)
    run_round(d)  # the new collector goes on from the last reading's position
    (carried,) = d.ledger.db.execute(
        "SELECT SUM(value) FROM samples WHERE dimension = 'requests' AND hour = ?", (H + 3600,)
    ).fetchone()
    assert carried == 40  # into the next hour (a sum carries past a sealed hour), read once


class Hung:
    """A collector whose source never answers (until the test ends)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.reads = 0

    def read_within(self, state: Any, in_time: Any) -> Reading:
        self.reads += 1
        self.release.wait()
        return Reading(Decimal(1))

    def close(self) -> None:
        pass


def test_a_hung_source_costs_the_stop_its_timeout_and_the_others_are_billed(
    tmp_path: Path,
) -> None:
    """`users` hangs in the round before the stop: the stop waits for that read's deadline
    (1 s), gives the last read its 1 s, then leaves it behind (counted as a collector error);
    the log's last reading is billed all the same."""
    clock, ps = FakeClock(H + 600), FakePsutil()
    log = tmp_path / "access.log"
    log.touch()
    d = daemon(tmp_path, clock, ps, DIMS.format(log=log, timeout=", timeout: 1"))
    release = threading.Event()
    hung = Hung(release)
    d.sampler.collectors["users"] = hung  # type: ignore[assignment]
    try:
        write(log, 300)
        d.sample_round(60)  # `users` hangs from here on
        assert not d.reads.wait(0.3)
        write(log, 700)
        clock.advance(30)
        d.restarting = lambda: False
        begun = time.monotonic()
        d.shutdown()
        took = time.monotonic() - begun
    finally:
        release.set()
    assert took < 1 + 1 + 0.5 + 1, took  # the round's read, the last one, storing, a margin
    d2 = daemon(tmp_path, clock, ps)
    assert sealed(d2)[("requests", H)] == "1000"
    assert ("users", H) not in sealed(d2)  # it never answered: no sample, nothing sealed
    status = {s.dimension: s for s in d2.ledger.dimension_status()}
    assert "no last reading at the stop" in (status["users"].last_error or "")
    assert hung.reads == 1  # the last read, queued behind the hung one, never started


def test_a_last_read_runs_after_the_one_in_flight_and_never_past_its_end() -> None:
    """Reads.last queues behind the read in flight on the same worker (never two threads on one
    collector), its deadline counts from the one in flight's, and `idle` names what is left."""
    now = [100.0]
    reads = Reads(lambda: now[0])
    gate = threading.Event()
    order: list[str] = []
    reads.start("a", 1.0, 5.0, lambda in_time: (gate.wait(), order.append("round")))
    end = reads.last("a", 2.0, 3.0, 200.0, lambda in_time: order.append(f"last {in_time()}"))
    assert end == 100.0 + 5.0 + 3.0  # the round's deadline, then its own timeout
    assert reads.idle({"a": 0.0}) == ["a"]  # still running: left behind
    gate.set()
    assert reads.idle({"a": 1e3}) == []
    assert order == ["round", "last True"]
    late = reads.last("b", 3.0, 3.0, 99.0, lambda in_time: order.append("too late"))
    assert late == 99.0  # the stop's end bounds it
    assert reads.idle({"b": 1e3}) == []
    assert order == ["round", "last True"]  # it could only start after its end: not run


def test_a_stop_just_before_the_boundary_seals_the_hour_its_last_reading_stands_in(
    tmp_path: Path,
) -> None:
    """A round fired at 10:59:59.6 is snapped to 11:00:00, so the stop's last reading stands just
    after it, in the 11:00 hour, while the wall clock is still in 10:00: a shutdown seals that
    hour too (an instance being terminated has no later start to seal it)."""
    clock, ps = FakeClock(H + 3600 - 1200), FakePsutil()
    d = daemon(tmp_path, clock, ps)
    write(tmp_path / "access.log", 300)
    run_round(d)  # 10:40: the hour H's reading
    clock.advance(1200 - 0.4)  # 10:59:59.6
    write(tmp_path / "access.log", 200)
    run_round(d)  # snapped to 11:00:00
    write(tmp_path / "access.log", 50)
    d.restarting = lambda: False
    d.shutdown()
    d2 = daemon(tmp_path, clock, ps)
    assert d2.ledger.unsealed_sample_count() == 0
    got = sealed(d2)
    assert got[("requests", H)] == "300"
    assert got[("requests", H + 3600)] == "250"  # the round at 11:00 and the stop's last reading
