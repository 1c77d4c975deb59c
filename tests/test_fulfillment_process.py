"""The registration handler child `run` keeps: started, started again after it exits (at most
once a minute), restarted after a reload, ended at the stop; driven through a fake Popen."""

from __future__ import annotations

from typing import Any

from agent.clock import Clock
from agent.fulfillment.process import RESTART_AFTER, HandlerProcess, handler_command
from tests.test_sender_process import FakePopen, Mono


def make() -> tuple[HandlerProcess, FakePopen, Mono]:
    popen, mono = FakePopen(), Mono()
    handler = HandlerProcess(["metering-agent", "serve-registration"], mono, popen)  # type: ignore[arg-type]
    return handler, popen, mono


def test_started_once_while_it_runs() -> None:
    handler, popen, mono = make()
    handler.ensure()
    mono.t += 500
    handler.ensure()
    assert len(popen.children) == 1


def test_an_exited_child_is_started_again_at_most_once_a_minute() -> None:
    handler, popen, mono = make()
    handler.ensure()
    popen.children[0].code = 69  # its port was taken
    mono.t += 1
    handler.ensure()
    assert len(popen.children) == 1  # not in a tight loop
    mono.t += RESTART_AFTER
    handler.ensure()
    assert len(popen.children) == 2


def test_restart_ends_the_old_child_and_starts_a_new_one() -> None:
    handler, popen, _ = make()
    handler.ensure()
    handler.restart()
    assert popen.children[0].calls[0] == "terminate" and popen.children[0].code is not None
    assert len(popen.children) == 2 and popen.children[1].code is None


def test_stop_ends_it_and_nothing_starts_after() -> None:
    handler, popen, mono = make()
    handler.ensure()
    handler.stop()
    assert popen.children[0].code == -15
    mono.t += 10 * RESTART_AFTER
    handler.ensure()
    assert len(popen.children) == 1


def test_command_runs_the_running_config_on_the_daemons_clock(tmp_path: Any) -> None:
    cmd = handler_command(tmp_path / "config.running.yaml", Clock(2.0), "json")
    assert cmd[1:5] == ["-m", "agent", "serve-registration", "-c"]
    assert cmd[5] == str((tmp_path / "config.running.yaml").resolve())
    assert cmd[cmd.index("--log-format") + 1] == "json"
    assert Clock.from_spec(cmd[cmd.index("--clock") + 1]).rate == 2.0
