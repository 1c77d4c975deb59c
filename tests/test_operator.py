"""What support teams and auditors use: hooks, report, log output."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import pytest

from agent.commands.report import parse_when
from agent.daemon import hooks as hooks_module
from agent.daemon.hooks import Hooks
from agent.errors import UsageError
from agent.host.logs import JsonFormatter, Redact, redact
from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from tests.billing import H, make_config
from tests.conftest import run_cli
from tests.fakes import FakeClock, RecordingLog
from tests.test_sealing import fill

HOOKS = """
on_metering_failure:
  after: 2h
  command: [sh, -c, 'echo "$METERING_AGENT_EVENT $METERING_AGENT_FAILING_SINCE" >> {out}']
on_recovery:
  command: [sh, -c, 'echo "$METERING_AGENT_EVENT" >> {out}']
"""


def test_hooks_run_once_per_transition(tmp_path: Path) -> None:
    out = tmp_path / "hook.log"
    cfg = make_config(tmp_path, HOOKS.format(out=out))
    ledger = Ledger(cfg.state_dir)
    clock = FakeClock(H)
    hooks = Hooks(cfg, ledger, clock)
    assert hooks.check() is None
    ledger.note_failure(H, "ThrottlingException")  # what the sender records at the first failure
    clock.advance(7199)
    assert hooks.check() is None  # not before two hours
    clock.advance(1)
    assert hooks.check() == "failure"
    assert hooks.check() is None  # once per transition
    assert Hooks(cfg, ledger, clock).check() is None  # not again after a restart
    ledger.note_success(H + 7300)  # a send succeeded
    assert hooks.check() == "recovery"
    assert hooks.check() is None
    hooks.wait(10)
    assert out.read_text().splitlines() == [
        "on_metering_failure 2027-01-15T08:00:00Z",
        "on_recovery",
    ]


def test_short_failures_run_no_hook(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, HOOKS.format(out=tmp_path / "x"))
    ledger = Ledger(cfg.state_dir)
    clock = FakeClock(H)
    hooks = Hooks(cfg, ledger, clock)
    ledger.note_failure(H, "ThrottlingException")
    clock.advance(600)
    hooks.check()
    ledger.note_success(H + 600)
    assert hooks.check() is None  # nothing fired, so there is nothing to recover from


def test_a_missing_hook_command_is_logged_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "recovered"
    cfg = make_config(
        tmp_path,
        "on_metering_failure: {after: 0, command: [/nonexistent/cmd]}\n"
        f"on_recovery: {{command: [touch, '{out}']}}\n",
    )
    journal = RecordingLog()
    monkeypatch.setattr(hooks_module, "log", journal)
    ledger = Ledger(cfg.state_dir)
    ledger.note_failure(H, "ThrottlingException")
    hooks = Hooks(cfg, ledger, FakeClock(H))
    assert hooks.check() == "failure"
    hooks.wait(10)
    assert [args for args in journal.at("error") if "/nonexistent/cmd" in args] != []
    ledger.update_meta(failing_since=None)
    assert hooks.check() == "recovery"  # the worker that met the missing command goes on
    hooks.wait(10)
    assert out.exists()


def billed_ledger(tmp_path: Path) -> Path:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    for hour in (H, H + 3600):
        fill(ledger, "vcpus", hour, 3)
    seal_hours(ledger, cfg, H + 7200, offset=0)
    ledger.mark_sent("vcpus", H, record_id="rec-1", now=H + 3700)
    ledger.mark_sent("vcpus", H + 3600, record_id="rec-2", now=H + 7300)
    ledger.close()
    return tmp_path / "config.yaml"


def test_report_formats(tmp_path: Path) -> None:
    config = billed_ledger(tmp_path)
    result = run_cli(
        "report",
        "-c",
        str(config),
        "--since",
        "2027-01-15",
        "--until",
        "2027-01-16",
        "--format",
        "csv",
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["hour"], r["quantity"], r["record_id"]) for r in rows] == [
        ("2027-01-15T08:00Z", "2", "rec-1"),
        ("2027-01-15T09:00Z", "2", "rec-2"),
    ]
    result = run_cli(
        "report", "-c", str(config), "--since", "2027-01-15T09:00Z", "--format", "json"
    )
    assert [r["record_id"] for r in json.loads(result.stdout)] == ["rec-2"]
    result = run_cli("report", "-c", str(config), "--since", "2027-01-15")
    assert "rec-1" in result.stdout and "vcpus: 4" in result.stdout


def test_report_bad_since_is_one_line(tmp_path: Path) -> None:
    config = billed_ledger(tmp_path)
    result = run_cli("report", "-c", str(config), "--since", "last tuesday")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--since 'last tuesday': expected a duration ago" in line


def test_parse_when() -> None:
    assert parse_when("24h", H, "--since") == H - 86400
    assert parse_when("2w", H, "--since") == H - 14 * 86400
    assert parse_when("2027-01-15T08:00:00", H, "--since") == H
    with pytest.raises(UsageError):
        parse_when("soon", H, "--since")


@pytest.mark.parametrize(
    "secret",
    [
        "ASIAEMULATOREXAMPLE1",
        "aws_secret_access_key=emulatorsecretkeyemulatorsecretkey000000",
        "X-Amz-Security-Token: emulator-session-token",
        "x-aws-ec2-metadata-token: emulator-imds-token-abc",
        '"Token": "emulator-session-token"',
    ],
)
def test_secrets_are_redacted(secret: str) -> None:
    clean = redact(f"request failed: {secret} end")
    for word in (
        "EMULATOREXAMPLE1",
        "emulatorsecretkey",
        "emulator-session-token",
        "emulator-imds-token-abc",
    ):
        assert word not in clean


def test_json_log_lines() -> None:
    record = logging.LogRecord(
        "agent.x",
        logging.WARNING,
        __file__,
        1,
        "hour %s dimension %s: %s",
        ("2027-01-15T08:00Z", "vcpus", "ASIAEMULATOREXAMPLE1"),
        None,
    )
    Redact().filter(record)
    data = json.loads(JsonFormatter().format(record))
    assert data["level"] == "warning" and data["logger"] == "agent.x"
    assert data["message"] == "hour 2027-01-15T08:00Z dimension vcpus: ASIA****"


def test_status_table_shows_health_dimensions_and_hours(tmp_path: Path) -> None:
    config = billed_ledger(tmp_path)
    ledger = Ledger(tmp_path / "state")
    ledger.record_collector_error("vcpu_hours", H + 7300, "source missing: no file")
    ledger.authorize()
    ledger.note_failure(H + 7000, "ThrottlingException: slow down")
    ledger.close()
    result = run_cli("status", "-c", str(config), "--hours", "100000")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "metering health: FAILING since 2027-01-15T09:56:40Z: ThrottlingException: slow down" in out
    )
    assert "errors 1 (last: source missing: no file)" in out
    assert "2027-01-15T08:00Z  vcpus      2         sent   rec-1" in out
    data = json.loads(run_cli("status", "--json", "-c", str(config), "--hours", "100000").stdout)
    assert data["health"]["ok"] is False and data["health"]["pending_hours"] == 0
    assert [h["record_id"] for h in data["hours"]] == ["rec-1", "rec-2"]
    assert next(d for d in data["dimensions"] if d["name"] == "vcpu_hours")["collector_errors"] == 1


def test_status_before_the_first_run(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    result = run_cli("status", "-c", str(cfg.source))
    assert result.returncode == 0
    assert "no ledger yet" in result.stdout


@pytest.mark.parametrize("command", [["status"], ["report", "--since", "1d"], ["sample"]])
def test_a_damaged_ledger_is_one_line(tmp_path: Path, command: list[str]) -> None:
    cfg = make_config(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / "ledger.db").write_bytes(b"this is not a database" * 100)
    result = run_cli(*command, "-c", str(cfg.source))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "ledger" in line and "Traceback" not in result.stderr
