"""Under systemd: journald lines without our own timestamp, and a quiet ExecStartPre."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, run_cli

LOG_ONE = (
    "import logging; from agent.cli import setup_logging; setup_logging('info'); "
    "logging.getLogger('agent').warning('hour %s dimension %s: late', '08:00Z', 'vcpus'); "
    "logging.getLogger('agent').info('sealed')"
)


def _log_to_file(tmp_path: Path, journal_stream: str | None) -> list[str]:
    """Run a process that logs two lines to `stderr.txt`, with $JOURNAL_STREAM as given
    ('self' for the device:inode of that very file, as systemd sets it)."""
    path = tmp_path / "stderr.txt"
    with open(path, "w") as err:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream == "self":
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", LOG_ONE], stderr=err, env=env, cwd=ROOT, check=True)
    return path.read_text().splitlines()


def test_each_line_of_a_multi_line_event_keeps_its_priority() -> None:
    import logging

    from agent.host.logs import JournalFormatter

    record = logging.LogRecord("agent", logging.ERROR, "", 0, "reload failed: %s", ("a\nb",), None)
    assert JournalFormatter().format(record).splitlines() == [
        "<3>ERROR reload failed: a",
        "<3>b",
    ]


def test_journal_lines_carry_priority_and_no_timestamp(tmp_path: Path) -> None:
    assert _log_to_file(tmp_path, "self") == [
        "<4>WARNING hour 08:00Z dimension vcpus: late",
        "<6>INFO sealed",
    ]


def test_other_streams_keep_the_timestamp(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited, but stderr redirected elsewhere (or unset): a timestamp."""
    for stream in (None, "1:2"):
        lines = _log_to_file(tmp_path, stream)
        assert len(lines) == 2
        assert lines[0].endswith("WARNING hour 08:00Z dimension vcpus: late")
        assert lines[0][:4].isdigit() and not lines[0].startswith("<")


def test_quiet_offline_check_prints_nothing_when_all_is_well(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "product_code: p1\ndimensions:\n  - name: v\n    collector: {type: system, metric: cpu_count}\n"
    )
    result = run_cli("check", "--offline", "--quiet", "-c", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_quiet_offline_check_still_warns(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "product_code: p1\ndimensions:\n"
        "  - name: v\n    collector: {type: system, metric: cpu_count}\n"
        f"  - name: d\n    collector: {{type: system, metric: disk_used_gib, path: {tmp_path / 'no'}}}\n"
    )
    result = run_cli("check", "--offline", "--quiet", "-c", str(path))
    assert result.returncode == 0
    (line,) = result.stdout.splitlines()
    assert line.startswith("warning [source_missing] collector d: source missing")
