"""SaaS sealing in steps (billing/saas_sealing.py, ledger Samples.begin_seal): a pass stopped after
any step is taken up by the next one, every customer sealed once, none left out; a sample that
arrives between steps is billed in the next hour, not lost; the daemon's round lock lets a
waiting write in between steps (daemon/turns.py).

The oracle for a stopped pass is the same hour sealed without a stop in a ledger with the same
samples and customers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from decimal import Decimal
from pathlib import Path

import pytest

from agent.billing import saas_sealing
from agent.daemon.turns import Turns
from agent.ledger import Ledger
from agent.modes.saas import seal_hours
from tests.billing import H
from tests.test_saas_sealing import LOG_DIMS, add, key, record, saas_config

D = Decimal
CUSTOMERS = [f"c{i:02d}" for i in range(11)]


class Crash(BaseException):
    """Stands for kill -9 between two steps: nothing of the pass runs after it."""


def filled(tmp_path: Path) -> tuple[object, Ledger]:
    """11 customers (8 with usage, 3 idle), a label no customer has, usage without a label."""
    tmp_path.mkdir()
    cfg = saas_config(tmp_path, LOG_DIMS)
    ledger = Ledger(cfg.state_dir)
    for label in CUSTOMERS:
        add(ledger, label)
    for m in range(6):
        parts = {key(c, "t1"): D(m + i) for i, c in enumerate(CUSTOMERS[:8]) if (m + i) % 3}
        parts[key("stranger", "t2")] = D(5)
        parts[key(None, None)] = D(1)
        record(ledger, H + 60 * (m + 1), parts)
    return cfg, ledger


def records(ledger: Ledger) -> dict[tuple[str, str, int], tuple[str, int, object]]:
    return {
        (h.customer, h.dimension, h.hour): (h.quantity.text, h.timestamp, h.allocations)
        for h in ledger.hours()
    }


def held(ledger: Ledger) -> dict[tuple[str, str, int], tuple[object, ...]]:
    return {(u.customer, u.dimension, u.hour): u.points for u in ledger.held_usage()}


class Steps:
    """A Turn (billing.sealing) that counts the steps given way to and runs `at(n)` at each."""

    def __init__(self, at: Callable[[int], None]) -> None:
        self.n = 0
        self.at = at

    def give_way(self) -> None:
        self.n += 1
        self.at(self.n)

    def released(self) -> AbstractContextManager[None]:
        return nullcontext()


def stop_after(k: int) -> Steps:
    def crash(n: int) -> None:
        if n > k:
            raise Crash

    return Steps(crash)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_a_pass_stopped_after_k_steps_is_finished_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    monkeypatch.setattr(saas_sealing, "STEP", 3)  # 13 labels: 5 steps and the last one
    cfg, whole = filled(tmp_path / "whole")
    seal_hours(whole, cfg, H + 3700, offset=0)
    expected, expected_held = records(whole), held(whole)
    assert len(expected) == len(CUSTOMERS) and set(expected_held) == {
        ("", "api", H),
        ("stranger", "api", H),
    }

    cfg, ledger = filled(tmp_path / "stopped")
    with pytest.raises(Crash):
        seal_hours(ledger, cfg, H + 3700, offset=0, turn=stop_after(k))
    ((dimension, hour, upto),) = ledger.seals_in_progress()
    assert (dimension, hour) == ("api", H) and (upto is None) == (k == 1)
    done_before = records(ledger)
    assert ledger.unsealed_sample_count() > 0  # stopped half-way: the samples are still there
    ledger.close()

    ledger = Ledger(cfg.state_dir)  # the next run
    seal_hours(ledger, cfg, H + 3800, offset=0)
    assert ledger.seals_in_progress() == []
    assert ledger.unsealed_sample_count() == 0
    got = records(ledger)
    assert {k2: v[0] for k2, v in got.items()} == {k2: v[0] for k2, v in expected.items()}
    assert got == expected  # quantities, Timestamps and allocations alike
    assert held(ledger) == expected_held
    for key_, value in done_before.items():  # what the stopped pass sealed stands unchanged
        assert got[key_] == value


def test_a_sample_between_steps_is_billed_in_the_next_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saas_sealing, "STEP", 3)
    cfg, whole = filled(tmp_path / "whole")
    seal_hours(whole, cfg, H + 3700, offset=0)
    cfg, ledger = filled(tmp_path / "late")

    def late(n: int) -> None:  # a late read of the sealed hour stores between two steps
        if n == 3:
            record(ledger, H + 3000, {key("c00", "t1"): D(7)})

    steps = Steps(late)
    seal_hours(ledger, cfg, H + 3700, offset=0, turn=steps)
    assert steps.n > 3  # it did arrive between steps
    assert records(ledger) == records(whole)  # the sealed hour as if it had not come
    seal_hours(ledger, cfg, H + 7300, offset=0)
    after = {c: q for (c, _, h), (q, _, _) in records(ledger).items() if h == H + 3600}
    # The 7 arrived after the hour's seal had begun: carried into the next hour, whole.
    # 7 x scale 0.1, rounded up; the others idle zeros (the carried sample opened that hour)
    assert after == {c: "1" if c == "c00" else "0" for c in CUSTOMERS}
    assert ledger.unsealed_sample_count() == 0 and ledger.seals_in_progress() == []


def test_give_way_lets_a_waiting_writer_in_before_the_holder_goes_on() -> None:
    turns = Turns()
    order: list[str] = []
    waiting = threading.Event()

    def writer() -> None:
        waiting.set()
        with turns:
            order.append("write")

    with turns:
        thread = threading.Thread(target=writer)
        thread.start()
        waiting.wait(5)
        while turns._waiting == 0:  # the writer is blocked in acquire()
            threading.Event().wait(0.001)
        order.append("step 1")
        turns.give_way()
        order.append("step 2")
    thread.join(5)
    assert order == ["step 1", "write", "step 2"]
    turns.give_way()  # not held by this thread: nothing to give


def test_released_lets_a_writer_in_during_the_arithmetic() -> None:
    turns = Turns()
    wrote = threading.Event()

    def writer() -> None:
        with turns:
            wrote.set()

    with turns:
        thread = threading.Thread(target=writer)
        thread.start()
        with turns.released():
            assert wrote.wait(5)  # would time out were the lock still held
        assert turns._owner == threading.get_ident()  # held again after the block
    thread.join(5)


def test_an_increment_at_an_instant_of_an_hour_being_sealed_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saas_sealing, "STEP", 3)
    cfg, whole = filled(tmp_path / "whole")
    seal_hours(whole, cfg, H + 3700, offset=0)
    cfg, ledger = filled(tmp_path / "late")

    def late(n: int) -> None:  # an increment at an instant the hour already has (H + 60)
        if n == 3:
            record(ledger, H + 60, {key("c00", "t1"): D(7)})

    seal_hours(ledger, cfg, H + 3700, offset=0, turn=Steps(late))
    assert records(ledger) == records(whole)  # not added to the sample the seal had read
    seal_hours(ledger, cfg, H + 7300, offset=0)
    after = {c: q for (c, _, h), (q, _, _) in records(ledger).items() if h == H + 3600}
    assert after["c00"] == "1"  # 7 x 0.1 rounded up: carried into the next hour


def test_the_daemons_seal_lets_a_reads_write_in_between_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon seals under its round lock, which a read stores its sample under: a read that
    is waiting when a step ends stores before the next step, not after the whole pass."""
    from agent.daemon.daemon import Daemon
    from agent.host import identity
    from agent.modes.choose import mode_for
    from tests.fakes import FakeClock
    from tests.test_daemon import FakeImds

    monkeypatch.setattr(saas_sealing, "STEP", 3)
    cfg, ledger = filled(tmp_path / "d")
    clock = FakeClock(H + 3700)
    state = Path(cfg.state_dir)
    ident = identity.Identity(FakeImds("i-1"), clock, state)
    d = Daemon(cfg, clock, ident.start(ledger), ident, None, None, modes=mode_for)  # type: ignore[arg-type]
    order: list[str] = []
    advance = Ledger.advance_seal

    def write() -> None:  # as a read stores its sample (Daemon._read)
        with d._round_lock:
            order.append("write")

    reader = threading.Thread(target=write)

    def step(self: Ledger, *args: object) -> None:
        advance(self, *args)  # type: ignore[arg-type]
        order.append(f"step {len(order)}")
        if len(order) == 2:  # after the second step, a read waits for the lock to store
            reader.start()
            while d._round_lock._waiting == 0:
                threading.Event().wait(0.001)

    monkeypatch.setattr(Ledger, "advance_seal", step)
    with d._round_lock:  # as _close_hours_locked holds it
        d.seal_closed_hours()
    reader.join(5)
    assert order[:3] == ["step 0", "step 1", "write"]  # in before the third step
    assert len(order) == 6 and d.ledger.seals_in_progress() == []
