"""`status` (issue 13): the daemon's lock, the open hour so far, the next send, collector errors that
clear, one pending count, and `status --check`. Oracles: what sealing then stores for the hour, the
lock a real StateLock holds, the exit code."""

from __future__ import annotations

import os
from decimal import Decimal as D
from pathlib import Path

from agent import __version__
from agent.clock import HOUR, iso
from agent.commands import status
from agent.commands import status as sending
from agent.host.locks import StateLock
from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from agent.sending import health
from agent.windows import send_offset, span_for
from tests.billing import H, make_config
from tests.conftest import run_cli
from tests.fakes import FakeClock

DIMS = """
  - name: api
    collector: {type: system, metric: users, counter: true}
    scale: 0.001
    rounding: up
  - name: vcpu_hours
    collector: {type: system, metric: cpu_count}
    aggregate: integral
    decimals: 3
  - name: peak
    collector: {type: system, metric: users}
    aggregate: max
    decimals: 2
"""


def test_the_current_hour_so_far_is_what_sealing_then_bills(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, dims=DIMS)
    ledger = Ledger(cfg.state_dir)
    open_hour = H + HOUR
    ledger.record_sample("api", H + 3000, D(1200), span_for(H + 3000, 60), None, carry=True)
    seal_hours(ledger, cfg, open_hour, offset=0)  # hour H sealed: a late `api` read carries
    ledger.record_sample("api", H + 3590, D(7), span_for(H + 3590, 60), None, carry=True)
    for i, (users, cpus) in enumerate([("1499", "4"), ("3", "2.5"), ("0", "4")]):
        t = open_hour + 60 * i
        ledger.record_sample("api", t, D(users), span_for(t, 60), None, carry=True, increment=True)
        ledger.record_sample("vcpu_hours", t, D(cpus), span_for(t, 60), None, carry=True)
        ledger.record_sample("peak", t, D(users) / 7, span_for(t, 60), None, carry=False)
    report = status.collect(ledger, cfg, FakeClock(open_hour + 1800))
    so_far = {d["name"]: d["current_hour_so_far"] for d in report["dimensions"]}
    assert report["current_hour"] == "2027-01-15T09:00Z"
    seal_hours(ledger, cfg, open_hour + HOUR, offset=0)
    sealed = {h.dimension: h.quantity.text for h in ledger.hours() if h.hour == open_hour}
    assert so_far == sealed
    assert so_far["api"] == "2"  # 1,509 requests per 1,000, rounded up
    assert next(h.raw for h in ledger.hours() if (h.dimension, h.hour) == ("api", open_hour)) == (
        "1509"  # the 7 read late for the sealed hour H carried into the open one
    )
    after = status.collect(ledger, cfg, FakeClock(open_hour + HOUR + 10))
    assert {d["current_hour_so_far"] for d in after["dimensions"]} == {None}  # no sample yet


def test_a_collector_error_clears_when_the_collector_reads_again(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    ledger.record_sample("vcpus", H, D(4), 60.0, None, carry=False)
    ledger.record_collector_error("vcpus", H + 60, "source missing: no file")
    ledger.record_collector_error("vcpus", H + 120, "source missing: no file")
    row = status.collect(ledger, cfg, FakeClock(H + 150))["dimensions"][0]
    assert (row["collector_errors"], row["last_error"]) == (2, "source missing: no file")
    assert row["last_error_at"] == iso(H + 120)
    # a warning noted at the very instant of a stored reading stays until a later good reading
    ledger.record_collector_error("vcpus", H + 180, "read took longer than its timeout")
    ledger.record_sample("vcpus", H + 180, D(4), 60.0, None, carry=False)
    assert ledger.dimension_status()[0].last_error == "read took longer than its timeout"
    ledger.record_sample("vcpus", H + 240, D(4), 60.0, None, carry=False)
    row = status.collect(ledger, cfg, FakeClock(H + 250))["dimensions"][0]
    assert (row["collector_errors"], row["last_error"], row["last_error_at"]) == (3, None, None)
    assert "errors" not in status.render(status.collect(ledger, cfg, FakeClock(H + 250)))


def test_next_send_is_the_open_hours_slot_while_nothing_is_pending(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra="metering: {send_window: 600}\n")
    ledger = Ledger(cfg.state_dir)
    ledger.update_meta(instance_id="i-0123456789abcdef0")
    offset = send_offset("i-0123456789abcdef0", 600)
    assert sending.next_send(ledger, cfg, H + 1234) == H + HOUR + offset
    report = status.collect(ledger, cfg, FakeClock(H + 1234))
    assert report["next_send"] is None  # no `run` active: nothing will go out
    run = StateLock(cfg.state_dir)
    run.acquire()  # as a running `run` holds it
    report = status.collect(ledger, cfg, FakeClock(H + 1234))
    assert report["next_send"] == iso(H + HOUR + offset)
    ledger.record_sample("vcpus", H + 10, D(4), 60.0, None, carry=False)
    seal_hours(ledger, cfg, H + HOUR + 5, offset=offset)
    due = sending.due(ledger.send_state(), ledger.pending())
    assert due == H + HOUR + offset
    assert sending.next_send(ledger, cfg, H + HOUR + 5) == due


def test_one_pending_count_of_distinct_hours(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    for dim in ("vcpus", "vcpu_hours"):
        for hour in (H, H + HOUR):
            ledger.record_sample(dim, hour + 10, D(4), 60.0, None, carry=True)
    seal_hours(ledger, cfg, H + 2 * HOUR, offset=0)
    assert len(ledger.pending()) == 4
    assert ledger.pending_hour_count() == 2
    assert health.snapshot(ledger, H + 2 * HOUR)["pending_hours"] == 2
    report = status.collect(ledger, cfg, FakeClock(H + 2 * HOUR))
    assert report["health"]["pending_hours"] == 2


def test_daemon_state_is_the_lock_and_what_its_holder_wrote(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert status.daemon_state(state) == {"running": False, "pid": None, "version": None}
    lock = StateLock(state)
    lock.acquire()
    assert status.daemon_state(state) == {
        "running": True,
        "pid": os.getpid(),
        "version": __version__,
    }
    assert status.daemon_state(state)["running"] is True  # the probe did not take the lock
    assert lock._file is not None
    lock._file.close()  # what the daemon's exit does
    assert status.daemon_state(state) == {"running": False, "pid": None, "version": None}
    again = StateLock(state)
    again.acquire()  # nothing left behind by the probes
    assert status.daemon_state(state)["running"] is True


def test_status_check_exits_by_health_and_prints_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    result = run_cli("status", "--check", "-c", str(cfg.source))
    assert (result.returncode, result.stdout) == (1, "")  # no ledger yet: nothing metered
    ledger = Ledger(cfg.state_dir)
    ledger.note_success(H)
    result = run_cli("status", "--check", "-c", str(cfg.source))
    assert (result.returncode, result.stdout) == (0, "")
    ledger.note_failure(H + 60, "ThrottlingException: slow down")
    ledger.close()
    result = run_cli("status", "--check", "-c", str(cfg.source))
    assert (result.returncode, result.stdout) == (1, "")


def test_status_check_is_0_or_1_only(tmp_path: Path) -> None:
    """A damaged ledger is not ok whatever health.json says (the agent cannot store what it
    reads: issue 23); a bad config is 1 with one line."""
    cfg = make_config(tmp_path)
    state = Path(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "ledger.db").write_bytes(b"not a database" * 100)
    for ok in (True, False):
        (state / "health.json").write_text(f'{{"ok": {str(ok).lower()}}}')
        result = run_cli("status", "--check", "-c", str(cfg.source))
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    (state / "health.json").unlink()
    result = run_cli("status", "--check", "-c", str(cfg.source))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    bad = tmp_path / "bad.yaml"
    bad.write_text("product_code: x\ndimensions: []\n")
    result = run_cli("status", "--check", "-c", str(bad))
    assert (result.returncode, result.stdout) == (1, "")
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_shows_an_open_hour_sealing_cannot_bill_without_a_traceback(tmp_path: Path) -> None:
    """A stored value no reading passes today (9E+999999, an older agent's): left out of the
    open hour's figure at once, as sealing drops it (summed exactly it would take minutes)."""
    dims = """
      - name: api
        collector: {type: system, metric: users}
        aggregate: sum
        scale: 10
    """
    cfg = make_config(tmp_path, dims=dims)
    ledger = Ledger(cfg.state_dir)
    for t in (H + 10, H + 70):
        ledger.record_sample("api", t, D("9E+999999"), 60.0, None, carry=False)
    report = status.collect(ledger, cfg, FakeClock(H + 100))
    assert [d["current_hour_so_far"] for d in report["dimensions"]] == [None]
    assert "so far -" in status.render(report)
