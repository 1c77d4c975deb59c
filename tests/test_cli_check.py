"""`check` and `sample` end to end: the real command, a real boto3 client, the emulator."""

from __future__ import annotations

import json
import os
import socket

import pytest

from agent.emulator import Emulator
from agent.errors import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE
from tests.conftest import ConfigWriter, run_cli


def env_for(emulator: Emulator) -> dict[str, str]:
    return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}


@pytest.mark.parametrize("style", ["error", "200"])
def test_check_passes_with_both_dry_run_styles(
    emulator: Emulator, write_config: ConfigWriter, style: str
) -> None:
    emulator.configure(dryrun_style=style)
    path = write_config(endpoint=emulator.url)
    result = run_cli("check", "-c", str(path), env=env_for(emulator))
    assert result.returncode == EX_OK, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("warning [")]
    assert [line.split()[0] for line in lines] == ["ok"] * 7  # platform, identity too
    assert (
        "warning [loopback_endpoint] metering.endpoint_url" in result.stdout
    )  # the emulator is on loopback
    assert "region us-east-1 (from IMDS placement/region)" in result.stdout
    assert "MeterUsage DryRun: permitted" in lines[-1]
    assert emulator.records() == []  # DryRun records nothing
    assert not (path.parent / "state").exists()  # check writes no state


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"authorized": False}, "aws-marketplace:MeterUsage"),
        ({"entitled": False}, "subscription"),
    ],
)
def test_check_not_authorized_exits_77(
    emulator: Emulator, write_config: ConfigWriter, settings: dict, needle: str
) -> None:
    emulator.configure(**settings)
    result = run_cli("check", "-c", str(write_config(endpoint=emulator.url)), env=env_for(emulator))
    assert result.returncode == EX_NOPERM
    (line,) = result.stderr.strip().splitlines()
    assert needle in line and "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_check_with_nothing_listening_exits_69(write_config: ConfigWriter) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result = run_cli(
        "check",
        "-c",
        str(write_config(endpoint=url)),
        env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": url},
    )
    assert result.returncode == EX_UNAVAILABLE
    (line,) = result.stderr.strip().splitlines()
    assert "IMDS" in line and "unreachable" in line


def test_check_service_down_but_imds_up_exits_69(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("check", "-c", str(write_config(endpoint=url)), env=env_for(emulator))
    assert result.returncode == EX_UNAVAILABLE
    assert "service unreachable" in result.stderr


def test_check_offline_needs_no_network(write_config: ConfigWriter) -> None:
    result = run_cli("check", "--offline", "-c", str(write_config()))
    assert result.returncode == EX_OK, result.stderr
    assert "collector vcpus: system ready" in result.stdout


def test_check_offline_warns_on_a_missing_source(write_config: ConfigWriter, tmp_path) -> None:
    path = write_config(
        f"""
        product_code: abcd1234efgh5678ijkl90mn
        dimensions:
          - name: disk
            collector: {{type: system, metric: disk_used_gib, path: {tmp_path / "not-mounted-yet"}}}
        """
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_OK
    assert (
        result.stdout.startswith("ok")
        and "warning [source_missing] collector disk: source missing" in result.stdout
    )


def test_check_bad_config_exits_78(write_config: ConfigWriter) -> None:
    path = write_config("product_code: x\ndimensions: 5\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip() == "metering-agent: dimensions: expected a list; found 5"


def test_sample_prints_one_line_per_dimension(write_config: ConfigWriter) -> None:
    path = write_config(
        """
        product_code: abcd1234efgh5678ijkl90mn
        dimensions:
          - name: vcpus
            collector: {type: system, metric: cpu_count}
          - name: egress
            collector: {type: system, metric: net_sent_bytes}
        """
    )
    result = run_cli("sample", "-c", str(path))
    assert result.returncode == EX_OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["vcpus", str(os.cpu_count())]
    assert lines[1].startswith("egress 0  (raw ")  # no baseline yet: a counter adds nothing


def test_schema_is_json() -> None:
    result = run_cli("schema")
    assert result.returncode == EX_OK
    assert json.loads(result.stdout)["title"] == "metering-agent config"


def test_version() -> None:
    from agent import __version__

    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"metering-agent {__version__}")


def test_check_dry_runs_every_dimension(
    emulator: Emulator, write_config: ConfigWriter, tmp_path
) -> None:
    """A typo in the second dimension fails `check` with 77 and names it."""
    emulator.configure(dimensions={"vcpus", "egress_gib"})
    path = write_config(
        f"""
        product_code: abcd1234efgh5678ijkl90mn
        state_dir: {tmp_path / "state"}
        metering: {{endpoint_url: "{emulator.url}"}}
        dimensions:
          - name: vcpus
            collector: {{type: system, metric: cpu_count}}
          - name: egress_gb
            collector: {{type: system, metric: cpu_count}}
        """
    )
    result = run_cli("check", "-c", str(path), env=env_for(emulator))
    assert result.returncode == EX_NOPERM, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "egress_gb" in line and "vcpus" not in line
    dry = [c["request"]["UsageDimension"] for c in emulator.received()]
    assert dry == ["vcpus", "egress_gb"]
