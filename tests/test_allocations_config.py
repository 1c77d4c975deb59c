"""`allocations: {tags: {TagKey: label}}` on a dimension: what loads, and the one-line errors."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.collectors import Collector, Reading, Registry
from agent.errors import EX_CONFIG, ConfigError
from tests.conftest import PRODUCT, run_cli


class TenantCounter(Collector):
    """A collector that says which labels it produces (as the log collector does for a
    pattern's named groups)."""

    type_name = "tenants"
    produces = "increment"

    def labels(self) -> frozenset[str] | None:
        return frozenset({"tenant", "project"})

    def read(self, state: dict[str, Any] | None) -> Reading:
        return Reading(Decimal(0))


def load(tmp_path: Path, tags: str, collector: str = "{type: tenants}") -> config.Config:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            dimensions:
              - name: api
                collector: {collector}
                allocations:
                  tags: {tags}
            """
        )
    )
    registry = Registry()
    registry.register("tenants", TenantCounter)
    return config.load(path, registry)


def error_of(tmp_path: Path, tags: str, collector: str = "{type: tenants}") -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, tags, collector)
    return str(info.value)


def test_tags_map_keys_to_labels(tmp_path: Path) -> None:
    cfg = load(tmp_path, "{Tenant: tenant, 'Cost center/Project': project}")
    assert cfg.dimensions[0].allocations == {"Tenant": "tenant", "Cost center/Project": "project"}
    plain = config.load(Path(__file__).parent.parent / "config.example.yaml")
    assert any(d.allocations for d in plain.dimensions)


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            "{A: tenant, B: tenant, C: tenant, D: tenant, E: tenant, F: tenant}",
            "dimensions[0].allocations.tags: expected 1 to 5 entries; found 6",
        ),
        ("{}", "dimensions[0].allocations.tags: expected 1 to 5 entries; found 0"),
        (
            "{'bad#key': tenant}",
            'dimensions[0].allocations.tags.bad#key: "bad#key" is not valid: a tag key is '
            "letters, digits, spaces and + - = . _ : / @",
        ),
        (
            "{" + "K" * 101 + ": tenant}",
            f"dimensions[0].allocations.tags.{'K' * 101}: expected 1 to 100 characters; found 101",
        ),
        (
            "{Tenant: customer}",
            'dimensions[0].allocations.tags.Tenant: label "customer" is not one this tenants '
            "collector produces (it produces: project, tenant)",
        ),
        ("{Tenant: 5}", "dimensions[0].allocations.tags.Tenant: expected a string; found 5"),
        ("[tenant]", "dimensions[0].allocations.tags: expected a mapping; found a list"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, tags: str, expected: str) -> None:
    assert expected in error_of(tmp_path, tags)


def test_a_key_of_100_characters_and_every_allowed_character_loads(tmp_path: Path) -> None:
    key = "aZ09+ -=._:/@" + "k" * 87
    assert len(key) == 100
    cfg = load(tmp_path, "{'" + key + "': tenant}")
    assert cfg.dimensions[0].allocations == {key: "tenant"}


def test_a_collector_that_cannot_tell_accepts_any_label(tmp_path: Path) -> None:
    prometheus = "{type: http, url: 'http://127.0.0.1:9/m', format: prometheus, query: jobs}"
    cfg = load(tmp_path, "{Team: team}", prometheus)  # a series may carry any label
    assert cfg.dimensions[0].allocations == {"Team": "team"}


@pytest.mark.parametrize(
    ("collector", "produces"),
    [
        ("{type: log, path: /x.log, pattern: 'GET (?P<value>[0-9]+)', mode: sum}", "none"),
        ("{type: log, path: /x.log, pattern: 'GET (?P<tenants>[a-z]+)'}", "tenants"),
        ("{type: http, url: 'http://127.0.0.1:9/s', query: users}", "none"),
        ("{type: http, url: 'http://127.0.0.1:9/s', query: users, label: customer}", "customer"),
    ],
)
def test_a_label_the_collector_cannot_produce_is_refused(
    tmp_path: Path, collector: str, produces: str
) -> None:
    expected = (
        'dimensions[0].allocations.tags.Tenant: label "tenant" is not one this '
        f"{collector.split(',')[0].split()[-1]} collector produces (it produces: {produces})"
    )
    assert expected in error_of(tmp_path, "{Tenant: tenant}", collector)


@pytest.mark.parametrize(
    "tags", ["{A: t, B: t, C: t, D: t, E: t, F: t}", "{'a,b': t}", "{}", "{Tenant: [x]}"]
)
def test_check_exits_78_with_one_line_naming_the_key(tmp_path: Path, tags: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\ndimensions:\n"
        f"  - name: api\n    collector: {{type: system, metric: users}}\n"
        f"    allocations: {{tags: {tags}}}\n"
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "dimensions[0].allocations.tags" in lines[0]
