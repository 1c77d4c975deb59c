"""The sender child's handling, driven through a fake Popen and a hand-moved monotonic clock."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.daemon.sender import GRACE, SENDER_TIMEOUT, STOP_FLUSH, SenderProcess, send_command
from tests.fakes import FakeClock


class FakeChild:
    """A Popen that exits when told to (`code`), or on a signal it does not ignore."""

    def __init__(self, cmd: list[str], ignores_sigterm: bool = False) -> None:
        self.cmd, self.pid = cmd, 4242
        self.code: int | None = None
        self.ignores_sigterm = ignores_sigterm
        self.calls: list[object] = []  # ("wait", timeout) / "terminate" / "kill"

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        self.calls.append(("wait", timeout))
        if self.code is None:
            if timeout is None:
                raise AssertionError("an unbounded wait on a running child would hang the stop")
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return self.code

    def terminate(self) -> None:
        self.calls.append("terminate")
        if not self.ignores_sigterm:
            self.code = -15

    def kill(self) -> None:
        self.calls.append("kill")
        self.code = -9


class FakePopen:
    """Records every command started and the children it made."""

    def __init__(self, ignores_sigterm: bool = False) -> None:
        self.children: list[FakeChild] = []
        self.ignores_sigterm = ignores_sigterm

    def __call__(self, cmd: list[str]) -> FakeChild:
        self.children.append(FakeChild(cmd, self.ignores_sigterm))
        return self.children[-1]


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sender(popen: FakePopen, mono: Mono) -> SenderProcess:
    def command(flush: bool, deadline: float | None) -> list[str]:
        return ["send", *(["--flush"] if flush else []), *([repr(deadline)] if deadline else [])]

    return SenderProcess(command, mono, popen)  # type: ignore[arg-type]


def test_started_runs_until_it_exits_then_is_reaped() -> None:
    popen, mono = FakePopen(), Mono()
    s = sender(popen, mono)
    assert s.running() is False  # nothing started yet
    s.start()
    (child,) = popen.children
    assert child.cmd == ["send"]
    mono.t += SENDER_TIMEOUT - 1
    assert s.running() is True
    child.code = 69  # retry later: reaped, not an error
    assert s.running() is False
    assert s.running() is False and child.calls == []  # reaped once, never signalled


def test_an_exit_code_ends_it_whatever_the_code() -> None:
    for code in (0, 1, 77, -9):
        popen, mono = FakePopen(), Mono()
        s = sender(popen, mono)
        s.start()
        popen.children[0].code = code
        assert s.running() is False
        assert popen.children[0].calls == []


def test_one_over_its_time_is_terminated() -> None:
    popen, mono = FakePopen(), Mono()
    s = sender(popen, mono)
    s.start()
    mono.t += SENDER_TIMEOUT + 1
    assert s.running() is False
    child = popen.children[0]
    assert child.calls == ["terminate", ("wait", GRACE)] and child.code == -15
    s.start()  # the next tick may start a fresh one
    assert len(popen.children) == 2 and s.running() is True


def test_one_over_its_time_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    popen, mono = FakePopen(ignores_sigterm=True), Mono()
    s = sender(popen, mono)
    s.start()
    mono.t += SENDER_TIMEOUT + 1
    assert s.running() is False
    child = popen.children[0]
    assert child.calls == ["terminate", ("wait", GRACE), "kill", ("wait", None)]
    assert child.code == -9


def test_stop_lets_a_running_sender_finish_within_the_grace_then_ends_it() -> None:
    popen, mono = FakePopen(ignores_sigterm=True), Mono()
    sender(FakePopen(), mono).stop()  # nothing running: nothing to do
    s = sender(popen, mono)
    s.start()
    s.stop(grace=2.0)
    child = popen.children[0]
    assert child.calls == [("wait", 2.0), "terminate", ("wait", 2.0), "kill", ("wait", None)]
    assert s.running() is False


def test_stop_of_a_sender_that_finishes_in_time_sends_no_signal() -> None:
    popen, mono = FakePopen(), Mono()
    s = sender(popen, mono)
    s.start()
    popen.children[0].code = 0
    s.stop()
    assert popen.children[0].calls == [("wait", GRACE)]


def test_after_the_stop_a_late_send_tick_starts_nothing_but_the_flush_still_runs() -> None:
    """A tick already past its stop check must not start a sender that would hold send.lock
    against the stop flush (the partial hour would then wait for the next start)."""
    popen, mono = FakePopen(), Mono()
    s = sender(popen, mono)
    s.stop()
    s.start()
    assert popen.children == [] and s.running() is False
    s.flush(deadline=5.0)
    assert [c.cmd for c in popen.children] == [["send", "--flush", "5.0"]]


def test_the_flush_is_waited_for_and_ended_when_it_runs_over() -> None:
    popen, mono = FakePopen(), Mono()
    s = sender(popen, mono)
    popen_code = FakePopen()

    def exits_0(cmd: list[str]) -> FakeChild:
        child = popen_code(cmd)
        child.code = 0
        return child

    s.popen = exits_0  # type: ignore[assignment]
    assert s.flush(deadline=1234.5) == 0
    assert popen_code.children[0].cmd == ["send", "--flush", "1234.5"]
    s.popen = popen  # type: ignore[assignment]
    assert s.flush(deadline=1.0) == -15  # hangs: terminated after its time
    assert popen.children[0].calls == [("wait", STOP_FLUSH + 10), "terminate", ("wait", GRACE)]


def test_the_command_names_the_running_config_and_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    clock.rate = 60.0
    cmd = send_command(tmp_path / "config.running.yaml", clock, "json", True, 99.5)
    assert cmd[cmd.index("-c") + 1] == str((tmp_path / "config.running.yaml").resolve())
    assert cmd[cmd.index("--log-format") + 1] == "json"
    assert "--flush" in cmd and cmd[cmd.index("--deadline") + 1] == "99.5"
    assert cmd[cmd.index("--clock") + 1] == clock.spec
    assert "--flush" not in send_command(tmp_path / "c.yaml", clock, "text", False, None)
