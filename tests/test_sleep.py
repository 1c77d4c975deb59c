"""Sleep and resume (issue 23 §5), on an injected clock: the daemon's Wake (SIGUSR1, or a resume
seen as suspended time), its flush of every pending hour whatever the send slot, the sender
child that flush starts, and the hook's module (agent/commands/sleep.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType

import pytest

from agent.clock import HOUR
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.commands import sleep as hook
from agent.daemon.daemon import Daemon
from agent.daemon.sender import SenderProcess
from agent.daemon.wake import SLEEP_FLUSH, Wake
from agent.host.locks import StateLock
from agent.sending.policy import due
from agent.windows import send_offset
from tests.billing import FakeClient, H, make_config
from tests.fakes import FakeClock, FakePsutil
from tests.test_daemon import FakeImds, open_daemon, run_round
from tests.test_sender_process import FakePopen, Mono

WINDOW = "metering: {send_window: 3600}\n"
ID = "i-1"  # its send offset in a 3600 s window is 1216 s


class TestWake:
    def test_a_resume_is_suspended_time_that_grew(self) -> None:
        clock = FakeClock(H)
        wake = Wake(clock)
        assert wake.due() is None
        clock.suspend(8 * HOUR)
        assert wake.due() == "the system resumed after 28800 s suspended"
        assert wake.due() is not None  # stays until served
        wake.done()
        assert wake.due() is None

    def test_a_wall_clock_step_is_not_a_resume(self) -> None:
        """An NTP step moves the wall clock alone: check_clock reschedules, nothing more."""
        clock = FakeClock(H)
        wake = Wake(clock)
        clock.advance(8 * HOUR)
        assert wake.due() is None

    def test_suspended_time_within_the_tolerance_is_not_a_resume(self) -> None:
        clock = FakeClock(H)
        wake = Wake(clock, tolerance=2.0)
        clock.suspend(1.5)
        assert wake.due() is None

    def test_sigusr1_asks(self) -> None:
        wake = Wake(FakeClock(H))
        wake.ask(signal.SIGUSR1, None)
        assert wake.due() == "SIGUSR1 (the system sleeps, or has resumed)"
        wake.done()
        assert wake.due() is None

    def test_the_real_clock_counts_no_suspended_time_while_awake(self) -> None:
        """On this machine (no suspend while the test runs) BOOTTIME - MONOTONIC stays put."""
        wake = Wake(FakeClock.__mro__[1]())  # the real Clock
        time.sleep(0.05)
        assert wake.due() is None


class TestStartFlush:
    def sender(self) -> tuple[SenderProcess, FakePopen]:
        popen = FakePopen()
        command = lambda flush, deadline: ["send", *(["--flush"] if flush else []), repr(deadline)]  # noqa: E731
        return SenderProcess(command, Mono(), popen=popen), popen  # type: ignore[arg-type]

    def test_starts_a_flush_with_its_deadline(self) -> None:
        sender, popen = self.sender()
        assert sender.start_flush(H + 20.0)
        assert popen.children[0].cmd == ["send", "--flush", repr(H + 20.0)]
        assert sender.running()

    def test_a_second_request_waits_for_the_running_flush(self) -> None:
        sender, popen = self.sender()
        assert sender.start_flush(H + 20.0)
        assert not sender.start_flush(H + 21.0)
        assert len(popen.children) == 1
        popen.children[0].code = 0
        assert sender.start_flush(H + 22.0)
        assert [c.cmd[-1] for c in popen.children] == [repr(H + 20.0), repr(H + 22.0)]

    def test_a_running_sender_of_what_was_due_is_replaced(self) -> None:
        sender, popen = self.sender()
        sender.start()
        assert sender.start_flush(H + 20.0)
        first, flush = popen.children
        assert "terminate" in first.calls
        assert flush.cmd[:2] == ["send", "--flush"]

    def test_start_does_not_replace_a_running_flush(self) -> None:
        sender, popen = self.sender()
        assert sender.start_flush(H + 20.0)
        sender.start()  # the send tick, racing
        assert len(popen.children) == 1

    def test_stopping_starts_nothing(self) -> None:
        sender, popen = self.sender()
        sender.stop()
        assert sender.start_flush(H + 20.0)  # served: the stop flush sends
        assert popen.children == []


def daemon_with_slot(tmp_path: Path, clock: FakeClock) -> tuple[Daemon, FakePopen]:
    cfg = make_config(tmp_path, WINDOW)
    sampler = Sampler(cfg, Registry(), Sources(psutil=FakePsutil(), proc=tmp_path / "proc"))
    d = open_daemon(cfg, clock, FakeImds(ID), sampler=sampler)
    popen = FakePopen()
    d.sender = SenderProcess(
        lambda flush, deadline: ["send", *(["--flush"] if flush else []), repr(deadline)],
        clock.monotonic,
        popen=popen,  # type: ignore[arg-type]
    )
    return d, popen


def hour_in_its_slot(tmp_path: Path) -> tuple[Daemon, FakePopen, FakeClock]:
    """The issue's moment: 13 s after a boundary, the hour before it sealed and waiting for its
    send slot (1216 s after the hour), the new hour open."""
    clock = FakeClock(H - 120)
    d, popen = daemon_with_slot(tmp_path, clock)
    assert d.offset == send_offset(ID, 3600) == pytest.approx(1216.05)
    run_round(d)
    clock.t = H - 60
    run_round(d)
    clock.t = H + 13
    run_round(d)  # seals hour H-1h
    pending = d.ledger.pending()
    assert {h.hour for h in pending} == {H - HOUR}
    when = due(d.ledger.send_state(), d.mode.pending_bounds(d.ledger), d.mode.expires_at)
    assert when is not None and when > clock.time() + 1000  # its slot is 20 minutes away
    d.send_tick()
    assert popen.children == []  # a send tick leaves it in its slot
    return d, popen, clock


def send_as_the_child_would(d: Daemon, clock: FakeClock, client: FakeClient) -> None:
    """What the `send --flush --deadline` child does, in this process with a recording client."""
    d.mode.sender(d.ledger, d.config, client, clock).run(
        flush=True, deadline=clock.time() + SLEEP_FLUSH
    )


class TestDaemon:
    def test_sigusr1_sends_the_sealed_hour_now_whatever_its_slot(self, tmp_path: Path) -> None:
        d, popen, clock = hour_in_its_slot(tmp_path)
        d.send_if_woken()
        assert popen.children == []  # nobody asked
        d.wake.ask()
        d.send_if_woken()
        assert [c.cmd[:2] for c in popen.children] == [["send", "--flush"]]
        assert float(popen.children[0].cmd[2]) == clock.time() + SLEEP_FLUSH
        client = FakeClient()
        send_as_the_child_would(d, clock, client)
        assert {(c.dimension, c.timestamp // HOUR * HOUR) for c in client.calls} == {
            ("vcpus", H - HOUR), ("requests", H - HOUR), ("vcpu_hours", H - HOUR)
        }  # fmt: skip
        assert d.ledger.pending() == []
        assert {h.hour for h in d.ledger.hours()} == {H - HOUR}  # the open hour stays open

    def test_the_issues_hibernate_sends_before_and_loses_only_the_partial_hour(
        self, tmp_path: Path
    ) -> None:
        """+8 h hibernate 13 s after a boundary: the hook's `pre` sends the sealed hour; after
        the resume the partial hour is sealed and, 8 h old, is past MeterUsage's 6 h window."""
        d, popen, clock = hour_in_its_slot(tmp_path)
        client = FakeClient()
        d.wake.ask()  # pre hibernate
        d.send_if_woken()
        send_as_the_child_would(d, clock, client)
        popen.children[-1].code = 0
        clock.suspend(8 * HOUR)  # no SIGUSR1 after it: the daemon sees the resume itself
        d.send_if_woken()
        assert len(popen.children) == 2 and popen.children[1].cmd[1] == "--flush"
        send_as_the_child_would(d, clock, client)
        states = {(h.dimension, h.hour): h.state for h in d.ledger.hours()}
        assert states == {
            **{(dim, H - HOUR): "sent" for dim in ("vcpus", "requests", "vcpu_hours")},
            **{(dim, H): "expired" for dim in ("vcpus", "requests", "vcpu_hours")},
        }
        assert len(client.calls) == 3  # each sent once, the expired ones never

    def test_a_resume_within_the_window_sends_the_partial_hour_at_once(
        self, tmp_path: Path
    ) -> None:
        d, popen, clock = hour_in_its_slot(tmp_path)
        clock.suspend(2 * HOUR)  # the pre hook did not run (no hook installed)
        d.send_if_woken()
        assert {h.hour for h in d.ledger.pending()} == {H - HOUR, H}  # H sealed at the resume
        assert [c.cmd[1] for c in popen.children] == ["--flush"]
        client = FakeClient()
        send_as_the_child_would(d, clock, client)
        assert {c.timestamp // HOUR * HOUR for c in client.calls} == {H - HOUR, H}
        assert d.ledger.pending() == []

    def test_a_request_meeting_a_running_flush_is_served_after_it(self, tmp_path: Path) -> None:
        d, popen, clock = hour_in_its_slot(tmp_path)
        d.wake.ask()
        d.send_if_woken()
        clock.suspend(600)  # asleep with the flush frozen mid-way; resumed
        d.send_if_woken()
        assert len(popen.children) == 1  # the first flush still runs
        popen.children[0].code = 0
        d.send_if_woken()
        assert len(popen.children) == 2

    def test_nothing_pending_starts_nothing(self, tmp_path: Path) -> None:
        clock = FakeClock(H + 13)
        d, popen = daemon_with_slot(tmp_path, clock)
        d.wake.ask()
        d.send_if_woken()
        assert popen.children == []
        assert d.wake.due() is None  # served


class TestHook:
    def config(self, tmp_path: Path) -> Path:
        cfg = make_config(tmp_path, WINDOW)
        return Path(cfg.source)

    def test_no_agent_running_returns_at_once(self, tmp_path: Path) -> None:
        line = hook.hook("pre", "suspend", self.config(tmp_path))
        assert line == (
            f"metering-agent: pre suspend: no agent runs for {tmp_path / 'state'}; nothing to send"
        )

    def test_pre_signals_the_lock_holder_and_waits_at_most_its_bound(self, tmp_path: Path) -> None:
        """This process holds the state lock, as `run` would, with a pending hour it never
        sends: the hook signals it and gives up after its bound."""
        config = self.config(tmp_path)
        clock = FakeClock(H - 60)
        d, _popen = daemon_with_slot(tmp_path, clock)
        run_round(d)
        clock.t = H + 13
        run_round(d)
        assert d.ledger.pending()
        lock = StateLock(tmp_path / "state")
        lock.acquire()
        received: list[int] = []

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            received.append(signum)

        old = signal.signal(signal.SIGUSR1, on_usr1)
        try:
            began = time.monotonic()
            line = hook.hook("pre", "hibernate", config, wait=0.6)
            took = time.monotonic() - began
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert received == [signal.SIGUSR1]
        assert 0.6 <= took < 5
        assert line == (
            "metering-agent: pre hibernate: 1 hour(s) still pending after 1 s; they stay "
            "pending and are sent after the resume"
        )
        assert os.getpid() == hook.daemon_state(tmp_path / "state")["pid"]

    def test_a_wrong_phase_is_one_line_and_exit_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert hook.main(["during", "suspend"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "expected pre|post" in err

    def test_a_missing_config_is_one_line_and_exit_1(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("METERING_AGENT_CONFIG", str(tmp_path / "nope.yaml"))
        assert hook.main(["pre", "suspend"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nope.yaml" in err
