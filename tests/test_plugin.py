"""The worked third-party collector in tests/example_plugin, loaded through its entry point."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from agent.collectors import GROUP, Registry
from tests.conftest import PRODUCT, run_cli


@pytest.fixture(autouse=True)
def installed() -> None:
    names = {ep.name for ep in entry_points(group=GROUP)}
    assert "file_value" in names, (
        "the example plugin is not installed: pip install -e tests/example_plugin"
    )


def test_registry_finds_the_plugin_by_entry_point() -> None:
    cls = Registry().get("file_value", "x")
    assert cls.__module__ == "metering_agent_example"


def test_the_plugin_bills_like_a_built_in(tmp_path: Path) -> None:
    seats = tmp_path / "seats"
    seats.write_text("12\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"""product_code: {PRODUCT}
state_dir: {tmp_path / "state"}
dimensions:
  - name: seats
    collector: {{type: file_value, path: {seats}}}
"""
    )
    result = run_cli("sample", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seats 12  (raw 12, max)")
    seats.write_text("not a number")
    result = run_cli("sample", "-c", str(config))
    assert "warning [collector_failed] seats:" in result.stderr and "not a number" in result.stderr


def test_plugin_options_are_validated_by_the_agent(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: s\n    collector: {{type: file_value, path: relative}}\n"
    )
    result = run_cli("check", "--offline", "-c", str(config))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        'metering-agent: dimensions[0].collector.path: "relative" is not valid: expected an absolute path'
    )
