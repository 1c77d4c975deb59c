"""`check`'s warnings (valid configs that bill what a seller rarely means) and the listing of every
config error at once."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.errors import EX_CONFIG, EX_OK
from agent.host import access
from tests.conftest import PRODUCT, ConfigWriter, run_cli


def check_offline(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str]]:
    """Exit code, the config's warning lines (traps) and the other warning lines (collectors) of
    `check --offline`."""
    code = cli.main(["check", "--offline", "-c", str(path)])
    out = capsys.readouterr().out.splitlines()
    traps = ("warning [loopback_endpoint] ", "warning [rounding_up] ")
    return (
        code,
        [line for line in out if line.startswith(traps)],
        [line for line in out if line.startswith("warning [") and not line.startswith(traps)],
    )


def _config(write_config: ConfigWriter, metering: str = "", dimension: str = "") -> Path:
    return write_config(
        f"""
product_code: {PRODUCT}
metering: {{{metering}}}
dimensions:
  - name: api_requests
    collector: {{type: system, metric: cpu_count}}
{dimension}
"""
    )


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://127.0.0.1:8787", True),
        ("http://127.3.4.5:8787", True),
        ("http://[::1]:8787", True),
        ("http://localhost:8787", True),
        ("https://metering.marketplace.us-east-1.amazonaws.com", False),
        ("https://vpce-0abc.metering.marketplace.us-east-1.vpce.amazonaws.com", False),
    ],
)
def test_a_loopback_endpoint_is_a_warning(
    write_config: ConfigWriter, capsys: pytest.CaptureFixture[str], endpoint: str, warned: bool
) -> None:
    code, warnings, _ = check_offline(
        _config(write_config, metering=f"endpoint_url: '{endpoint}'"), capsys
    )
    assert code == EX_OK
    assert [w for w in warnings if "endpoint_url" in w and endpoint in w] == (
        [warnings[0]] if warned else []
    )


@pytest.mark.parametrize(
    ("dimension", "warned"),
    [
        ("    scale: 0.001\n    rounding: up", True),
        ("    scale: '0.001'\n    rounding: up", True),
        ("    scale: 0.0001\n    rounding: up\n    decimals: 2", True),  # below the 0.01 step
        ("    scale: 0.001\n    rounding: up\n    decimals: 3", False),
        ("    scale: 0.001\n    rounding: nearest", False),
        ("    scale: 0.001\n    rounding: down", False),
        ("    scale: 1\n    rounding: up", False),
    ],
)
def test_up_rounding_below_the_billed_step_is_a_warning(
    write_config: ConfigWriter, capsys: pytest.CaptureFixture[str], dimension: str, warned: bool
) -> None:
    code, warnings, _ = check_offline(_config(write_config, dimension=dimension), capsys)
    assert code == EX_OK
    assert len([w for w in warnings if "dimensions[0].rounding" in w]) == int(warned)


def test_the_warning_says_what_three_bill(
    write_config: ConfigWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    _, warnings, _ = check_offline(
        _config(write_config, dimension="    scale: 0.001\n    rounding: up"), capsys
    )
    (warning,) = warnings
    assert "3 counted bill 1 " in warning  # the engine's own rounding of 3 x 0.001


# -- logs the service cannot read, judged against the real service user -------------------------


def _service_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root: check judges the service's access only when run as root")
    try:
        user = pwd.getpwnam(access.SERVICE_USER)
    except KeyError:
        pytest.skip(f"no {access.SERVICE_USER} user on this machine")
    if shutil.which("runuser") is None:
        pytest.skip("runuser is not installed")
    return user


@pytest.fixture
def srv_dir() -> Iterator[Path]:
    """A folder outside the sandbox's hidden trees (/home, /root, /tmp, /var/tmp)."""
    path = Path(tempfile.mkdtemp(prefix="metering-warn-", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def service_can_read(path: Path) -> bool:
    """The oracle: the real service user tries to read the file."""
    result = subprocess.run(
        ["runuser", "-u", access.SERVICE_USER, "--", "cat", str(path)],
        capture_output=True,
        timeout=10,
    )
    return result.returncode == 0


def test_as_root_each_log_the_service_user_cannot_read_is_a_warning(
    write_config: ConfigWriter, srv_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _service_user()
    readable, unreadable = srv_dir / "a.log", srv_dir / "b.log"
    for log in (readable, unreadable):
        log.write_text("GET /\n")
    readable.chmod(0o644)
    unreadable.chmod(0o600)
    path = write_config(
        f"""
product_code: {PRODUCT}
dimensions:
  - name: a
    collector: {{type: log, path: {readable}, pattern: GET}}
  - name: b
    collector: {{type: log, path: {unreadable}, pattern: GET}}
"""
    )
    code, _, warns = check_offline(path, capsys)
    assert code == EX_OK
    warned = {log for log in (readable, unreadable) if any(str(log) in w for w in warns)}
    assert warned == {log for log in (readable, unreadable) if not service_can_read(log)}
    assert warned == {unreadable}


def test_without_the_service_user_the_sandbox_hidden_paths_still_warn(
    write_config: ConfigWriter,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(access, "service_account", lambda: None)
    path = write_config(
        f"""
product_code: {PRODUCT}
dimensions:
  - name: home
    collector: {{type: log, path: /home/app/access.log, pattern: GET}}
  - name: varlog
    collector: {{type: log, path: /var/log/app/access.log, pattern: GET}}
"""
    )
    code, _, warns = check_offline(path, capsys)
    assert code == EX_OK
    hidden = [w for w in warns if "ProtectHome" in w]
    assert len(hidden) == 1 and "collector home:" in hidden[0]
    assert not [w for w in warns if "collector varlog:" in w and "ProtectHome" in w]


# -- every config error at once ------------------------------------------------------------------


def test_every_config_error_is_listed_on_its_own_line(write_config: ConfigWriter) -> None:
    path = write_config(
        f"""
product_code: {PRODUCT}
metering: {{send_window: 99999, bogus: 1}}
dimensions:
  - name: a
    collector: {{type: system, metric: cpu_count}}
    aggregate: median
  - name: b
    collector: {{type: system, metric: nope}}
  - name: c
    collector: {{type: log, path: /x, pattern: "("}}
    rounding: sideways
"""
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    expected = [
        "metering.bogus",
        "metering.send_window",
        "dimensions[0].aggregate",
        "dimensions[1].collector.metric",
        "dimensions[2].rounding",
        "dimensions[2].collector.pattern",
    ]
    assert lines[0].startswith(f"metering-agent: {path}: {len(expected)} errors")
    for key in expected:
        assert len([line for line in lines[1:] if line.strip().startswith(f"{key}:")]) == 1
    assert len(lines) == 1 + len(expected)


def test_a_duplicate_name_and_a_bad_collector_are_both_listed(write_config: ConfigWriter) -> None:
    path = write_config(
        f"""
product_code: {PRODUCT}
dimensions:
  - name: a
    collector: {{type: system, metric: cpu_count}}
  - name: a
    collector: {{type: system, metric: cpu_count, interval: 7}}
  - name: b
    collector: {{type: http}}
"""
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    body = result.stderr.strip().splitlines()[1:]
    assert any(line.strip().startswith("dimensions[1].name:") for line in body)
    assert any(line.strip().startswith("dimensions[1].collector.interval:") for line in body)
    assert any(line.strip().startswith("dimensions[2].collector.url:") for line in body)


def test_one_error_stays_one_line(write_config: ConfigWriter) -> None:
    path = write_config(f"product_code: {PRODUCT}\ndimensions: 5\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip() == "metering-agent: dimensions: expected a list; found 5"


@pytest.mark.parametrize("text", ["collector: {{type: http}}", "? [a, b]\n    : 1"])
def test_a_mapping_or_list_as_a_key_is_one_line_not_a_traceback(
    write_config: ConfigWriter, text: str
) -> None:
    path = write_config(f"product_code: {PRODUCT}\ndimensions:\n  - name: x\n    {text}\n")
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"metering-agent: {path}:") and "as a key" in line
