"""An example third-party collector: reads one number that the product keeps in a file.

A product that already knows its usage (licensed seats, active tenants) writes it to a file; the
agent bills it like any other level. Everything a plugin needs is here: `type_name`, an `options`
table (validated by the agent before the collector is built), `read`, and `probe` for
`check --offline`.

With `label: NAME` the file holds one `LABEL_VALUE NUMBER` line per tenant (or project...) instead,
and the reading carries that breakdown (`Reading.breakdown`, keys made by `label_set`); `labels()`
tells the agent which label names it can produce.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar

from agent.collectors import Collector, CollectorError, Reading, SourceMissing, label_set
from agent.fields import Field, Str


class FileValueCollector(Collector):
    type_name = "file_value"
    produces = "level"
    options: ClassVar[Mapping[str, Field]] = {
        "path": Field(Str(r"/.*", hint="expected an absolute path"), required=True,
                      doc="a file holding one number"),
        "label": Field(Str(r"[a-z_]+"), doc="the file holds `VALUE NUMBER` lines, by this label"),
    }  # fmt: skip

    def labels(self) -> frozenset[str] | None:
        label = self.config.get("label")
        return frozenset([label]) if label else frozenset()

    def probe(self) -> None:
        if not Path(self.config["path"]).exists():
            raise SourceMissing(f"{self.config['path']} does not exist yet")

    def read(self, state: dict[str, Any] | None) -> Reading:
        path = Path(self.config["path"])
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            raise SourceMissing(f"{path} does not exist") from None
        except OSError as e:
            raise CollectorError(f"cannot read {path}: {e.strerror}") from None
        label = self.config.get("label")
        try:
            if not label:
                return Reading(Decimal(text))
            parts: dict[tuple[tuple[str, str], ...], Decimal] = {}
            for line in text.splitlines():
                name, number = line.rsplit(None, 1)
                key = label_set({label: name})
                parts[key] = parts.get(key, Decimal(0)) + Decimal(number)
            return Reading(sum(parts.values(), Decimal(0)), breakdown=parts)
        except (InvalidOperation, ValueError):
            raise CollectorError(f"{path} holds {text[:40]!r}, not a number") from None
