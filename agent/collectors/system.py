"""System metrics through psutil (passed in via `Sources`, so tests can fake it).

Byte counters (`net_*_bytes`) are running totals since boot: the sampler differences them against a
durable baseline and treats a drop or a new boot as a reset, so reboots and wraps never bill
negative or huge values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from agent.collectors.base import Collector, CollectorError, Kind, Reading, SourceMissing
from agent.errors import ConfigError
from agent.fields import Enum, Field, Regex, Str

GIB = Decimal(2**30)


@dataclass(frozen=True)
class Metric:
    read: Callable[[Any, Mapping[str, Any]], Any]
    cumulative: bool = False
    uses: tuple[str, ...] = ()  # which of the collector's options this metric takes
    doc: str = ""


def _memory_used(ps: Any, _: Mapping[str, Any]) -> Decimal:
    vm = ps.virtual_memory()
    # total - available is what the kernel cannot hand out; psutil's `used` differs by platform.
    return Decimal(vm.total - vm.available) / GIB


def _process_count(ps: Any, opts: Mapping[str, Any]) -> int:
    pattern = re.compile(opts["name"]) if opts.get("name") else None
    count = 0
    for proc in ps.process_iter(["name"]):
        name = proc.info.get("name") or ""
        if pattern is None or pattern.search(name):
            count += 1
    return count


METRICS: dict[str, Metric] = {
    "cpu_count": Metric(lambda ps, _: ps.cpu_count(logical=True) or 0, doc="logical CPUs"),
    "cpu_percent": Metric(
        lambda ps, _: ps.cpu_percent(interval=None), doc="CPU use since the last sample, 0-100"
    ),
    "memory_total_gib": Metric(
        lambda ps, _: Decimal(ps.virtual_memory().total) / GIB, doc="installed memory, GiB"
    ),
    "memory_used_gib": Metric(_memory_used, doc="memory in use (total - available), GiB"),
    "disk_used_gib": Metric(
        lambda ps, o: Decimal(ps.disk_usage(o.get("path") or "/").used) / GIB,
        uses=("path",),
        doc="space used on the filesystem holding `path` (default /), GiB",
    ),
    "net_sent_bytes": Metric(
        lambda ps, _: ps.net_io_counters().bytes_sent, cumulative=True, doc="bytes sent"
    ),
    "net_recv_bytes": Metric(
        lambda ps, _: ps.net_io_counters().bytes_recv, cumulative=True, doc="bytes received"
    ),
    "process_count": Metric(
        _process_count, uses=("name",), doc="processes whose name matches the regex `name`"
    ),
    "users": Metric(lambda ps, _: len(ps.users()), doc="logged-in user sessions"),
}


class SystemCollector(Collector):
    type_name = "system"
    options: ClassVar[Mapping[str, Field]] = {
        "metric": Field(Enum(tuple(METRICS)), required=True, doc="which system metric"),
        "path": Field(Str(), doc="disk_used_gib: a path on the filesystem to measure (default /)"),
        "name": Field(Regex(), doc="process_count: regex searched in each process name"),
    }

    @classmethod
    def kind(cls, options: Mapping[str, Any]) -> Kind:
        return "increment" if cls.cumulative(options) else "level"

    @classmethod
    def cumulative(cls, options: Mapping[str, Any]) -> bool:
        return METRICS[options["metric"]].cumulative

    @classmethod
    def validate(cls, options: dict[str, Any], path: str) -> None:
        metric = METRICS[options["metric"]]
        for key in ("path", "name"):
            if options.get(key) is not None and key not in metric.uses:
                raise ConfigError(
                    f"{path}.{key}", f'not used by metric "{options["metric"]}"; remove it'
                )

    def __init__(self, options: Mapping[str, Any], sources: Any) -> None:
        super().__init__(options, sources)
        self.metric = METRICS[self.config["metric"]]
        self.psutil = sources.get_psutil()
        if self.config["metric"] == "cpu_percent":
            # psutil measures CPU use between two calls; the first call only sets the start.
            self.psutil.cpu_percent(interval=None)

    def probe(self) -> None:
        if self.config["metric"] == "disk_used_gib":
            self.read(None)

    def read(self, state: dict[str, Any] | None) -> Reading:
        try:
            raw = self.metric.read(self.psutil, self.config)
        except FileNotFoundError as e:
            raise SourceMissing(f"system metric {self.config['metric']}: {e}") from None
        except (OSError, RuntimeError, AttributeError) as e:
            raise CollectorError(f"system metric {self.config['metric']}: {e}") from None
        return Reading(raw if isinstance(raw, Decimal) else Decimal(str(raw)))
