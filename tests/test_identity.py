"""First boot: nothing is sealed or sent from a ledger whose instance IMDS has not confirmed."""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agent.host import identity
from agent.host.imds import ImdsError
from agent.ledger import Ledger
from agent.modes.instance import Sender
from tests.billing import FakeClient, H, make_config
from tests.fakes import FakeClock
from tests.test_sealing import fill


class SlowImds:
    """IMDS that does not answer until told to."""

    def __init__(self, instance_id: str) -> None:
        self.id = instance_id
        self.up = False
        self.asked = 0

    def instance_id(self) -> str:
        self.asked += 1
        if not self.up:
            raise ImdsError("IMDS unreachable")
        return self.id


def baked(tmp_path: Path) -> Path:
    """A ledger made on the build instance: its id from IMDS, a sealed pending hour."""
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    ledger.update_meta(instance_id="i-build", instance_id_source="imds")
    fill(ledger, "vcpus", H - 3600, 3)
    from agent.modes.instance import seal_hours

    seal_hours(ledger, cfg, H, offset=0)
    ledger.close()
    return cfg.state_dir


def test_an_unverified_ledger_is_not_sent_and_health_says_so(tmp_path: Path) -> None:
    state = baked(tmp_path)
    imds = SlowImds("i-buyer")
    ident = identity.Identity(imds, FakeClock(H), state)  # type: ignore[arg-type]
    ledger = ident.start(Ledger(state))
    assert not ident.verified.is_set()
    data = json.loads((state / "health.json").read_text())
    assert data["ok"] is False and "not verified" in data["reason"]
    # even a manual `send --flush` sends nothing from it
    client = FakeClient()
    report = Sender(ledger, make_config(tmp_path), client, FakeClock(H + 60)).run(flush=True)
    assert report.paused and client.calls == [] and client.dry_runs == 0


def test_a_late_answer_moves_a_baked_ledger_aside_keeping_this_runs_samples(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(identity, "RETRY_DELAYS", (0.01,) * 3)
    monkeypatch.setattr(identity, "RETRY_EVERY", 0.01)
    state = baked(tmp_path)
    imds = SlowImds("i-buyer")
    clock = FakeClock(H + 100)
    ident = identity.Identity(imds, clock, state)  # type: ignore[arg-type]
    holder = {"ledger": ident.start(Ledger(state))}
    # this run samples while it waits (t >= the run's start)
    holder["ledger"].record_sample("vcpus", H + 120, Decimal(4), 60, {"p": 1}, carry=False)

    verified_in_swap = []

    def swap(settle):  # type: ignore[no-untyped-def]
        holder["ledger"] = settle(holder["ledger"])
        # verified before the swap lets go of the round lock: a stop then seals
        verified_in_swap.append(ident.verified.is_set())
        return True

    stop = threading.Event()
    ident.keep_asking(stop, swap, lambda: not ident.verified.is_set())
    time.sleep(0.1)
    assert not ident.verified.is_set() and imds.asked >= 2
    imds.up = True
    assert ident.verified.wait(5)
    stop.set()
    assert ident._thread is not None
    ident._thread.join(5)  # its last log line written while this test's log capture is open
    assert verified_in_swap == [True]
    fresh = holder["ledger"]
    assert fresh.get_meta("instance_id") == "i-buyer"
    assert fresh.send_state().identity_unverified is None
    assert fresh.hours() == []  # the baked pending hour stays in the moved-aside ledger
    assert fresh.unsealed_sample_count() == 1 and fresh.position("vcpus") == {"p": 1}
    (moved,) = state.glob("ledger.db.instance-i-build.*[0-9]")
    with sqlite3.connect(moved) as db:
        assert db.execute("SELECT state FROM hours").fetchall() == [("pending",)]


def test_the_same_instance_verifies_at_once(tmp_path: Path) -> None:
    state = baked(tmp_path)
    imds = SlowImds("i-build")
    imds.up = True
    ident = identity.Identity(imds, FakeClock(H), state)  # type: ignore[arg-type]
    ledger = ident.start(Ledger(state))
    assert ident.verified.is_set()
    assert [h.state for h in ledger.hours()] == ["pending"]  # its own hour: sent as usual


def samples_at(ledger: Ledger) -> list[float]:
    return sorted(r[2] for r in ledger.since(0)[0])


def test_unverified_runs_that_stop_before_imds_answers_are_carried_at_the_next_start(
    tmp_path: Path,
) -> None:
    state = baked(tmp_path)
    build = Ledger(state)  # the build instance sampled a little more before the image was baked
    build.record_sample("vcpus", H + 10, Decimal(2), 60, {"p": 0}, carry=False)
    build.close()
    imds = SlowImds("i-buyer")
    # first boot: IMDS silent; the run samples and stops
    first = identity.Identity(imds, FakeClock(H + 100), state)  # type: ignore[arg-type]
    ledger = first.start(Ledger(state))
    assert not first.verified.is_set()
    ledger.record_sample("vcpus", H + 120, Decimal(4), 60, {"p": 1}, carry=False)
    ledger.close()
    # second start: still silent; the mark stays at the first run's start
    second = identity.Identity(imds, FakeClock(H + 700), state)  # type: ignore[arg-type]
    ledger = second.start(Ledger(state))
    assert not second.verified.is_set()
    assert ledger.get_meta(identity.SINCE) == H + 100
    ledger.record_sample("vcpus", H + 720, Decimal(4), 60, {"p": 2}, carry=False)
    ledger.close()
    # third start: IMDS answers another id at once
    imds.up = True
    third = identity.Identity(imds, FakeClock(H + 1500), state)  # type: ignore[arg-type]
    fresh = third.start(Ledger(state))
    assert third.verified.is_set()
    assert fresh.get_meta("instance_id") == "i-buyer"
    assert fresh.get_meta(identity.SINCE) is None and fresh.send_state().identity_unverified is None
    assert samples_at(fresh) == [H + 120, H + 720]  # both unverified runs', not the build's
    assert fresh.position("vcpus") == {"p": 2}
    (moved,) = state.glob("ledger.db.instance-i-build.*[0-9]")
    with sqlite3.connect(moved) as db:
        assert db.execute("SELECT t FROM samples ORDER BY t").fetchall() == [
            (H + 10,),
            (H + 120,),
            (H + 720,),
        ]


def test_usage_found_unread_before_imds_answers_is_carried_with_the_positions(
    tmp_path: Path,
) -> None:
    """The carried position is past the loss: the loss comes too (and the build's stays)."""
    from agent.collectors import Unread

    state = baked(tmp_path)
    build = Ledger(state)
    build.record_sample("api", H + 10, Decimal(1), 60, {"p": 0}, carry=True, increment=True,
                        unread=(Unread("build log rotated away", "on the build"),))  # fmt: skip
    build.close()
    imds = SlowImds("i-buyer")
    first = identity.Identity(imds, FakeClock(H + 100), state)  # type: ignore[arg-type]
    ledger = first.start(Ledger(state))
    ledger.record_sample("api", H + 120, Decimal(1), 60, {"p": 1}, carry=True, increment=True,
                         unread=(Unread("app.log.1 deleted unread", "rotate less", 512),))  # fmt: skip
    ledger.close()
    imds.up = True
    fresh = identity.Identity(imds, FakeClock(H + 700), state).start(Ledger(state))  # type: ignore[arg-type]
    assert fresh.position("api") == {"p": 1}
    assert [(u.events, u.amount, u.what) for u in fresh.unread_usage()] == [
        (1, 512, "app.log.1 deleted unread")
    ]


def test_the_same_id_answering_late_clears_the_mark(tmp_path: Path) -> None:
    state = baked(tmp_path)
    imds = SlowImds("i-build")
    ledger = identity.Identity(imds, FakeClock(H + 100), state).start(Ledger(state))  # type: ignore[arg-type]
    assert ledger.get_meta(identity.SINCE) == H + 100
    ledger.close()
    imds.up = True
    ident = identity.Identity(imds, FakeClock(H + 200), state)  # type: ignore[arg-type]
    ledger = ident.start(Ledger(state))
    assert ident.verified.is_set() and ledger.get_meta(identity.SINCE) is None


def fail_first(monkeypatch, name: str, error: Exception, half_move: bool = False):  # type: ignore[no-untyped-def]
    """Make identity's `name` (replace_closed or Ledger) raise once, then work again;
    `half_move`: the ledger file disappears before the failure."""
    real = getattr(identity, name)
    calls = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            if half_move:  # the ledger file gone (deleted meanwhile), then the failure
                state_dir = Path(args[0])
                (state_dir / "ledger.db").rename(state_dir / "elsewhere.db")
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(identity, name, failing)
    return calls


def no_moved_aside(state: Path) -> bool:
    return list(state.glob("ledger.db.instance-*")) == []


@pytest.mark.parametrize("name", ["replace_closed", "Ledger"])
def test_a_failed_late_swap_keeps_a_usable_ledger_and_tries_again(
    tmp_path: Path, monkeypatch, name: str
) -> None:
    monkeypatch.setattr(identity, "RETRY_DELAYS", (0.01,) * 3)
    monkeypatch.setattr(identity, "RETRY_EVERY", 0.01)
    state = baked(tmp_path)
    imds = SlowImds("i-buyer")
    ident = identity.Identity(imds, FakeClock(H + 100), state)  # type: ignore[arg-type]
    holder = {"ledger": ident.start(Ledger(state))}
    holder["ledger"].record_sample("vcpus", H + 120, Decimal(4), 60, {"p": 1}, carry=False)
    calls = fail_first(monkeypatch, name, OSError(28, "No space left on device"))
    swaps = []
    after_failure = threading.Event()

    def swap(settle):  # type: ignore[no-untyped-def]
        holder["ledger"] = settle(holder["ledger"])
        swaps.append(ident.verified.is_set())
        if len(swaps) == 1:
            # the failed swap left a ledger this run goes on storing into: the old one when the
            # replacement failed, the fresh one when only reopening it did
            expected = "i-build" if name == "replace_closed" else "i-buyer"
            assert holder["ledger"].get_meta("instance_id") == expected
            holder["ledger"].record_sample("vcpus", H + 180, Decimal(4), 60, {"p": 2}, carry=False)
            after_failure.set()
        return True

    stop = threading.Event()
    imds.up = True
    ident.keep_asking(stop, swap, lambda: not ident.verified.is_set())
    assert ident.verified.wait(5)
    stop.set()
    assert ident._thread is not None
    ident._thread.join(5)  # its last log line written while this test's log capture is open
    assert after_failure.is_set() and swaps == [False, True]
    # replace_closed: failed, then worked; Ledger: opening the fresh one failed, then worked
    assert len(calls) == 2
    fresh = holder["ledger"]
    assert fresh.get_meta("instance_id") == "i-buyer"
    assert samples_at(fresh) == [H + 120, H + 180] and fresh.position("vcpus") == {"p": 2}
    (moved,) = state.glob("ledger.db.instance-i-build.*[0-9]")
    with sqlite3.connect(moved) as db:
        assert db.execute("SELECT state FROM hours").fetchall() == [("pending",)]


def test_a_failed_move_at_start_stays_unverified_on_the_old_ledger(
    tmp_path: Path, monkeypatch
) -> None:
    state = baked(tmp_path)
    imds = SlowImds("i-buyer")
    imds.up = True
    fail_first(monkeypatch, "replace_closed", PermissionError(13, "Permission denied"))
    ident = identity.Identity(imds, FakeClock(H + 100), state)  # type: ignore[arg-type]
    ledger = ident.start(Ledger(state))
    assert not ident.verified.is_set() and no_moved_aside(state)
    assert (
        ledger.get_meta("instance_id") == "i-build" and ledger.get_meta(identity.SINCE) == H + 100
    )
    ledger.record_sample("vcpus", H + 120, Decimal(4), 60, None, carry=False)  # usable
    assert json.loads((state / "health.json").read_text())["ok"] is False
    ledger.close()
    # the next start moves it and carries this run's sample
    ident = identity.Identity(imds, FakeClock(H + 900), state)  # type: ignore[arg-type]
    fresh = ident.start(Ledger(state))
    assert ident.verified.is_set() and samples_at(fresh) == [H + 120]


class Stopped(Exception):
    pass


def test_the_daemon_stops_with_exit_1_when_no_usable_ledger_is_left(
    tmp_path: Path, monkeypatch
) -> None:
    from tests.test_daemon import open_daemon

    baked(tmp_path)
    imds = SlowImds("i-buyer")
    d = open_daemon(make_config(tmp_path), FakeClock(H + 100), imds)
    # the ledger file gone while it was closed: no ledger.db left to reopen safely
    fail_first(monkeypatch, "replace_closed", OSError(5, "Input/output error"), half_move=True)
    codes = []

    def stop_now(code: int = 1) -> None:
        codes.append(code)
        raise Stopped

    monkeypatch.setattr(identity, "stop_now", stop_now)
    with pytest.raises(Stopped):
        d._swap_ledger(functools.partial(d.identity._settle, instance_id="i-buyer"))
    assert codes == [1] and not d.identity.verified.is_set()
