"""`check` as root judges the seller's logs as the service's user and sandbox would meet them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.errors import EX_OK
from agent.host import access
from agent.host.access import Account
from tests.conftest import ConfigWriter

STRANGER = Account("metering-agent", 99_999, frozenset({99_998}))  # owns nothing here


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp root is 0700, closed to a stranger)."""
    path = Path(tempfile.mkdtemp(prefix="metering-access-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_other_bits_decide_for_a_user_that_owns_nothing(open_dir: Path) -> None:
    log = open_dir / "app.log"
    log.write_text("x\n")
    open_dir.chmod(0o755)
    log.chmod(0o600)
    problem = access.path_problem(str(log), STRANGER, sandboxed=False)
    assert problem is not None and "cannot read" in problem and "0600" in problem
    log.chmod(0o644)
    assert access.path_problem(str(log), STRANGER, sandboxed=False) is None


def test_a_closed_folder_on_the_way_is_named(open_dir: Path) -> None:
    folder = open_dir / "private"
    folder.mkdir(mode=0o700)
    log = folder / "app.log"
    log.write_text("x\n")
    log.chmod(0o644)
    problem = access.path_problem(str(log), STRANGER, sandboxed=False)
    assert problem is not None and "cannot enter" in problem and str(folder) in problem


def test_the_folder_must_be_listable_to_find_rotated_copies(open_dir: Path) -> None:
    folder = open_dir / "logs"
    folder.mkdir()
    log = folder / "app.log"
    log.write_text("x\n")
    log.chmod(0o644)
    folder.chmod(0o711)  # enterable, not listable
    problem = access.path_problem(str(log), STRANGER, sandboxed=False)
    assert problem is not None and "rotated copies" in problem
    folder.chmod(0o755)


def test_group_bits_apply_to_the_units_groups(open_dir: Path) -> None:
    log = open_dir / "app.log"
    log.write_text("x\n")
    log.chmod(0o640)
    open_dir.chmod(0o755)
    gid = log.stat().st_gid
    member = Account("metering-agent", 99_999, frozenset({gid}))
    assert access.path_problem(str(log), member, sandboxed=False) is None
    assert access.path_problem(str(log), STRANGER, sandboxed=False) is not None


@pytest.mark.parametrize(
    ("path", "hidden"),
    [
        ("/home/app/access.log", "ProtectHome"),
        ("/root/app.log", "ProtectHome"),
        ("/tmp/app.log", "PrivateTmp"),
        ("/var/tmp/x/app.log", "PrivateTmp"),
        ("/var/log/app/access.log", None),
        ("/homestead/app.log", None),
    ],
)
def test_paths_the_sandbox_hides(path: str, hidden: str | None) -> None:
    why = access.hidden_by_sandbox(path)
    assert (why is None) if hidden is None else (why is not None and hidden in why)


def test_a_file_that_is_not_there_yet_is_judged_by_its_folder(open_dir: Path) -> None:
    folder = open_dir / "later"
    folder.mkdir(mode=0o700)
    problems = access.log_problems(str(folder / "app.log"), None, STRANGER, sandboxed=False)
    assert len(problems) == 1 and "cannot list" in problems[0]


def _check_as_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], path: Path
) -> tuple[int, list[str]]:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(access, "service_account", lambda: STRANGER)
    code = cli.main(["check", "--offline", "-c", str(path)])
    return code, [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("warning [")
    ]


def _log_config(write_config: ConfigWriter, log: Path) -> Path:
    return write_config(
        f"""
        product_code: abcd1234efgh5678ijkl90mn
        dimensions:
          - name: api_requests
            collector: {{type: log, path: {log}, pattern: GET}}
        """
    )


def test_check_as_root_warns_of_a_log_the_service_cannot_read(
    write_config: ConfigWriter,
    open_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = open_dir / "access.log"
    log.write_text("GET /\n")
    log.chmod(0o600)
    open_dir.chmod(0o755)
    monkeypatch.setattr(access, "HIDDEN", ())  # /var/tmp is hidden too: judge the bits alone
    code, warnings = _check_as_root(monkeypatch, capsys, _log_config(write_config, log))
    assert code == EX_OK  # a warning, not a failure
    assert len(warnings) == 1 and "api_requests" in warnings[0] and str(log) in warnings[0]
    log.chmod(0o644)
    code, warnings = _check_as_root(monkeypatch, capsys, _log_config(write_config, log))
    assert (code, warnings) == (EX_OK, [])


def test_check_as_root_warns_of_a_log_in_tmp(
    write_config: ConfigWriter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if access.hidden_by_sandbox(str(tmp_path.resolve())) is None:
        pytest.skip(f"pytest's tmp_path {tmp_path} is not under /tmp here")
    log = tmp_path / "access.log"
    log.write_text("GET /\n")
    log.chmod(0o644)
    code, warnings = _check_as_root(monkeypatch, capsys, _log_config(write_config, log))
    assert code == EX_OK
    assert len(warnings) == 1 and "PrivateTmp" in warnings[0]
