"""Why the daemon is being stopped: a restart leaves the current hour open, anything else seals it.

A stop seals the partial hour and sends it at once, because after a shutdown, a power-off, a Spot
interruption or a task ending there may be no next start to seal it. A restart (`systemctl
restart`, a package upgrade's `try-restart`) has a next start seconds later; sealing then would
end the hour early, and the rest of a `max`/`avg`/`min`/`last` hour could never be billed.

systemd says which it is: while it stops a unit for a restart the unit's job has type `restart`;
for `systemctl stop`, `apt-get remove`, a reboot or a power-off it is `stop` (and late in a
shutdown the system bus is already gone). Seen under systemd 252 from inside the hardened unit,
as its unprivileged user over the system bus. So the hour stays open only on that positive
answer; any doubt (not under systemd, no bus, a timeout, an unexpected answer) seals, the safe
side of never losing a billable hour.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEMCTL_TIMEOUT = 5.0  # seconds; the answer comes in milliseconds or not at all
DEFAULT_UNIT = "metering-agent.service"

Runner = Callable[[list[str]], str]


def own_unit(cgroup: str) -> str | None:
    """The service unit this process runs in, from /proc/self/cgroup's text (v1 or v2)."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def job_type(list_jobs: str, unit: str) -> str | None:
    """`unit`'s job type in `systemctl list-jobs --no-legend` output (JOB UNIT TYPE STATE)."""
    for line in list_jobs.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == unit:
            return fields[2]
    return None


def _systemctl(args: list[str]) -> str:
    return subprocess.run(
        ["systemctl", *args],
        capture_output=True,
        text=True,
        timeout=SYSTEMCTL_TIMEOUT,
        check=True,
    ).stdout


def restarting(
    env: Mapping[str, str] | None = None,
    run: Runner = _systemctl,
    cgroup_file: Path = Path("/proc/self/cgroup"),
) -> bool:
    """True only when systemd is stopping this service as part of a restart."""
    env = os.environ if env is None else env
    if not env.get("INVOCATION_ID"):  # systemd sets it for every service it starts
        return False
    try:
        unit = own_unit(cgroup_file.read_text()) or DEFAULT_UNIT
        kind = job_type(run(["list-jobs", "--no-legend", "--no-pager", unit]), unit)
    except subprocess.CalledProcessError as e:  # no system bus (late in a shutdown), no systemd
        why = (e.stderr or "").strip() or f"exit status {e.returncode}"
        log.info("cannot ask systemd why it stops the agent (%s): treating it as a stop", why)
        return False
    except (OSError, subprocess.SubprocessError) as e:
        log.info("cannot ask systemd why it stops the agent (%s): treating it as a stop", e)
        return False
    log.info("systemd job for %s: %s", unit, kind or "none")
    return kind == "restart"
