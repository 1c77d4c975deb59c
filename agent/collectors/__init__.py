"""The collector registry: built-ins and third-party plugins from one entry-point group.

Plugins are loaded on first use by name and validated when they are registered (pluggy's habit):
a class that is not a Collector, or declares no options table, is a config error naming the plugin.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from agent.collectors.base import (
    Collector,
    CollectorError,
    NotYet,
    Reading,
    SourceMissing,
    Sources,
    Unread,
    label_set,
    series_key,
    series_labels,
)
from agent.errors import ConfigError
from agent.fields import Field, Spec, suggest

GROUP = "metering_agent.collectors"

# Also declared as entry points in pyproject.toml; listed here too so a source checkout that was
# never pip-installed still knows its own built-ins.
BUILTINS = {
    "system": "agent.collectors.system:SystemCollector",
    "log": "agent.collectors.log:LogCollector",
    "http": "agent.collectors.http:HttpCollector",
    "promql": "agent.collectors.promql:PromqlCollector",
}

__all__ = [
    "GROUP",
    "Collector",
    "CollectorError",
    "NotYet",
    "Reading",
    "Registry",
    "SourceMissing",
    "Sources",
    "Unread",
    "label_set",
    "series_key",
    "series_labels",
]


class Registry:
    """Maps a collector `type` to its class, loading plugins on first use."""

    def __init__(self, targets: Mapping[str, str] | None = None) -> None:
        if targets is None:
            found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
            targets = {**found, **BUILTINS}
        self._targets = dict(targets)
        self._loaded: dict[str, type[Collector]] = {}

    def names(self) -> list[str]:
        return sorted(self._targets)

    def register(self, name: str, cls: Any) -> type[Collector]:
        """Validate a collector class and make it available under `name`."""
        where = f"collector plugin {name!r} ({getattr(cls, '__module__', '?')})"
        if not isinstance(cls, type) or not issubclass(cls, Collector):
            raise ConfigError("", f"{where}: expected a subclass of agent.collectors.Collector")
        if cls.read is Collector.read:
            raise ConfigError("", f"{where}: does not override read()")
        if not isinstance(cls.options, Mapping) or not all(
            isinstance(k, str) and isinstance(f, Field) and isinstance(f.spec, Spec)
            for k, f in cls.options.items()
        ):
            raise ConfigError("", f"{where}: `options` must map option names to agent.fields.Field")
        reserved = {"type", "counter", "timeout"} & set(cls.options)
        if reserved:
            raise ConfigError("", f"{where}: option names {sorted(reserved)} are reserved")
        if cls.produces not in ("level", "increment"):
            raise ConfigError("", f"{where}: `produces` must be 'level' or 'increment'")
        self._targets.setdefault(name, f"{cls.__module__}:{cls.__qualname__}")
        self._loaded[name] = cls
        return cls

    def get(self, name: str, path: str) -> type[Collector]:
        if name in self._loaded:
            return self._loaded[name]
        target = self._targets.get(name)
        if target is None:
            known = self.names()
            raise ConfigError(
                path,
                f'unknown collector type "{name}" (known: {", ".join(known)}{suggest(name, known)})'
                f"; third-party collectors register under the entry-point group {GROUP}",
            )
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # a plugin that fails to import is a registration error
            raise ConfigError(
                path, f'collector plugin "{name}" ({target}) failed to load: {e}'
            ) from None
        return self.register(name, obj)
