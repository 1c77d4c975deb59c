"""The JSON Schema (`metering-agent schema`) and the loader agree on every value form.

Each case puts one value at one key of a valid config and asks both: the loader (`config.parse`)
and a draft 2020-12 validator over the printed schema. They must give the same answer, but for the
rules a schema cannot state (a regex that does not compile, an interval that does not divide an
hour, the range of a duration written as a string), which are named here and where only the loader
may refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent import config
from agent.collectors import Registry
from agent.errors import ConfigError
from tests.conftest import PRODUCT, run_cli

BASE: dict[str, Any] = {
    "product_code": PRODUCT,
    "metering": {"send_window": 0},
    "sampling": {"interval": 60},
    "dimensions": [
        {"name": "vcpus", "collector": {"type": "system", "metric": "cpu_count"}},
        {
            "name": "requests",
            "collector": {"type": "log", "path": "/var/log/app/access.log", "pattern": "GET"},
        },
        {
            "name": "users",
            "collector": {"type": "http", "url": "http://127.0.0.1:8080/stats", "query": "u"},
        },
    ],
}


def labelled(allocations: Any) -> dict[str, Any]:
    """The log dimension with a `tenant` label and these allocations."""
    return {
        "name": "requests",
        "collector": {
            "type": "log",
            "path": "/var/log/app/access.log",
            "pattern": "GET (tenant=(?P<tenant>[a-z]+))?",
        },
        "allocations": allocations,
    }


D0, LOG, HTTP = ("dimensions", 0), ("dimensions", 1, "collector"), ("dimensions", 2, "collector")
LOADER_ONLY = "loader-only"  # a rule JSON Schema cannot state: the schema accepts, the loader not

CASES: list[tuple[tuple[Any, ...], Any, str | None]] = [
    # scale: a decimal number, as a YAML number or a quoted string
    *[((*D0, "scale"), v, None) for v in (1, 0.001, "0.001", "1e-3", " 0.5 ", ".5", "1.", 2.0)],
    *[((*D0, "scale"), v, None) for v in (0, "0", -1, "-0.5", "0e5", "abc", "", "1_000")],
    *[((*D0, "scale"), v, None) for v in (True, None, [], {}, "NaN", "Infinity", "١")],
    # decimals: a whole number 1..6
    *[((*D0, "decimals"), v, None) for v in (1, 6, 2.0, 2.5, "2", 0, 7, True, None)],
    # durations: whole seconds, or a string such as 90s, 10m, 1h
    *[(("metering", "send_window"), v, None) for v in (0, 600, "10m", "1h", 600.0, 3600)],
    *[(("metering", "send_window"), v, None) for v in (-1, 3601, 1.5, "10 minutes", True)],
    (("metering", "send_window"), "3601s", LOADER_ONLY),
    (("metering", "send_window"), "٣m", None),
    *[(("sampling", "interval"), v, None) for v in (60, "60", "1m", " 5 m ", 60.0, "1h")],
    *[(("sampling", "interval"), v, None) for v in (0, 3601, "abc", None)],
    (("sampling", "interval"), 7, LOADER_ONLY),
    (("sampling", "interval"), "2h", LOADER_ONLY),
    *[((*D0, "interval"), v, None) for v in (30, "30s", 30.0)],
    *[((*HTTP, "timeout"), v, None) for v in (5, "5s", 5.0, 0, "x")],
    # enums, strings, booleans
    *[((*D0, "rounding"), v, None) for v in ("up", "down", "nearest", "UP", 1, None)],
    *[((*D0, "aggregate"), v, None) for v in ("max", "integral", "median", None)],
    *[((*D0, "name"), v, None) for v in ("a", "x" * 255, "x" * 256, "", 5)],
    *[(("product_code",), v, None) for v in (PRODUCT, "bad code", 123, "")],
    *[(("metering", "region"), v, None) for v in ("auto", "us-east-1", "US", None)],
    *[(("metering", "endpoint_url"), v, None) for v in (None, "http://x:1", "ftp://x", 5)],
    *[(("metering", "startup_check"), v, None) for v in (True, False, "yes", 1, None)],
    *[(("version",), v, None) for v in (1, 1.0, 2, "1")],
    *[(("state_dir",), v, None) for v in ("/var/lib/x", "", 5)],
    # collector options
    *[((*LOG, "pattern"), v, None) for v in ("GET", "", 5)],
    ((*LOG, "pattern"), "(", LOADER_ONLY),
    *[((*LOG, "start_at"), v, None) for v in ("end", "beginning", "middle")],
    *[((*LOG, "path"), v, None) for v in ("/var/log/*.log", "relative.log")],
    *[((*LOG, "max_line_bytes"), v, None) for v in (65536, 65536.0, "65536", 100)],
    *[((*LOG, "counter"), v, None) for v in (False, "no")],
    *[((*HTTP, "headers"), v, None) for v in ({"X-A": "b"}, {"X-A": 1}, ["a"])],
    *[((*LOG, "bogus"), v, None) for v in (1,)],
    # hooks
    *[(("on_metering_failure",), v, None) for v in ({"command": ["x"]}, None, {"command": []})],
    *[
        (("on_metering_failure",), v, None)
        for v in ({"command": "x"}, {"command": ["x"], "after": "2h"})
    ],
    *[(("on_recovery",), v, None) for v in ({"command": ["x"]}, {"command": ["x"], "after": 1})],
    (("bogus",), 1, None),
    # allocations: 1..5 tags, each key 1..100 of letters, digits, space and + - = . _ : / @
    *[
        (("dimensions", 1), labelled(v), None)
        for v in (
            {"tags": {"Tenant": "tenant"}},
            {"tags": {"aZ09+ -=._:/@": "tenant", "K" * 100: "tenant"}},
            {"tags": {f"K{i}": "tenant" for i in range(5)}},
            {"tags": {f"K{i}": "tenant" for i in range(6)}},
            {"tags": {}},
            {"tags": {"bad#key": "tenant"}},
            {"tags": {"K" * 101: "tenant"}},
            {"tags": {"Tenant": 5}},
            {"tags": {"Tenant": ""}},
            {"tags": ["tenant"]},
            {"tags": {"Tenant": "tenant"}, "bogus": 1},
            {},
            None,
            "tenant",
        )
    ],
    (("dimensions", 1), labelled({"tags": {"Customer": "customer"}}), LOADER_ONLY),
]


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(run_cli("schema").stdout)  # as a seller's editor gets it
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def loader_accepts(data: dict[str, Any]) -> bool:
    try:
        config.parse(data, Path("config.yaml"), Registry())
    except ConfigError:
        return False
    return True


def test_the_base_config_is_valid_to_both(validator: jsonschema.protocols.Validator) -> None:
    assert loader_accepts(BASE) and validator.is_valid(BASE)


@pytest.mark.parametrize(("path", "value", "rule"), CASES, ids=lambda x: repr(x)[:40])
def test_schema_and_loader_agree(
    validator: jsonschema.protocols.Validator, path: tuple[Any, ...], value: Any, rule: str | None
) -> None:
    data = with_value(path, value)
    loader, schema = loader_accepts(data), validator.is_valid(data)
    if rule == LOADER_ONLY:
        assert (schema, loader) == (True, False)
    else:
        assert schema == loader, (
            f"{'.'.join(map(str, path))} = {value!r}: schema {schema}, loader {loader}"
        )
