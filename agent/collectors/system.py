"""System metrics through psutil (passed in via `Sources`, so tests can fake it).

Byte counters (`net_*_bytes`) are running totals since boot, one per network interface: the reading
carries each interface as a series (`{"interface": NAME}`) and the sampler differences each against
its own durable baseline, so an interface that disappears (a VPN, a container's veth) or resets
never makes the others' totals look new. Only the interfaces named in `interfaces` (globs) count;
by default those backed by a device (`/sys/class/net/NAME/device` exists: ENA, virtio, a
physical NIC), so loopback, veth, bridges and tunnels are not billed as egress.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, ClassVar

from agent.collectors.base import (
    Collector,
    CollectorError,
    Kind,
    Reading,
    SourceMissing,
    Unread,
)
from agent.errors import ConfigError
from agent.fields import Enum, Field, ListOf, Regex, Str

GIB = Decimal(2**30)
# Readings between two reports of `interfaces` that match nothing: each report keeps health's
# 24-hour view of unread usage filled while the mistake lasts, without one row per reading.
REPORT_EVERY = 60


@dataclass(frozen=True)
class Metric:
    read: Callable[[Any, Mapping[str, Any]], Any]
    cumulative: bool = False
    uses: tuple[str, ...] = ()  # which of the collector's options this metric takes
    per_interface: str = ""  # a psutil.net_io_counters field, read per interface
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
        lambda ps, _: ps.net_io_counters().bytes_sent,
        cumulative=True,
        uses=("interfaces",),
        per_interface="bytes_sent",
        doc="bytes sent on the chosen interfaces",
    ),
    "net_recv_bytes": Metric(
        lambda ps, _: ps.net_io_counters().bytes_recv,
        cumulative=True,
        uses=("interfaces",),
        per_interface="bytes_recv",
        doc="bytes received on the chosen interfaces",
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
        "interfaces": Field(
            ListOf(Str(), min_items=1),
            doc="net_*_bytes: interface name globs to count (default: interfaces backed by a "
            "device, i.e. not loopback, veth, bridges or tunnels)",
        ),
    }

    def labels(self) -> frozenset[str] | None:
        return frozenset()  # a machine-wide number: nothing to break it down by

    @classmethod
    def kind(cls, options: Mapping[str, Any]) -> Kind:
        return "increment" if cls.cumulative(options) else "level"

    @classmethod
    def cumulative(cls, options: Mapping[str, Any]) -> bool:
        return METRICS[options["metric"]].cumulative

    @classmethod
    def validate(cls, options: dict[str, Any], path: str) -> None:
        metric = METRICS[options["metric"]]
        for key in ("path", "name", "interfaces"):
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
        if self.metric.per_interface and self.config.get("interfaces"):
            nics = self._nics()
            if not any(self._counts(name) for name in nics):
                what, fix = self._none_match(nics)
                raise SourceMissing(f"{what}; {fix}")

    def read(self, state: dict[str, Any] | None) -> Reading:
        if self.metric.per_interface:
            return self._per_interface(self.metric.per_interface, state)
        try:
            raw = self.metric.read(self.psutil, self.config)
        except FileNotFoundError as e:
            raise SourceMissing(f"system metric {self.config['metric']}: {e}") from None
        except (OSError, RuntimeError, AttributeError) as e:
            raise CollectorError(f"system metric {self.config['metric']}: {e}") from None
        return Reading(raw if isinstance(raw, Decimal) else Decimal(str(raw)))

    def _nics(self) -> dict[str, Any]:
        try:
            return dict(self.psutil.net_io_counters(pernic=True))
        except (OSError, RuntimeError) as e:
            raise CollectorError(f"system metric {self.config['metric']}: {e}") from None

    def _none_match(self, nics: Mapping[str, Any]) -> tuple[str, str]:
        """What is wrong with `interfaces` that match no interface, and the fix."""
        have = ", ".join(sorted(nics)) or "none"
        return (
            f"interfaces {', '.join(self.config['interfaces'])} match none of this host's "
            f"network interfaces ({have}): their traffic is not counted",
            "set interfaces to globs naming the egress interfaces (e.g. eth*, ens*), or remove "
            "it to count the interfaces backed by a device",
        )

    def _per_interface(self, field: str, state: dict[str, Any] | None) -> Reading:
        """One series per chosen interface, with its ifindex as the series' epoch (an interface
        deleted and re-created under the same name gets a new one: its counters restarted).
        `interfaces` that match none: reported as usage unread (health names it with the fix)
        at the first such reading and every REPORT_EVERY readings after, counted in the
        state."""
        nics = self._nics()
        chosen = [name for name in sorted(nics) if self._counts(name)]
        series = [({"interface": name}, Decimal(getattr(nics[name], field))) for name in chosen]
        epochs = []
        for name in chosen:
            ifindex = self._sysfs(name, "ifindex")
            if ifindex is not None:
                epochs.append(({"interface": name}, ifindex))
        # What agents before per-interface counting read: every interface together.
        legacy = sum((Decimal(getattr(c, field)) for c in nics.values()), Decimal(0))
        if chosen or not self.config.get("interfaces"):
            return Reading.of_series(series, epochs=epochs, legacy_total=legacy)
        readings = int((state or {}).get("unmatched", 0))
        reading = Reading.of_series(
            series, state={"unmatched": readings + 1}, epochs=epochs, legacy_total=legacy
        )
        if readings % REPORT_EVERY:
            return reading
        return replace(reading, unread=(Unread(*self._none_match(nics)),))

    def _counts(self, name: str) -> bool:
        globs = self.config.get("interfaces")
        if globs:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)
        return (self.sources.sys / "class/net" / name / "device").exists()

    def _sysfs(self, name: str, attr: str) -> str | None:
        try:
            return (self.sources.sys / "class/net" / name / attr).read_text().strip() or None
        except OSError:
            return None
