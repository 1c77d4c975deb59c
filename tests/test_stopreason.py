"""Telling a restart from a stop: systemd's job for the unit, and only a positive answer counts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.host.stopreason import job_type, own_unit, restarting

V2 = "0::/system.slice/metering-agent.service\n"
V1 = (
    "12:pids:/system.slice/metering-agent.service\n"
    "1:name=systemd:/system.slice/metering-agent.service\n"
    "0::/system.slice/metering-agent.service\n"
)
JOBS = "1029 metering-agent.service {} running\n1031 poweroff.target start waiting\n"


@pytest.mark.parametrize("text", [V1, V2])
def test_own_unit_from_cgroup(text: str) -> None:
    assert own_unit(text) == "metering-agent.service"


def test_own_unit_outside_a_service() -> None:
    assert own_unit("0::/user.slice/user-0.slice/session-3.scope\n") is None


def test_job_type_of_the_unit_only() -> None:
    assert job_type(JOBS.format("restart"), "metering-agent.service") == "restart"
    assert job_type(JOBS.format("stop"), "metering-agent.service") == "stop"
    assert job_type(JOBS.format("stop"), "other.service") is None
    assert job_type("", "metering-agent.service") is None


def _cgroup(tmp_path: Path) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(V2)
    return path


@pytest.mark.parametrize(("kind", "expected"), [("restart", True), ("stop", False)])
def test_restarting_asks_systemd_about_its_own_unit(
    tmp_path: Path, kind: str, expected: bool
) -> None:
    asked: list[list[str]] = []

    def run(args: list[str]) -> str:
        asked.append(args)
        return JOBS.format(kind)

    env = {"INVOCATION_ID": "abc"}
    assert restarting(env, run, _cgroup(tmp_path)) is expected
    assert asked == [["list-jobs", "--no-legend", "--no-pager", "metering-agent.service"]]


def test_not_under_systemd_is_a_stop_without_asking(tmp_path: Path) -> None:
    def run(args: list[str]) -> str:
        raise AssertionError("must not ask systemd")

    assert restarting({}, run, _cgroup(tmp_path)) is False


@pytest.mark.parametrize(
    "error",
    [
        subprocess.CalledProcessError(1, "systemctl"),  # no system bus (late in a shutdown)
        subprocess.TimeoutExpired("systemctl", 5),
        FileNotFoundError("systemctl"),
    ],
)
def test_any_doubt_is_a_stop(tmp_path: Path, error: Exception) -> None:
    def run(args: list[str]) -> str:
        raise error

    assert restarting({"INVOCATION_ID": "abc"}, run, _cgroup(tmp_path)) is False


def test_no_job_is_a_stop(tmp_path: Path) -> None:
    """`kill -TERM` or `systemctl kill`: no job at all."""
    assert restarting({"INVOCATION_ID": "abc"}, lambda _: "", _cgroup(tmp_path)) is False
