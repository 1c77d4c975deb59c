"""Plugins are validated when they register, and every problem is a config error naming them."""

from __future__ import annotations

import re
import sys
import types
from decimal import Decimal
from typing import Any, ClassVar

import pytest

from agent.collectors import Collector, Reading, Registry
from agent.errors import EX_CONFIG, ConfigError
from agent.fields import Field, Str


class Good(Collector):
    type_name = "good"
    options: ClassVar[dict[str, Field]] = {"label": Field(Str())}

    def read(self, state: dict[str, Any] | None) -> Reading:
        return Reading(Decimal(1))


class NoRead(Collector):
    type_name = "noread"


class BadOptions(Good):
    options: ClassVar[dict[str, Any]] = {"label": "a string, not a Field"}


class Reserved(Good):
    options: ClassVar[dict[str, Field]] = {"counter": Field(Str())}


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("fake_plugins")
    for cls in (Good, NoRead, BadOptions, Reserved):
        setattr(module, cls.__name__, cls)
    module.NotACollector = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_plugins", module)
    return "fake_plugins"


def test_a_good_plugin_loads_by_name(plugin_module: str) -> None:
    registry = Registry({"good": f"{plugin_module}:Good"})
    assert registry.get("good", "x") is Good


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("NotACollector", "expected a subclass of agent.collectors.Collector"),
        ("NoRead", "does not override read()"),
        ("BadOptions", "`options` must map option names to agent.fields.Field"),
        ("Reserved", "option names ['counter'] are reserved"),
        ("Missing", "failed to load"),
    ],
)
def test_bad_plugins_are_config_errors(plugin_module: str, target: str, message: str) -> None:
    registry = Registry({"bad": f"{plugin_module}:{target}"})
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        registry.get("bad", "dimensions[0].collector.type")
    assert info.value.exit_code == EX_CONFIG
    assert "bad" in str(info.value)


def test_an_unimportable_plugin_module(plugin_module: str) -> None:
    registry = Registry({"gone": "no_such_module_anywhere:Thing"})
    with pytest.raises(ConfigError, match="No module named 'no_such_module_anywhere'"):
        registry.get("gone", "dimensions[0].collector.type")


def test_builtins_are_known_without_installation() -> None:
    assert "system" in Registry().names()
