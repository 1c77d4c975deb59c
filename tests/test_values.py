"""Issue 10, items 1-5: odd values, per-dimension sealing, clock steps, read deadlines, unique
instants. Unit level, on an injected clock; the real daemon is driven in test_e2e_values.py."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import threading
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from agent import config
from agent.aggregate import Point, combine_exact, reading_problem, to_quantity
from agent.billing import hour as sealing
from agent.clock import Clock
from agent.collecting.reads import Reads
from agent.collecting.sampling import Sampler, take_within
from agent.collectors import Collector, Reading, Registry, Sources
from agent.collectors.linecount import LineMatcher
from agent.commands.status import collect
from agent.daemon.daemon import Daemon
from agent.daemon.triggers import ClockTrigger
from agent.ledger import Ledger
from agent.ledger.samples import INSTANT_TAKEN
from agent.modes.instance import seal_hours
from agent.sending import health
from agent.windows import span_for
from tests.billing import H, make_config
from tests.fakes import FakeClock, FakePsutil
from tests.test_daemon import FakeImds, open_daemon

D = Decimal


# -- 1. values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["nan", "NaN", "inf", "-Infinity", "snan", "1e61", "1e300", "9" * 61, "1e30"]
)
def test_a_value_that_is_no_finite_decimal_is_refused(text: str) -> None:
    assert reading_problem(D(text)) is not None


@pytest.mark.parametrize("text", ["0", "4", "-3", "0.000001", "123456789012.5", "9" * 29])
def test_ordinary_values_pass(text: str) -> None:
    assert reading_problem(D(text)) is None


@pytest.mark.parametrize("value", ["1e61", "1e300", "-1e61", "9" * 70])
def test_quantities_far_outside_the_api_range_are_clamped_not_raised(value: str) -> None:
    q = to_quantity(D(value), D(1), "nearest", None)
    assert q.value in (0, 2_147_483_647) and q.clamped_from is not None
    q = to_quantity(D(value), D(1), "up", 6)
    assert q.value in ("0.000000", "9999999999.999999")


def test_a_log_line_with_nan_adds_nothing_and_is_counted() -> None:
    matcher = LineMatcher(r"rows=(?P<value>\S+)", "sum", "utf-8")
    buf = b"rows=5\nrows=nan\nrows=inf\nrows=1e61\nrows=" + b"7" * 61 + b"\nrows=2.5\n"
    assert matcher.scan(buf) == D("7.5")
    assert matcher.bad_values == 4


class Fixed(Collector):
    """A plugin answering whatever the test sets, NaN included."""

    type_name = "fixed"
    options: ClassVar[dict[str, Any]] = {}
    value: Any = D(1)

    def read(self, state: dict[str, Any] | None) -> Reading:
        return Reading(type(self).value)


def config_with(tmp_path: Path, registry: Registry, dims: str) -> Any:
    """make_config's file, loaded with a registry that knows the test's own collectors."""
    make_config(tmp_path, dims="- name: x\n  collector: {type: system, metric: users}\n")
    path = tmp_path / "config.yaml"
    text = path.read_text().split("dimensions:")[0]
    path.write_text(text + "dimensions:\n" + textwrap.indent(textwrap.dedent(dims).strip(), "  "))
    return config.load(path, registry)


def fixed_sampler(tmp_path: Path, aggregate: str = "max") -> tuple[Sampler, Any]:
    registry = Registry()
    registry.register("fixed", Fixed)
    cfg = config_with(
        tmp_path, registry, f"- name: odd\n  collector: {{type: fixed}}\n  aggregate: {aggregate}\n"
    )
    return Sampler(cfg, registry, Sources()), cfg


@pytest.mark.parametrize("value", [D("NaN"), D("Infinity"), D("1e300"), float("nan"), "12"])
def test_a_collector_value_that_is_not_a_finite_decimal_is_a_collector_error(
    tmp_path: Path, value: Any
) -> None:
    sampler, cfg = fixed_sampler(tmp_path)
    Fixed.value = value
    sample = sampler.take(cfg.dimensions[0], H, None)
    assert sample.error is not None and sample.value is None
    Fixed.value = 3.5  # a float that is a number still works
    assert sampler.take(cfg.dimensions[0], H, None).value == D("3.5")


@pytest.mark.parametrize("value", [D("NaN"), D("sNaN"), D("Infinity")])
def test_a_counter_that_reads_no_finite_decimal_is_a_collector_error_and_keeps_its_baseline(
    tmp_path: Path, value: Any
) -> None:
    registry = Registry()
    registry.register("fixed", Fixed)
    cfg = config_with(
        tmp_path, registry, "- name: odd\n  collector: {type: fixed, counter: true}\n"
    )
    sampler = Sampler(cfg, registry, Sources())
    dim = cfg.dimensions[0]
    Fixed.value = D(10)
    first = sampler.take(dim, H, None)
    Fixed.value = value
    odd = sampler.take(dim, H + 60, first.state)
    assert odd.error is not None and "finite" in odd.error and odd.state is None
    Fixed.value = D(15)
    assert sampler.take(dim, H + 120, first.state).value == D(5)  # the baseline still holds


def sealing_config(tmp_path: Path) -> Any:
    return make_config(
        tmp_path,
        dims="""
      - name: rows
        collector: {type: system, metric: users}
      - name: vcpus
        collector: {type: system, metric: cpu_count}
    """,
    )


def store_raw(ledger: Ledger, dim: str, t: float, value: str) -> None:
    """A sample as an older agent could store it (before values were checked)."""
    with ledger.transaction() as db:
        db.execute(
            "INSERT INTO samples (dimension, hour, t, value, span) VALUES (?, ?, ?, ?, 60)",
            (dim, int(t // 3600) * 3600, t, value),
        )


def test_one_dimension_that_cannot_seal_never_holds_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sealing.combine_exact

    def combine(aggregate: str, points: list) -> Any:
        if any(p.value == 13 for p in points):
            raise ArithmeticError("injected")
        return real(aggregate, points)

    monkeypatch.setattr(sealing, "combine_exact", combine)
    cfg = sealing_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    store_raw(ledger, "rows", H + 60, "5")
    store_raw(ledger, "rows", H + 120, "13")  # this hour's arithmetic fails
    store_raw(ledger, "vcpus", H + 60, "4")
    store_raw(ledger, "vcpus", H + 3600 + 60, "4")
    store_raw(ledger, "rows", H + 3600 + 60, "6")
    sealed = seal_hours(ledger, cfg, H + 7200 + 30, offset=0)
    assert {(s.dimension, s.hour) for s in sealed} == {
        ("vcpus", H),
        ("vcpus", H + 3600),
        ("rows", H + 3600),  # the next hour of the same dimension is not held either
    }
    ((dim, hour, error),) = ledger.seal_errors()
    assert (dim, hour) == ("rows", H) and "injected" in error
    snap = health.snapshot(ledger)
    assert snap["ok"] is False
    assert "hour 2027-01-15T08:00Z dimension rows: cannot seal" in snap["reason"]
    report = collect(ledger, cfg, FakeClock(H + 7200))
    rows = next(d for d in report["dimensions"] if d["name"] == "rows")
    assert rows["seal_error"]["hour"] == "2027-01-15T08:00Z"
    # the samples are kept; once the hour can be sealed, the error is gone and health is ok
    with ledger.transaction() as db:
        db.execute("DELETE FROM samples WHERE value = '13'")
    sealed = seal_hours(ledger, cfg, H + 7200 + 90, offset=0)
    assert [(s.dimension, s.hour, s.quantity) for s in sealed] == [("rows", H, "5")]
    assert ledger.seal_errors() == []
    assert health.snapshot(ledger)["ok"] is True


def test_a_stored_sample_that_is_no_finite_number_is_dropped_and_the_rest_billed(
    tmp_path: Path,
) -> None:
    """An older agent stored `rows=nan` samples (and then sealed nothing): after the upgrade
    the hour's finite samples are billed, the bad ones dropped, and a restart finds nothing left.
    So is a value no reading passes today (9E+999999: exact arithmetic on it takes minutes)."""
    cfg = sealing_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    store_raw(ledger, "rows", H + 60, "5")
    store_raw(ledger, "rows", H + 90, "9E+999999")
    store_raw(ledger, "rows", H + 120, "NaN")
    store_raw(ledger, "rows", H + 180, "2.5")
    store_raw(ledger, "rows", H + 3600 + 60, "Infinity")  # the only sample of its hour
    store_raw(ledger, "vcpus", H + 60, "4")
    sealed = seal_hours(ledger, cfg, H + 7200 + 30, offset=0)
    assert sorted((s.dimension, s.hour, s.quantity) for s in sealed) == [
        ("rows", H, "5"),  # the max of the finite samples
        ("vcpus", H, "4"),
    ]
    assert ledger.seal_errors() == []
    assert ledger.unsealed_sample_count() == 0
    ledger.close()
    ledger = Ledger(cfg.state_dir)  # the restart's start-up seal
    assert seal_hours(ledger, cfg, H + 7200 + 90, offset=0) == []
    assert health.snapshot(ledger)["ok"] is True


# -- 4. unique instants, spans ---------------------------------------------------------------


def test_a_level_instant_is_stored_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.record_sample("v", H + 60, D(4), 60, None, carry=True) == H
    assert ledger.record_sample("v", H + 60, D(4), 60, None, carry=True) == INSTANT_TAKEN
    assert ledger.record_sample("v", H + 30, D(4), 60, None, carry=True) == INSTANT_TAKEN
    assert ledger.unsealed_sample_count() == 1
    with pytest.raises(sqlite3.IntegrityError), ledger.transaction() as db:
        db.execute("INSERT INTO samples (dimension, hour, t, value, span) VALUES ('v', ?, ?, 1, 1)",
                   (H, H + 60))  # fmt: skip


def test_a_max_keeps_a_relived_instant_but_never_a_stored_one(tmp_path: Path) -> None:
    """After a step back, a `max` loses nothing by sampling again (an hour that has only the
    re-lived minutes still gets its samples); an instant it already has is not stored twice."""
    ledger = Ledger(tmp_path)
    assert ledger.record_sample("v", H + 600, D(4), 60, None, carry=False) == H
    assert ledger.record_sample("v", H + 60, D(4), 60, None, carry=False) == H
    assert ledger.record_sample("v", H + 600, D(4), 60, None, carry=False) == INSTANT_TAKEN
    assert ledger.unsealed_sample_count() == 2


def test_an_increment_at_a_stored_instant_is_added_not_lost(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.record_sample("lines", H + 60, D(3), 60, {"p": 3}, carry=True, increment=True)
    hour = ledger.record_sample("lines", H + 60, D(2), 60, {"p": 5}, carry=True, increment=True)
    assert hour == H
    with ledger.transaction() as db:
        assert [p.value for p in ledger.points(db, "lines", H)] == [D(5)]
    assert ledger.position("lines") == {"p": 5}


def test_kill9_between_two_samples_never_counts_the_overlap_twice(tmp_path: Path) -> None:
    """A sample at H+60 stands for a minute; the agent dies at H+80 and its start-up round
    samples at H+90. Before: 60 + 30 s of 4 vCPUs in 30 s of overlap = 90 s. Now 90 s - 30 s."""
    ledger = Ledger(tmp_path)
    ledger.record_sample("vh", H + 60, D(4), span_for(H + 60, 60), None, carry=True)
    ledger.record_sample("vh", H + 90, D(4), span_for(H + 90, 60), None, carry=True)
    ledger.record_sample("vh", H + 120, D(4), span_for(H + 120, 60), None, carry=True)
    with ledger.transaction() as db:
        points = ledger.points(db, "vh", H)
    assert [p.span for p in points] == [30.0, 30.0, 60.0]
    assert combine_exact("integral", points) == Fraction(4 * 120, 3600)  # 4 vCPUs, H+60 to H+180


def test_migration_keeps_duplicate_instants_of_an_old_ledger(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "ledger.db")
    from agent.ledger.migrations import _MIGRATIONS, _split_sql

    for statement in _split_sql(_MIGRATIONS[1]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    for value in ("3", "4", "5"):
        db.execute(
            "INSERT INTO samples (dimension, hour, t, value, span) VALUES ('x', ?, ?, ?, 60)",
            (H, H + 60, value),
        )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    with ledger.transaction() as db2:
        points = ledger.points(db2, "x", H)
    assert sorted(p.value for p in points) == [D(3), D(4), D(5)]  # none lost
    assert len({p.t for p in points}) == 3


# -- 2. clock steps --------------------------------------------------------------------------


class SteppedClock(FakeClock):
    def __init__(self, t: float) -> None:
        super().__init__(t)
        self.mono = 1000.0

    def monotonic(self) -> float:
        return self.mono

    def to_wall(self, t: float) -> float:
        return t

    def from_wall(self, wall: float) -> float:
        return wall


def test_the_clock_reports_steps_not_slewing() -> None:
    clock = SteppedClock(H)
    assert clock.stepped() == 0.0  # the first look sets the baseline
    clock.t += 1.0
    clock.mono += 1.0
    assert clock.stepped() == 0.0
    clock.t += 1.0005  # NTP slewing: half a millisecond per second
    clock.mono += 1.0
    assert clock.stepped() == 0.0
    clock.t -= 600 - 1  # a step back of ten minutes, a second later
    clock.mono += 1.0
    assert clock.stepped() == pytest.approx(-600, abs=0.01)
    clock.t += 3 * 3600
    assert clock.stepped() == pytest.approx(3 * 3600, abs=0.01)


def test_after_a_backward_step_every_job_fires_on_the_new_wall_time(tmp_path: Path) -> None:
    """What APScheduler holds after a step back of ten minutes: next runs ten minutes away.
    check_clock gives each ClockTrigger job its next fire time from the wall clock again."""
    clock = SteppedClock(H)
    d = open_daemon(make_config(tmp_path), clock, FakeImds("i-1"))
    scheduler = BackgroundScheduler()
    scheduler.start(paused=True)
    try:
        from datetime import datetime, timedelta, timezone

        now = datetime.now(timezone.utc)
        late = now + timedelta(minutes=10)
        scheduler.add_job(print, ClockTrigger(Clock(), 5), id="sample", next_run_time=late)
        scheduler.add_job(print, ClockTrigger(Clock(), 2), id="watchdog", next_run_time=late)
        d.scheduler = scheduler
        clock.stepped()
        clock.t -= 600
        d.check_clock()
        for job in scheduler.get_jobs():
            assert job.next_run_time - now <= timedelta(seconds=6), job.id
    finally:
        scheduler.shutdown(wait=False)


# -- 3, 5. deadlines and independent reads ---------------------------------------------------


class Hung(Collector):
    """A source that answers only when released (an HTTP server that never does)."""

    type_name = "hung"
    options: ClassVar[dict[str, Any]] = {}
    release = threading.Event()

    def read(self, state: dict[str, Any] | None) -> Reading:
        type(self).release.wait(30)
        return Reading(D(1))


def hung_daemon(tmp_path: Path, clock: FakeClock) -> Daemon:
    registry = Registry()
    registry.register("hung", Hung)
    cfg = config_with(
        tmp_path,
        registry,
        """
      - name: hung
        collector: {type: hung, timeout: 1s}
        interval: 1s
      - name: vcpu_hours
        collector: {type: system, metric: cpu_count}
        aggregate: integral
        decimals: 6
        interval: 1s
    """,
    )
    ps = FakePsutil()
    sampler = Sampler(cfg, registry, Sources(psutil=ps))
    return open_daemon(
        cfg, clock, FakeImds("i-1"), sampler=sampler, sender_command=lambda *_: ["true"]
    )


def test_a_hung_source_skips_only_its_own_instants(tmp_path: Path) -> None:
    Hung.release = threading.Event()
    clock = FakeClock(H + 10)
    d = hung_daemon(tmp_path, clock)
    started = time.monotonic()
    for _ in range(4):
        d.sample_round(1)
        time.sleep(0.3)  # the integral's reads take microseconds; the hung one never returns
        clock.advance(1)
    assert time.monotonic() - started < 3  # rounds never waited for the hung read
    with d.ledger.transaction() as db:
        points = d.ledger.points(db, "vcpu_hours", H)
    assert [p.t for p in points] == [H + 10, H + 11, H + 12, H + 13]  # every instant kept
    status = {s.dimension: s for s in d.ledger.dimension_status()}
    assert status["hung"].errors == 3 and "still running" in (status["hung"].last_error or "")
    assert d.ledger.unsealed_sample_count() == 4  # nothing from the hung source
    Hung.release.set()
    assert d.reads.wait(5)
    with d.ledger.transaction() as db:  # its late answer is stored at its own instant
        assert [p.t for p in d.ledger.points(db, "hung", H)] == [H + 10]
    status = {s.dimension: s for s in d.ledger.dimension_status()}
    assert "longer than its 1 s timeout" in (status["hung"].last_error or "")


def test_a_stop_never_waits_for_a_hung_read(tmp_path: Path) -> None:
    Hung.release = threading.Event()
    clock = FakeClock(H + 10)
    d = hung_daemon(tmp_path, clock)
    d.sample_round(1)
    time.sleep(0.2)
    started = time.monotonic()
    d.shutdown()
    assert time.monotonic() - started < 3
    Hung.release.set()
    time.sleep(0.2)  # the abandoned read ends after the stop: it writes nothing, raises nothing
    ledger = Ledger(tmp_path / "state")
    assert {h.dimension for h in ledger.hours()} == {"vcpu_hours"}


def test_reads_hold_sealing_only_within_their_deadline() -> None:
    now = [100.0]
    reads = Reads(lambda: now[0])
    gate = threading.Event()
    assert reads.start("a", H - 1, 2.0, lambda in_time: gate.wait(5)) is None
    assert reads.holds("a", H - 3600)
    assert not reads.holds("b", H - 3600)
    assert reads.start("a", H, 2.0, lambda in_time: None) is not None  # still running
    now[0] += 3
    assert not reads.holds("a", H - 3600)  # past its deadline: sealing goes on
    gate.set()
    assert reads.wait(5)


def test_health_file_names_the_hour_and_dimension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def combine(aggregate: str, points: list) -> D:
        raise ArithmeticError("injected")

    monkeypatch.setattr(sealing, "combine_exact", combine)
    cfg = sealing_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    store_raw(ledger, "rows", H + 60, "5")
    seal_hours(ledger, cfg, H + 3700, offset=0)
    health.write(cfg.state_dir, ledger)
    data = json.loads((cfg.state_dir / "health.json").read_text())
    assert data["ok"] is False
    assert data["reason"].startswith("hour 2027-01-15T08:00Z dimension rows: cannot seal")


def test_integral_points_sum_to_the_time_covered() -> None:
    points = [Point(H + i * 60, D(2), 60.0) for i in range(30)]
    assert combine_exact("integral", points) == 1  # 2 vCPUs for half an hour


def test_check_and_sample_end_at_the_deadline(tmp_path: Path) -> None:
    Hung.release = threading.Event()
    d = hung_daemon(tmp_path, FakeClock(H))
    started = time.monotonic()
    sample = take_within(d.sampler, d.config.dimensions[0], H, None, time.monotonic)
    assert sample.error is not None and "within its 1 s timeout" in sample.error
    assert time.monotonic() - started < 2
    Hung.release.set()
