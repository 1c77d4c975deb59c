"""An example third-party collector: reads one number that the product keeps in a file.

A product that already knows its usage (licensed seats, active tenants) writes it to a file; the
agent bills it like any other level. Everything a plugin needs is here: `type_name`, an `options`
table (validated by the agent before the collector is built), `read`, and `probe` for
`check --offline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar

from agent.collectors import Collector, CollectorError, Reading, SourceMissing
from agent.fields import Field, Str


class FileValueCollector(Collector):
    type_name = "file_value"
    produces = "level"
    options: ClassVar[Mapping[str, Field]] = {
        "path": Field(Str(r"/.*", hint="expected an absolute path"), required=True,
                      doc="a file holding one number"),
    }  # fmt: skip

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
        try:
            return Reading(Decimal(text))
        except InvalidOperation:
            raise CollectorError(f"{path} holds {text[:40]!r}, not a number") from None
