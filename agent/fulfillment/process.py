"""The fulfillment handler as a child of `run` (`metering-agent serve-registration`): started
with the daemon, started again (at most once a minute) if it exits, ended at its stop. The
daemon stays free of boto3, which only the child loads for ResolveCustomer."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from agent.clock import Clock

log = logging.getLogger(__name__)

RESTART_AFTER = 60.0  # seconds between starts of a handler child that keeps exiting
GRACE = 5.0


class HandlerProcess:
    """`metering-agent serve-registration`, a child of `run`: started with the daemon, started
    again (at most once a minute) if it exits, ended at the daemon's stop. The daemon stays free
    of boto3, which only the child loads for ResolveCustomer."""

    def __init__(
        self,
        command: list[str],
        monotonic: Callable[[], float],
        popen: Callable[[list[str]], subprocess.Popen[bytes]] = subprocess.Popen,
        name: str = "fulfillment handler",
    ) -> None:
        """`name`: what the log calls it (the same keeping serves SaaS mode's subscription
        queue child, `watch-subscriptions`)."""
        self.command, self.monotonic, self.popen, self.name = command, monotonic, popen, name
        self._child: subprocess.Popen[bytes] | None = None
        self._started: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Start the handler unless it runs; a child that exited is named and started again."""
        with self._lock:
            if self._closed:
                return
            if self._child is not None:
                code = self._child.poll()
                if code is None:
                    return
                log.error("%s process %d exited %d; starting it again", self.name,
                          self._child.pid, code)  # fmt: skip
                self._child = None
            now = self.monotonic()
            if self._started is not None and now - self._started < RESTART_AFTER:
                return
            self._child = self.popen(self.command)
            self._started = now

    def restart(self) -> None:
        """After a reload: the child reads the running config only when it starts."""
        with self._lock:
            child, self._child, self._started = self._child, None, None
        if child is not None:
            _end(child)
        self.ensure()

    def stop(self) -> None:
        with self._lock:
            child, self._child, self._closed = self._child, None, True
        if child is not None:
            _end(child)


def _end(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def handler_command(
    config: Path, clock: Clock, log_format: str, command: str = "serve-registration"
) -> list[str]:
    """The child's command line: the running config, this process's logging and clock."""
    cmd = [sys.executable, "-m", "agent", command, "-c", str(Path(config).resolve())]
    cmd += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    cmd += ["--log-format", log_format]
    cmd += ["--clock", clock.spec] if clock.spec else []
    return cmd
