"""Failure-mode hooks: run the seller's command once when metering has failed for `after`, and
once when it recovers, so the product can apply the failure mode declared for its listing.

The facts come from the ledger (`failing_since`, kept by the sender), so the decision survives
restarts: a hook that ran for one failure does not run again for it after a restart.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time

from agent.clock import Clock, iso
from agent.config.model import Config, Hook
from agent.ledger import Ledger

log = logging.getLogger(__name__)


class Hooks:
    def __init__(self, config: Config, ledger: Ledger, clock: Clock) -> None:
        self.config = config
        self.ledger = ledger
        self.clock = clock
        # One worker runs hooks in order, so a recovery never overtakes its failure.
        self._queue: queue.Queue[tuple[str, list[str], int, dict[str, str]]] = queue.Queue()
        self._worker: threading.Thread | None = None

    def check(self) -> str | None:
        """Run a hook if a transition is due; returns which one ran ("failure"/"recovery")."""
        failure, recovery = self.config.on_metering_failure, self.config.on_recovery
        if failure is None:
            return None
        state = self.ledger.send_state()
        failing_since, fired_for = state.failing_since, state.failure_hook_for
        now = self.clock.time()
        if failing_since is not None:
            if fired_for != failing_since and now - failing_since >= failure.after:
                self.ledger.note_failure_hook(failing_since)
                self._run("on_metering_failure", failure, failing_since)
                return "failure"
            return None
        if fired_for is not None:
            self.ledger.note_failure_hook(None)
            if recovery is not None:
                self._run("on_recovery", recovery, None)
            return "recovery"
        return None

    def _run(self, name: str, hook: Hook, failing_since: float | None) -> None:
        env = dict(os.environ)
        env["METERING_AGENT_EVENT"] = name
        env["METERING_AGENT_FAILING_SINCE"] = iso(failing_since) or ""
        env["METERING_AGENT_REASON"] = self.ledger.send_state().reason or ""
        env["METERING_AGENT_HEALTH_FILE"] = str(self.config.state_dir / "health.json")
        self._queue.put((name, list(hook.command), hook.timeout, env))
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="hooks", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                _execute(*job)
            finally:
                self._queue.task_done()

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for queued hooks to finish."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)


def _execute(name: str, command: list[str], timeout: int, env: dict[str, str]) -> None:
    log.warning("%s: running %s", name, command[0])
    try:
        result = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except FileNotFoundError:
        log.error("%s: command not found: %s", name, command[0])
        return
    except PermissionError:
        log.error("%s: not executable: %s", name, command[0])
        return
    except subprocess.TimeoutExpired:
        log.error("%s: %s ran over %d s and was killed", name, command[0], timeout)
        return
    first = (result.stderr or result.stdout).strip().splitlines()[:1]
    level = logging.INFO if result.returncode == 0 else logging.ERROR
    log.log(level, "%s: %s exited %d%s", name, command[0], result.returncode,
            f": {first[0]}" if first else "")  # fmt: skip
