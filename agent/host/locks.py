"""The agent's locks. `StateLock`: one `run` per state directory (`<state_dir>/lock`, and
`send.lock` for one sender at a time); its file says which process holds it ("PID VERSION").

`ProductLock`: one sender per product per machine: `run` holds `<run dir>/<product_code>.lock`.
Two agents for one product on one instance (a seller's test run with its own state_dir beside the
service) would both bill the same {instance, dimension, hour}. The state lock cannot see that, since
each has its own state dir; this lock lives in the unit's `RuntimeDirectory=metering-agent`
(`/run/metering-agent`, or `$METERING_AGENT_RUN_DIR`). Where that directory cannot be created the
lock is skipped with a warning; an endpoint on loopback (the emulator) bills nothing, so a trial
beside the service takes no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from agent.errors import LockHeld
from agent.host import ownership

log = logging.getLogger(__name__)

RUN_DIR = "/run/metering-agent"
RUN_DIR_ENV = "METERING_AGENT_RUN_DIR"


def run_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(RUN_DIR_ENV) or RUN_DIR)


def is_loopback(endpoint_url: str | None) -> bool:
    """Whether MeterUsage goes to this machine (the emulator): nothing real is billed there."""
    if not endpoint_url:
        return False
    host = urlsplit(endpoint_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProductLock:
    """An exclusive flock on `<run dir>/<product_code>.lock` naming the holder's config."""

    def __init__(self, product_code: str, config_path: Path, directory: Path | None = None) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", product_code)
        self.path = (directory or run_dir()) / f"{safe}.lock"
        self.product_code = product_code
        self.config_path = config_path
        self._file: IO[str] | None = None
        # When an earlier run for the product last wrote the lock (None: none did). The run dir
        # is a tmpfs kept until the next boot (RuntimeDirectoryPreserve=yes), so this is the trace
        # of an earlier run in this boot that survives its state dir.
        self.written_before: float | None = None

    def acquire(self) -> bool:
        """Hold the lock for this process's lifetime; False (with a warning) where it cannot be
        created; LockHeld when another agent for the product holds it."""
        with contextlib.suppress(OSError):
            self.written_before = self.path.stat().st_mtime
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = self._open()
        except OSError as e:
            log.warning(
                "cannot create %s (%s): not guarding against a second agent for product %s "
                "(the unit's RuntimeDirectory=metering-agent provides it)",
                self.path,
                e.strerror,
                self.product_code,
            )
            return False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip().splitlines()
            f.close()
            config = holder[1] if len(holder) > 1 else "an unknown config"
            pid = holder[0] if holder else "?"
            raise LockHeld(
                f"another metering-agent (pid {pid}, config {config}) already sends for product "
                f"{self.product_code} on this machine ({self.path}); stop it first, or point "
                "this one's metering.endpoint_url at the emulator for a trial"
            ) from None
        if f.writable():
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n{self.config_path}\n")
            f.flush()
        self._file = f
        return True

    def _open(self) -> IO[str]:
        """Open for writing (readable by all, whatever the umask, so another user's agent can
        still see it is held); a file another user created is locked through a read-only open."""
        try:
            f = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        except PermissionError:
            return open(self.path)
        with contextlib.suppress(OSError):
            os.fchmod(f.fileno(), 0o644)
        return f


PROBE_TRIES = 20  # x 25 ms: how long a start waits out a `status` probe of the state lock


def _flock(f: IO[str], wait: bool) -> None:
    """flock, or BlockingIOError; a probe (`status`, `prepare-image`) holds the lock for a
    moment, so a start that meets one tries again for up to half a second."""
    for _ in range(PROBE_TRIES - 1):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return
        except BlockingIOError:
            time.sleep(0.025)
    fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))


class StateLock:
    """An exclusive flock on <state_dir>/lock: one `run` per state directory; the file says which
    process holds it and its version ("PID VERSION")."""

    def __init__(self, state_dir: Path, name: str = "lock") -> None:
        self.path = state_dir / name
        self._file: IO[str] | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock for this process's lifetime; `wait` blocks instead of failing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        ownership.adopt(self.path.parent, self.path)
        try:
            _flock(self._file, wait)
        except BlockingIOError:
            self._file.close()
            raise LockHeld(
                f"another metering-agent run holds {self.path}; stop it first "
                "(systemctl stop metering-agent)"
            ) from None
        from agent import __version__  # here: keeps this edit off the module's imports

        # read by `status`; unbuffered, and skipped on a full disk (the lock is the flock, the
        # text only says who holds it): a sender must still start to send what is pending
        with contextlib.suppress(OSError):
            fd = self._file.fileno()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {__version__}\n".encode(), 0)
