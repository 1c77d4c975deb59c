"""The `metering-agent send` child of `run`: at most one at a time, never waited for by a job.

Why a child: boto3's memory is held only while sending. Ending one at any point is safe: the
ledger counts an attempt before its request leaves, and the next sender resends it identically.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from agent.clock import Clock

log = logging.getLogger(__name__)

SENDER_TIMEOUT = 600  # a send child that runs longer than this is ended (it is safe to)
STOP_FLUSH = 30  # seconds the stop flush may spend sending
GRACE = 5.0  # seconds between asking a child to stop (SIGTERM) and killing it
Popen = Callable[[list[str]], "subprocess.Popen[bytes]"]


def send_command(
    config: Path, clock: Clock, log_format: str, flush: bool, deadline: float | None
) -> list[str]:
    """The child's command line: the running config, this process's logging and clock."""
    cmd = [sys.executable, "-m", "agent", "send", "-c", str(Path(config).resolve())]
    cmd += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    cmd += ["--log-format", log_format]
    if flush:
        cmd.append("--flush")
    if deadline is not None:
        cmd += ["--deadline", repr(deadline)]
    if clock.spec:
        cmd += ["--clock", clock.spec]
    return cmd


def end(child: subprocess.Popen[bytes], grace: float = GRACE) -> int:
    """Ask a child to stop (SIGTERM); kill it if it has not after `grace` seconds."""
    child.terminate()
    try:
        return child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


class SenderProcess:
    """Starts, reaps and ends the send child. `command(flush, deadline)` is its command line,
    `popen` starts it (subprocess.Popen; a fake in tests), `monotonic` times it."""

    def __init__(
        self,
        command: Callable[[bool, float | None], list[str]],
        monotonic: Callable[[], float],
        popen: Popen = subprocess.Popen,
    ) -> None:
        self.command, self.monotonic, self.popen = command, monotonic, popen
        self._child: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start a sender of the hours due now; returns at once (`running` reaps it later)."""
        with self._lock:
            self._child = self.popen(self.command(False, None))
            self._started = self.monotonic()

    def running(self) -> bool:
        """Whether a sender still runs: a finished one is reaped, one over its time ended."""
        with self._lock:
            child = self._child
            if child is None:
                return False
            code = child.poll()
            if code is None and self.monotonic() - self._started <= SENDER_TIMEOUT:
                return True
            self._child = None
            if code is None:
                log.error("send process %d ran over %d s; ending it", child.pid, SENDER_TIMEOUT)
                end(child)
            elif code not in (0, 69, 77):  # 69/77: retry later / paused, already in health
                log.error("send process %d exited %d; pending hours stay pending", child.pid, code)
            return False

    def flush(self, deadline: float) -> int:
        """Send every pending hour in a child, waited for (the stop flush); its exit code."""
        child = self.popen(self.command(True, deadline))
        try:
            return child.wait(timeout=STOP_FLUSH + 10)
        except subprocess.TimeoutExpired:
            log.error("the stop flush ran over %d s; ending it", STOP_FLUSH + 10)
            return end(child)

    def stop(self, grace: float = GRACE) -> None:
        """At the daemon's stop: a running sender may finish within `grace`, then it is ended."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            end(child, grace)
