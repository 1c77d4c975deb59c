"""End to end, sleep and resume (issue 23 §5): the real systemd-sleep hook
(packaging/system-sleep/metering-agent, run as systemd-sleep runs it: `pre|post KIND`) against
the real daemon under libfaketime, sending to the emulator through a real boto3 client.

A suspend cannot be made here: libfaketime moves the daemon's wall clock (the sleep's jump), and
the hook's `post` is what systemd-sleep runs after the resume. (libfaketime leaves
CLOCK_BOOTTIME alone, so the daemon's own resume detection is tested on an injected clock in
tests/test_sleep.py.) The emulator runs on the daemon's faked time, moved with it, so a record's
window is judged as the service would judge it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.clock import HOUR, Clock, hour_start
from agent.commands.status import daemon_state
from agent.emulator import Emulator, Settings
from agent.windows import send_offset
from tests.conftest import PRODUCT, ROOT
from tests.e2e import Agent, faketime_env, ledger_hours, offset_to_before_boundary, wait_for

pytestmark = pytest.mark.e2e
CPUS = os.cpu_count()
HOOK = ROOT / "packaging" / "system-sleep" / "metering-agent"
WINDOW = 3600


def late_slot_instance() -> tuple[str, float]:
    """An instance id whose send slot is 30 to 50 minutes after each hour."""
    for n in range(1000):
        instance_id = f"i-0sleep{n:09d}"
        offset = send_offset(instance_id, WINDOW)
        if 1800 <= offset <= 3000:
            return instance_id, offset
    raise AssertionError("no instance id with a late slot")


class Shifted(Clock):
    """The emulator's clock: real time plus `shift`, the daemon's faked offset."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def time(self) -> float:
        return time.time() + self.shift


class Scene:
    """An agent on a faked clock `lead` s before an hour boundary, the emulator on the same time."""

    def __init__(self, tmp_path: Path, shift: int, lead: float) -> None:
        self.instance_id, self.offset = late_slot_instance()
        self.clock = Shifted(0)
        self.emulator = Emulator(
            Settings(product_codes={PRODUCT}, instance_id=self.instance_id), self.clock
        )
        url = self.emulator.serve(0)
        self.state = tmp_path / "state"
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            textwrap.dedent(
                f"""
                product_code: {PRODUCT}
                state_dir: {self.state}
                metering: {{endpoint_url: "{url}", send_window: {WINDOW}}}
                sampling: {{interval: 5s}}
                dimensions:
                  - name: vcpus
                    collector: {{type: system, metric: cpu_count}}
                """
            )
        )
        self.stamp = tmp_path / "faketime"
        self.faked = offset_to_before_boundary(lead) + shift
        self.move(0)
        env = faketime_env(self.faked, url)
        del env["FAKETIME"]
        env.update(FAKETIME_TIMESTAMP_FILE=str(self.stamp), FAKETIME_NO_CACHE="1")
        self.boundary = hour_start(time.time() + self.faked) + HOUR
        self.agent = Agent(self.config, env).start()

    def move(self, seconds: int) -> None:
        """The wall clock jumps `seconds` ahead for the daemon and the service alike."""
        self.faked += seconds
        self.clock.shift = self.faked
        self.stamp.write_text(f"{self.faked:+d}\n")

    def hook(self, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        """The real hook script, as systemd-sleep runs it; and how long it took."""
        env = dict(os.environ)
        env.update(METERING_AGENT_PYTHON=sys.executable, METERING_AGENT_CONFIG=str(self.config))
        began = time.monotonic()
        done = subprocess.run(
            [str(HOOK), *args], capture_output=True, text=True, env=env, timeout=60, cwd="/"
        )
        return done, time.monotonic() - began

    def records(self, hour: int) -> list:
        return [r for r in self.emulator.records() if r.hour == hour and r.dimension == "vcpus"]

    def state_of(self, hour: int) -> str | None:
        return next((h.state for h in ledger_hours(self.state) if h.hour == hour), None)

    def close(self) -> None:
        if self.agent.alive():
            self.agent.kill9()
        self.emulator.stop()


@pytest.fixture
def scene(tmp_path: Path):
    scenes: list[Scene] = []

    def make(shift: int = 0, lead: float = 8) -> Scene:
        scenes.append(Scene(tmp_path, shift, lead))
        return scenes[-1]

    yield make
    for s in scenes:
        s.close()


def wait_sealed_in_slot(s: Scene) -> int:
    """The hour before the boundary sealed and pending, waiting for its late slot."""
    hour = s.boundary - HOUR
    wait_for("the hour sealed", lambda: s.state_of(hour) == "pending", 60, s.agent)
    assert s.records(hour) == []  # its slot is 30 to 50 minutes away
    return hour


def test_the_issues_hibernate_sends_before_and_loses_only_the_partial_hour(scene) -> None:
    """A +8 h hibernate 13 s after an hour boundary (issue 23 §5). `pre hibernate` returns
    only once the sealed hour, which was waiting for its slot, is at the service; after the
    resume (`post hibernate`) the partial hour is sealed and, 8 h old, is past MeterUsage's 6 h
    window: expired, never sent. Nothing is sent twice."""
    s = scene(shift=-8 * HOUR)  # 8 h in the past, so the jump ends at the real time
    hour = wait_sealed_in_slot(s)
    wait_for("13 s into the new hour", lambda: s.clock.time() >= s.boundary + 13, 30, s.agent)
    done, took = s.hook("pre", "hibernate")
    assert done.returncode == 0, done.stderr
    got = s.records(hour)  # at the service before the script returned
    assert [r.quantity_text for r in got] == [str(CPUS)]
    assert took < 20
    assert "has nothing pending" in done.stdout
    sealed = next(h for h in ledger_hours(s.state) if h.hour == hour)
    assert (sealed.state, sealed.record_id, sealed.client_token) == (
        "sent", got[0].record_id, got[0].client_token,
    )  # fmt: skip
    s.move(8 * HOUR)  # hibernated
    done, took = s.hook("post", "hibernate")
    assert done.returncode == 0, done.stderr
    assert took < 10  # post does not wait
    wait_for("the partial hour expired", lambda: s.state_of(s.boundary) == "expired", 30, s.agent)
    assert s.records(s.boundary) == []  # past its window: AWS's rules, not sent
    assert len(s.records(hour)) == 1
    assert "DuplicateRequestException" not in [c.get("code") for c in s.emulator.calls()]
    assert s.agent.terminate() == 0


def test_post_sends_a_sealed_hour_at_once_instead_of_at_its_slot(scene) -> None:
    """A 5-minute sleep begun just after a boundary, with no `pre` (the hook was not installed
    then): after `post suspend` the sealed hour goes at once, not at its slot 30+ min later."""
    s = scene()
    hour = wait_sealed_in_slot(s)
    s.move(300)
    done, _took = s.hook("post", "suspend")
    assert done.returncode == 0, done.stderr
    wait_for("the sealed hour sent", lambda: s.state_of(hour) == "sent", 20, s.agent)
    slot = s.boundary + s.offset
    sealed = next(h for h in ledger_hours(s.state) if h.hour == hour)
    assert sealed.done_at is not None and sealed.done_at < slot - 1200  # long before its slot
    assert [r.quantity_text for r in s.records(hour)] == [str(CPUS)]
    assert s.agent.terminate() == 0


def test_pre_never_holds_a_sleep_longer_than_its_bound(scene) -> None:
    """The service fails every request: `pre` gives up after its bound, the hour stays pending
    (it goes after the resume), and the daemon goes on."""
    s = scene()
    hour = wait_sealed_in_slot(s)
    s.emulator.inject("error", count=1_000_000, code="InternalServiceErrorException", status=503)
    done, took = s.hook("pre", "suspend")
    assert done.returncode == 0, done.stderr
    assert 20 <= took < 30
    assert "1 hour(s) still pending after 20 s" in done.stdout
    assert s.state_of(hour) == "pending"
    assert any(c.get("code") == "InternalServiceErrorException" for c in s.emulator.calls())
    s.emulator.clear_faults()
    done, _took = s.hook("post", "suspend")
    wait_for("the hour sent after the resume", lambda: s.state_of(hour) == "sent", 40, s.agent)
    assert len(s.records(hour)) == 1
    assert s.agent.terminate() == 0


def test_the_hook_without_a_running_agent_returns_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        "dimensions:\n  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
    )
    env = dict(os.environ, METERING_AGENT_PYTHON=sys.executable, METERING_AGENT_CONFIG=str(config))
    done = subprocess.run(
        [str(HOOK), "pre", "suspend"], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"metering-agent: pre suspend: no agent runs for {tmp_path / 'state'}; nothing to send\n"
    )


def test_a_hook_signal_during_start_up_does_not_end_the_agent(scene) -> None:
    """The hook signals whoever holds the state lock; `run` holds it before the daemon listens
    for SIGUSR1, whose default would end the process."""
    s = scene()
    signals = 0
    deadline = time.monotonic() + 30
    while "metering-agent started" not in s.agent.output() and s.agent.alive():
        assert time.monotonic() < deadline, s.agent.output()[-2000:]
        holder = daemon_state(s.state) if (s.state / "lock").exists() else {"running": False}
        if holder["running"] and holder["pid"]:
            os.kill(holder["pid"], signal.SIGUSR1)
            signals += 1
        time.sleep(0.002)
    assert s.agent.alive(), s.agent.output()[-2000:]
    assert signals >= 1
    hour = wait_sealed_in_slot(s)  # and it goes on as usual
    assert s.state_of(hour) == "pending"
    assert s.agent.terminate() == 0
