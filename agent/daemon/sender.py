"""The `metering-agent send` child: `run` starts one when work is due and never waits for it
(boto3 lives only there); at most one at a time, ended after its time, and the stop flush."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from agent.clock import Clock

log = logging.getLogger(__name__)

STOP_FLUSH = 30  # seconds the stop flush may spend sending
SENDER_TIMEOUT = 600  # a send child that runs longer than this is ended (it is safe to)
GRACE = 5.0  # seconds between asking a child to stop (SIGTERM) and killing it


def send_command(
    config: Path, clock: Clock, log_format: str, flush: bool, deadline: float | None
) -> list[str]:
    """The child's command line: the running config, this process's logging and clock."""
    cmd = [sys.executable, "-m", "agent", "send", "-c", str(Path(config).resolve())]
    cmd += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    cmd += ["--log-format", log_format]
    cmd += ["--flush"] if flush else []
    cmd += ["--deadline", repr(deadline)] if deadline is not None else []
    cmd += ["--clock", clock.spec] if clock.spec else []
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
    """The `metering-agent send` child: at most one at a time, never waited for by a job; ending
    it at any point is safe (the ledger counts an attempt before its request leaves, and the
    next sender resends it identically). `command(flush, deadline)` is its command line, `popen`
    starts it (subprocess.Popen; a fake in tests), `monotonic` times it."""

    def __init__(
        self,
        command: Callable[[bool, float | None], list[str]],
        monotonic: Callable[[], float],
        popen: Callable[[list[str]], subprocess.Popen[bytes]] = subprocess.Popen,
    ) -> None:
        self.command, self.monotonic, self.popen = command, monotonic, popen
        self._child: subprocess.Popen[bytes] | None = None
        self._exit: int | None = None  # the last reaped child's code, until take_exit
        self._started = 0.0
        self._flushing = False  # the running child sends every pending record (start_flush)
        self._closed = False  # stopped: a send tick still running starts nothing more
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start a sender of the hours due now; returns at once (`running` reaps it later).
        Not while another child runs (the send tick and the send slot's job can race)."""
        with self._lock:
            if self._closed:  # it would hold send.lock against the stop flush
                return
            if self._child is not None and self._child.poll() is None:
                return
            self._child = self.popen(self.command(False, None))
            self._started, self._flushing = self.monotonic(), False

    def start_flush(self, deadline: float) -> bool:
        """Start a sender of every pending record now, ignoring send slots, until `deadline`
        (clock time); returns at once: the send before a sleep and after a resume
        (daemon/wake.py). A running sender of what was due is ended first (safe: see the class
        docstring). False while a flush already runs or another child took its place: ask again.
        """
        with self._lock:
            if self._closed:  # stopping: the stop flush sends them
                return True
            child = self._child
            code = None if child is None else child.poll()
            if child is not None and code is None and self._flushing:
                return False
            if code is not None:  # finished, not yet reaped: its code, as `running` keeps it
                self._exit = code
        if child is not None and code is None:
            log.info("ending send process %d: a flush of every pending hour replaces it", child.pid)
            end(child)  # outside the lock: `running` and `stop` must not wait on it
        with self._lock:
            if self._closed:
                return True
            if self._child is not None and self._child is not child:
                return False  # the send tick started one meanwhile
            self._child = self.popen(self.command(True, deadline))
            self._started, self._flushing = self.monotonic(), True
            return True

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
            self._exit = code
        if code is None:  # ended outside the lock: `stop` must not wait on it
            log.error("send process %d ran over %d s; ending it", child.pid, SENDER_TIMEOUT)
            end(child)
        elif code not in (0, 69, 77):  # 69/77: retry later / paused, already in health
            log.error("send process %d exited %d; pending hours stay pending", child.pid, code)
        return False

    def take_exit(self) -> int | None:
        """The exit code of the last child reaped since the last call (None: none)."""
        with self._lock:
            code, self._exit = self._exit, None
        return code

    def flush(self, deadline: float, wait: float = STOP_FLUSH + 10, grace: float = GRACE) -> int:
        """Send every pending hour in a child, waited for `wait` s at most (the stop flush);
        its exit code. An hour whose request was in flight when the child is ended stays
        pending, and its identical request is sent again after the next start."""
        child = self.popen(self.command(True, deadline))
        try:
            return child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.error("the stop flush ran over %.0f s; ending it", wait)
            return end(child, grace)

    def stop(self, grace: float = GRACE, at_once: bool = False) -> None:
        """At the daemon's stop: a running sender may finish within `grace`, then it is ended
        (`at_once`: ended now, the container's short grace)."""
        with self._lock:
            child, self._child, self._closed = self._child, None, True
        if child is None:
            return
        if at_once:
            end(child, 1.0)
            return
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            end(child, grace)
