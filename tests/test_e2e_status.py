"""End to end, issue 13's `status`: with a real `metering-agent run` against the emulator, and after
it stopped. Oracles: the child's own pid, the package version, the CPUs this machine has, the exit
code of `status --check`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.emulator import Emulator
from tests.conftest import run_cli
from tests.e2e import Agent, ledger_samples, wait_for
from tests.test_e2e_values import env_for, write_config

pytestmark = pytest.mark.e2e
CPUS = os.cpu_count() or 1


def status_json(config: Path) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_with_the_daemon_running_and_stopped(emulator: Emulator, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        emulator.url,
        """
        - name: vcpus
          collector: {type: system, metric: cpu_count}
        """,
    )
    before = status_json(config)
    assert before["daemon"] == {"running": False, "pid": None, "version": None}
    assert run_cli("status", "--check", "-c", str(config)).returncode == 1  # nothing metered yet
    agent = Agent(config, env_for(emulator)).start()
    try:
        wait_for("two samples", lambda: ledger_samples(tmp_path / "state") >= 2, 30, agent)
        assert agent.proc is not None
        running = status_json(config)
        assert running["daemon"] == {"running": True, "pid": agent.proc.pid, "version": __version__}
        vcpus = running["dimensions"][0]
        assert vcpus["current_hour_so_far"] == str(CPUS)
        assert vcpus["last_error"] is None
        assert running["next_send"] is not None  # the open hour's slot, not `-`
        check = run_cli("status", "--check", "-c", str(config))
        assert (check.returncode, check.stdout) == (0, "")
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
    stopped = status_json(config)
    assert stopped["daemon"]["running"] is False
    assert stopped["health"]["pending_hours"] == 0  # the stop sealed and sent the partial hour
    assert {h["state"] for h in stopped["hours"]} == {"sent"}
    sealed = {h["hour"]: h["quantity"] for h in stopped["hours"]}  # the stop sealed the open hour
    assert sealed[running["current_hour"]] == vcpus["current_hour_so_far"]
    assert run_cli("status", "--check", "-c", str(config)).returncode == 0


def test_a_collector_error_clears_once_the_source_is_back(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A log that is not there yet is an error in `status`, with its time; once the product writes
    it, the next read clears it (the count stays) and its lines are in the hour so far."""
    log = tmp_path / "app.log"
    config = write_config(
        tmp_path,
        emulator.url,
        f"""
        - name: requests
          collector: {{type: log, path: '{log}', pattern: 'GET '}}
        """,
    )
    agent = Agent(config, env_for(emulator)).start()

    def requests() -> dict[str, Any]:
        return status_json(config)["dimensions"][0]

    try:
        missing = wait_for(
            "the missing log's error", lambda: requests().get("last_error"), 30, agent
        )
        assert missing and requests()["last_error_at"] is not None
        log.write_text("GET /a\nGET /b\nPOST /c\n")
        wait_for("the error to clear", lambda: requests().get("last_error", 1) is None, 30, agent)
        back = requests()
        assert back["collector_errors"] >= 1 and back["last_error_at"] is None
        # the two GET lines (oracle: the file written above), unless the hour just turned
        wait_for("the lines in the hour so far", lambda: requests()["current_hour_so_far"], 10)
        assert requests()["current_hour_so_far"] == "2" or time.time() % 3600 < 30
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
