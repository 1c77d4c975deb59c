"""One sampling round: ask each dimension's collector for a reading and turn it into the value the
hour receives (counter differencing included). Writes nothing: the caller persists the result.

The state a dimension carries from one reading to the next — a log position, per-series counter
baselines with the kernel's boot id — travels in `Sample.state` so the ledger can store it in the
same transaction as the sample; that is what makes a restart neither lose nor repeat usage.

A reading's breakdown by labels becomes `Sample.breakdown`, in the sample's own units and summing
exactly to its value (a counter's: each series' increment under that series' labels). A dimension
keeps at most `max_label_sets` label sets apart per hour; a new one beyond that is counted under
`()`, with one warning per dimension and hour. In SaaS mode every dimension keeps its breakdown,
reduced to the customer label and the allocations' labels, and the cap never folds the customer
label away (see `Sampler._bounded`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent.aggregate import LabelSet, reading_problem
from agent.clock import hour_start, iso_hour
from agent.collectors import (
    Collector,
    CollectorError,
    NotYet,
    Reading,
    Registry,
    SourceMissing,
    Sources,
    Unread,
    series_labels,
)
from agent.config.model import Config, Dimension
from agent.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    dimension: str
    t: float
    raw: Decimal | None  # the collector's reading; None if it failed
    value: Decimal | None  # what the hour receives; None if it failed
    state: dict[str, Any] | None  # to persist with the sample
    error: str | None = None
    warning: str | None = None  # a good sample, but part of the source was not: Reading.problem
    breakdown: Mapping[LabelSet, Decimal] | None = None  # `value` by label set; sums to it
    unread: tuple[Unread, ...] = ()  # usage the collector found lost for good (Reading.unread)
    lines: int | None = None  # lines the reading read, for the metrics (Reading.lines)


def counter_parts(
    reading: Reading,
    boot_id: str | None,
    saved: Mapping[str, Any] | None,
    boot_time: Decimal | None = None,
) -> tuple[Decimal, dict[str, Decimal] | None, dict[str, Any]]:
    """Difference a running total against its saved baseline; return the increase and the new state.

    No baseline yet (the dimension's first reading): 0, since we cannot know what happened before
    we looked, except for a series whose source says it began counting after the machine booted
    (`Reading.started` later than `boot_time`): all of it is this boot's, so it counts from 0
    (its whole value); on an instance's first boot the product starts before the agent's first
    reading. A successful answer without the counter (`NotYet`) is a baseline of no series, so
    each series that appears later counts whole (`series_increments`). A new boot (the kernel's
    boot id changed) restarts every counter: the increment is the reading itself. A reading
    made of series (`Reading.series`) is differenced per series, see `series_increments`. A
    baseline saved before boot ids were kept (it has psutil's boot time, which moves when the
    clock is stepped, so it is not used) counts as the same boot unless the reading is below
    it. The middle item is each series' increment by its key (None when the totals were
    compared instead).
    """
    new: dict[str, Any] = {"boot_id": boot_id}
    if reading.series is not None:
        new["series"] = {key: str(v) for key, v in reading.series.items()}
        if reading.epochs:
            new["epochs"] = dict(reading.epochs)
    else:
        new["baseline"] = str(reading.value)
    if not saved or ("baseline" not in saved and "series" not in saved):
        parts = first_parts(reading, boot_time)
        return sum(parts.values(), Decimal(0)), parts, new
    legacy = "boot_id" not in saved
    if saved.get("boot_id") and boot_id and saved["boot_id"] != boot_id:
        return reading.value, None if reading.series is None else dict(reading.series), new
    if reading.series is not None and "series" in saved:
        parts = series_increments(reading, saved["series"], saved.get("epochs") or {})
        return sum(parts.values(), Decimal(0)), parts, new
    # One side has no per-series values (a baseline from an older agent, or a collector that
    # changed shape): compare the totals, as that baseline was taken.
    if "baseline" in saved:
        before = Decimal(saved["baseline"])
    else:
        before = sum((Decimal(v) for v in saved["series"].values()), Decimal(0))
    now = reading.value
    if legacy and reading.legacy_total is not None:
        now = reading.legacy_total
    return (now - before if now >= before else reading.value), None, new


def first_parts(reading: Reading, boot_time: Decimal | None) -> dict[str, Decimal]:
    """A first reading's increments: each series that began after the machine booted, whole;
    nothing of the others (their baseline)."""
    if reading.series is None or not reading.started or boot_time is None:
        return {}
    return {
        key: value
        for key, value in reading.series.items()
        if key in reading.started and reading.started[key] > boot_time
    }


def series_increments(
    reading: Reading, baselines: Mapping[str, str], epochs: Mapping[str, str]
) -> dict[str, Decimal]:
    """Each series' own increase since its baseline, by series key.

    A series that went down (or whose epoch changed: it was re-created) restarted: it counts its
    new value. A series without a baseline appeared after the dimension's first reading, so it
    started after we began watching: it counts from 0, i.e. its whole value. A series that
    disappeared contributes nothing (its baseline is dropped with the new state).
    """
    assert reading.series is not None
    now_epochs = reading.epochs or {}
    parts: dict[str, Decimal] = {}
    for key, value in reading.series.items():
        base = baselines.get(key)
        if base is None:
            parts[key] = value
            continue
        before = Decimal(base)
        epoch, old_epoch = now_epochs.get(key), epochs.get(key)
        restarted = epoch is not None and old_epoch is not None and epoch != old_epoch
        parts[key] = value if restarted or value < before else value - before
    return parts


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
        all_labels: bool = False,
    ) -> None:
        """`all_labels`: keep every reading's breakdown (`sample` shows it); else only that of a
        dimension with allocations, reduced to the labels they map (which alone count against
        its `max_label_sets`)."""
        self.config = config
        self.all_labels = all_labels
        self.registry = registry or Registry()
        self.sources = sources or Sources()
        self.collectors: dict[str, Collector] = {}
        self.start_errors: dict[str, str] = {}
        # per dimension: the hour and the label sets its samples have kept apart in it so far
        self._label_sets: dict[str, tuple[int, set[LabelSet]]] = {}
        for dim in config.dimensions:
            try:
                self.collectors[dim.name] = build_collector(dim, self.registry, self.sources)
            except CollectorError as e:
                self.start_errors[dim.name] = str(e)
            else:
                self.collectors[dim.name].count_labels(all_labels or self._bills_labels(dim))
                self.collectors[dim.name].report_lines(config.metrics is not None)
                if config.customer_label is not None:  # never folded away (Collector.fold)
                    self.collectors[dim.name].keep_label = config.customer_label

    def carry_over(self, old: Sampler) -> None:
        """After a reload: a dimension configured exactly as before keeps its collector (a log's
        files held open between readings stay open); the other collectors of `old` are closed."""
        same_mode = old.config.saas == self.config.saas and old.all_labels == self.all_labels
        previous = {d.name: d for d in old.config.dimensions}
        kept = set()
        for dim in self.config.dimensions:
            collector = old.collectors.get(dim.name)
            if same_mode and collector is not None and previous.get(dim.name) == dim:
                self.collectors[dim.name].close()
                self.collectors[dim.name] = collector
                collector.report_lines(self.config.metrics is not None)
                kept.add(dim.name)
        for name, collector in old.collectors.items():
            if name not in kept:
                collector.close()

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

    def take(
        self,
        dim: Dimension,
        t: float,
        saved: Mapping[str, Any] | None,
        in_time: Callable[[], bool] = lambda: True,
    ) -> Sample:
        """One reading for `dim` at time `t`; a failing collector gives a Sample with `error`.
        `in_time()` turns False at the read's deadline (`Collector.read_within`)."""
        collector = self.collectors.get(dim.name)
        if collector is None:
            return Sample(dim.name, t, None, None, None, self.start_errors.get(dim.name))
        saved = saved or {}
        warning = None
        try:
            try:
                reading = collector.read_within(saved.get("collector"), in_time)
            except NotYet as e:
                if not dim.collector.cumulative:
                    raise
                reading, warning = Reading.of_series([]), f"{e} (yet): counted from 0 once it does"
            problem = _value_problem(reading.value)  # before any arithmetic on it
            if problem is not None:
                return Sample(dim.name, t, None, None, None, problem)
            state: dict[str, Any] = {}
            if reading.state is not None:
                state["collector"] = reading.state
            value, parts = reading.value, reading.breakdown
            if dim.collector.cumulative:
                value, increments, state["counter"] = counter_parts(
                    reading,
                    self.sources.boot_id() if collector.local_counters else None,
                    saved.get("counter"),
                    self.sources.boot_time()
                    if self.sources.count_from_boot and not saved.get("counter")
                    else None,
                )
                if parts is not None:
                    parts = _by_labels(increments, value)
            if not (self.all_labels or self._bills_labels(dim)):
                parts = None  # nothing bills labels: not stored, not counted
            breakdown = None if parts is None else _exact_breakdown(parts, value)
            if isinstance(breakdown, dict) and not self.all_labels and self._bills_labels(dim):
                breakdown = _mapped(breakdown, self._billed_labels(dim))
        except SourceMissing as e:
            return Sample(dim.name, t, None, None, None, f"source missing: {e}")
        except CollectorError as e:
            return Sample(dim.name, t, None, None, None, str(e))
        except Exception as e:  # contain a plugin's bug at the job boundary
            log.exception("collector for %s failed unexpectedly", dim.name)
            return Sample(dim.name, t, None, None, None, f"{type(e).__name__}: {e}")
        problem = _value_problem(value)
        if problem is not None:
            return Sample(dim.name, t, None, None, None, problem)
        if isinstance(breakdown, str):
            return Sample(dim.name, t, None, None, None, breakdown)
        if breakdown is not None:
            breakdown = self._bounded(dim, t, breakdown)
        return Sample(
            dim.name,
            t,
            reading.value,
            value,
            state or None,
            warning=reading.problem or warning,
            breakdown=breakdown,
            unread=reading.unread,
            lines=reading.lines,
        )

    def _bills_labels(self, dim: Dimension) -> bool:
        """Whether the dimension's samples keep a breakdown: allocations bill it, and where a
        label names the customer every dimension does (SaaS mode: whose usage it is)."""
        return bool(dim.allocations) or self.config.customer_label is not None

    def _billed_labels(self, dim: Dimension) -> frozenset[str]:
        """The labels a stored breakdown keeps: the allocations' and the customer label."""
        names = frozenset(dim.allocations.values()) if dim.allocations else frozenset()
        if self.config.customer_label is not None:
            names |= {self.config.customer_label}
        return names

    def _bounded(
        self, dim: Dimension, t: float, breakdown: dict[LabelSet, Decimal]
    ) -> dict[LabelSet, Decimal]:
        """Keep at most `max_label_sets` label sets apart per dimension and hour: a new one beyond
        that has its usage moved under `()`, with one warning per dimension and hour.

        SaaS mode: the customer label is never folded (that would bill one customer's usage to
        nobody). A new label set beyond the cap keeps its customer label and loses the others (its
        usage is billed in that customer's record, untagged); label sets that name a customer and
        nothing else are not counted against the cap, so it bounds the allocations' combinations,
        and the customers are bounded by the customers there are.
        """
        customer = self.config.customer_label
        hour = hour_start(t)
        held = self._label_sets.get(dim.name)
        if held is None or held[0] != hour:
            held = self._label_sets[dim.name] = (hour, set())
        seen = held[1]
        out: dict[LabelSet, Decimal] = {}
        over = False
        for key, value in breakdown.items():
            if key and key not in seen:
                if customer is not None and all(name == customer for name, _ in key):
                    pass  # a customer alone: kept apart, never counted against the cap
                elif len(seen) >= dim.max_label_sets:
                    over = True
                    key = tuple(pair for pair in key if pair[0] == customer)
                else:
                    seen.add(key)
            out[key] = out.get(key, Decimal(0)) + value
        if over and () not in seen:
            seen.add(())  # (marks the warning as given; () is never counted against the cap)
            log.warning(
                "dimension %s: hour %s has more than %d label sets (max_label_sets); the usage "
                "of further ones is counted without labels (in SaaS mode: but the customer's)",
                dim.name,
                iso_hour(t),
                dim.max_label_sets,
            )
        return out


def _mapped(parts: Mapping[LabelSet, Decimal], names: frozenset[str]) -> dict[LabelSet, Decimal]:
    """The breakdown by the labels allocations map only (others summed away, as sealing would)."""
    out: dict[LabelSet, Decimal] = {}
    for key, part in parts.items():
        kept = tuple(pair for pair in key if pair[0] in names)
        out[kept] = out.get(kept, Decimal(0)) + part
    return {k: v for k, v in out.items() if v}


def _by_labels(increments: Mapping[str, Decimal] | None, value: Decimal) -> dict[LabelSet, Decimal]:
    """A counter's increment by the labels of the series each part came from (all under `()`
    when the totals were compared instead of the series)."""
    if increments is None:
        return {(): value}
    out: dict[LabelSet, Decimal] = {}
    for key, part in increments.items():
        labels = tuple(sorted((k, v) for k, v in series_labels(key).items() if v is not None))
        out[labels] = out.get(labels, Decimal(0)) + part
    return out


def _exact_breakdown(parts: Mapping[Any, Any], value: Decimal) -> dict[LabelSet, Decimal] | str:
    """The breakdown checked (label sets of string pairs, finite numbers) and made to sum exactly
    to `value`: whatever the parts leave over (rounding, usage without labels) goes under `()`.
    Parts of 0 are left out. A breakdown that is not one is that round's error (a string)."""
    out: dict[LabelSet, Decimal] = {}
    for key, part in parts.items():
        try:
            labels = tuple(sorted((str(k), str(v)) for k, v in key if v is not None))
        except (TypeError, ValueError):
            return f"the collector's breakdown has {key!r}, not a label set of (name, value) pairs"
        problem = _value_problem(part)
        if problem is not None:
            return f"the collector's breakdown for {labels!r}: {problem}"
        number = Decimal(str(part)) if isinstance(part, float) else Decimal(part)
        out[labels] = out.get(labels, Decimal(0)) + number
    rest = value - sum(out.values(), Decimal(0))
    if rest:
        out[()] = out.get((), Decimal(0)) + rest
    return {k: v for k, v in out.items() if v}


def _value_problem(value: Any) -> str | None:
    """A reading that is not a finite decimal is that round's collector error (nothing stored)."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, float)):
        return f"the collector returned {type(value).__name__} {value!r}, not a number"
    return reading_problem(Decimal(str(value)) if isinstance(value, float) else Decimal(value))


def take_within(
    sampler: Sampler,
    dim: Dimension,
    t: float,
    saved: Any,
    monotonic: Callable[[], float],
) -> Sample:
    """One reading within the dimension's `timeout`, for `check` and `sample`: the collector is
    told the deadline (a log backlog stops there, at a line boundary), and a hung source is a
    failed collector there too: the command still ends (the read's thread is a daemon)."""
    timeout = float(dim.collector.options.get("timeout", 10))
    deadline = monotonic() + timeout
    box: list[Sample] = []
    thread = threading.Thread(
        target=lambda: box.append(sampler.take(dim, t, saved, lambda: monotonic() <= deadline)),
        name=f"read {dim.name}",
        daemon=True,
    )
    thread.start()
    thread.join(timeout + 0.25)  # a read that heeds its deadline ends about then
    if box:
        return box[0]
    return Sample(dim.name, t, None, None, None, f"no answer within its {timeout:g} s timeout")
