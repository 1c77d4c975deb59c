"""The package's static facts: one version everywhere, the unit's contract with the agent."""

from __future__ import annotations

import re

from agent import __version__
from tests.conftest import ROOT


def test_debian_changelog_carries_the_package_version() -> None:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert re.match(rf"^metering-agent \({re.escape(__version__)}\) ", first)


def test_man_page_names_the_version() -> None:
    assert f'"metering-agent {__version__}"' in (ROOT / "debian" / "metering-agent.1").read_text()


def test_unit_matches_what_the_agent_does() -> None:
    unit = (ROOT / "packaging" / "metering-agent.service").read_text()
    for line in [
        "Type=notify",
        "ExecStartPre=/usr/bin/metering-agent check --offline --quiet",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/bin/metering-agent run",
        "RestartPreventExitStatus=78",
        "StateDirectory=metering-agent",
        "ProtectSystem=strict",
        "UMask=0077",
    ]:
        assert f"\n{line}\n" in unit, line
    timeout = int(re.search(r"\nTimeoutStopSec=(\d+)\n", unit).group(1))  # type: ignore[union-attr]
    from agent.daemon.sender import STOP_FLUSH

    assert timeout > STOP_FLUSH + 10  # the stop flush and its sender child fit


def test_pinned_requirements_cover_the_runtime_dependencies() -> None:
    pins = {
        line.split("==")[0].lower()
        for line in (ROOT / "packaging" / "requirements.txt").read_text().splitlines()
        if "==" in line
    }
    assert {"boto3", "botocore", "psutil", "apscheduler", "pyyaml"} <= pins


def test_the_sleep_hook_is_installed_by_both_packagings() -> None:
    """systemd-sleep runs only executables; Debian 12's reads /lib/systemd/system-sleep."""
    hook = ROOT / "packaging" / "system-sleep" / "metering-agent"
    assert hook.stat().st_mode & 0o111 == 0o111
    text = hook.read_text()
    for python in ("/usr/lib/metering-agent/bin/python3", "/opt/metering-agent/bin/python3"):
        assert python in text  # the .deb's venv, install.sh's
    rules = (ROOT / "debian" / "rules").read_text()
    assert "debian/metering-agent/lib/systemd/system-sleep/metering-agent" in rules
    assert (
        '"$ROOT/packaging/system-sleep/metering-agent" "$DESTDIR$SLEEP_HOOK"'
        in (ROOT / "packaging" / "install.sh").read_text()
    )
