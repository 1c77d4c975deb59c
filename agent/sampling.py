"""One sampling round: ask each dimension's collector for a reading and turn it into the value the
hour receives (counter differencing included). Writes nothing: the caller persists the result.

The state a dimension carries from one reading to the next — a log position, a counter baseline with
psutil's boot time — travels in `Sample.state` so the ledger can store it in the same transaction as
the sample; that is what makes a restart neither lose nor repeat usage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent.aggregate import reading_problem
from agent.collectors import Collector, CollectorError, Registry, SourceMissing, Sources
from agent.config import Config, Dimension
from agent.errors import ConfigError

log = logging.getLogger(__name__)

# psutil's boot time can wobble by a fraction of a second between calls (it is derived from uptime
# on some kernels); a real reboot moves it by far more.
BOOT_TOLERANCE = 2.0


@dataclass(frozen=True)
class Sample:
    dimension: str
    t: float
    raw: Decimal | None  # the collector's reading; None if it failed
    value: Decimal | None  # what the hour receives; None if it failed
    state: dict[str, Any] | None  # to persist with the sample
    error: str | None = None
    warning: str | None = None  # a good sample, but part of the source was not: Reading.problem


def counter_increment(
    reading: Decimal, boot_time: float, saved: Mapping[str, Any] | None
) -> tuple[Decimal, dict[str, Any]]:
    """Difference a running total against its saved baseline.

    No baseline yet: 0 (we cannot know what happened before we looked). A reading below the
    baseline, or a new boot, is a reset: the increment is the reading itself.
    """
    new = {"baseline": str(reading), "boot_time": boot_time}
    if not saved or "baseline" not in saved:
        return Decimal(0), new
    baseline = Decimal(saved["baseline"])
    rebooted = abs(float(saved.get("boot_time", boot_time)) - boot_time) > BOOT_TOLERANCE
    if rebooted or reading < baseline:
        return reading, new
    return reading - baseline, new


def build_collector(dim: Dimension, registry: Registry, sources: Sources) -> Collector:
    cls = registry.get(dim.collector.type, f"{dim.path}.collector.type")
    try:
        return cls(dim.collector.options, sources)
    except (CollectorError, ConfigError):
        raise
    except Exception as e:  # a plugin's constructor is outside our control
        raise CollectorError(f"could not start collector: {type(e).__name__}: {e}") from None


class Sampler:
    """Holds one collector per dimension and takes readings on demand."""

    def __init__(
        self,
        config: Config,
        registry: Registry | None = None,
        sources: Sources | None = None,
        boot_time: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or Registry()
        self.sources = sources or Sources()
        self._boot_time = boot_time
        self.collectors: dict[str, Collector] = {}
        self.start_errors: dict[str, str] = {}
        for dim in config.dimensions:
            try:
                self.collectors[dim.name] = build_collector(dim, self.registry, self.sources)
            except CollectorError as e:
                self.start_errors[dim.name] = str(e)

    def boot_time(self) -> float:
        if self._boot_time is None:
            return float(self.sources.get_psutil().boot_time())
        return self._boot_time()

    def probe(self, dim: Dimension) -> str | None:
        """None if the dimension's source is there; else why not (for `check --offline`)."""
        if dim.name in self.start_errors:
            return self.start_errors[dim.name]
        try:
            self.collectors[dim.name].probe()
        except SourceMissing as e:
            return f"source missing: {e}"
        except CollectorError as e:
            return str(e)
        return None

    def take(self, dim: Dimension, t: float, saved: Mapping[str, Any] | None) -> Sample:
        """One reading for `dim` at time `t`; a failing collector gives a Sample with `error`."""
        collector = self.collectors.get(dim.name)
        if collector is None:
            return Sample(dim.name, t, None, None, None, self.start_errors.get(dim.name))
        saved = saved or {}
        try:
            reading = collector.read(saved.get("collector"))
            state: dict[str, Any] = {}
            if reading.state is not None:
                state["collector"] = reading.state
            value = reading.value
            if dim.collector.cumulative:
                value, state["counter"] = counter_increment(
                    reading.value, self.boot_time(), saved.get("counter")
                )
        except SourceMissing as e:
            return Sample(dim.name, t, None, None, None, f"source missing: {e}")
        except CollectorError as e:
            return Sample(dim.name, t, None, None, None, str(e))
        except Exception as e:  # contain a plugin's bug at the job boundary
            log.exception("collector for %s failed unexpectedly", dim.name)
            return Sample(dim.name, t, None, None, None, f"{type(e).__name__}: {e}")
        problem = _value_problem(reading.value) or _value_problem(value)
        if problem is not None:
            return Sample(dim.name, t, None, None, None, problem)
        return Sample(dim.name, t, reading.value, value, state or None, warning=reading.problem)


def _value_problem(value: Any) -> str | None:
    """A reading that is not a finite decimal is that round's collector error (nothing stored)."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, float)):
        return f"the collector returned {type(value).__name__} {value!r}, not a number"
    return reading_problem(Decimal(str(value)) if isinstance(value, float) else Decimal(value))
