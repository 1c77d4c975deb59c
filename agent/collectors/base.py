"""The collector protocol: one class per kind of source; a plugin overrides one method, `read`.

A collector yields either *levels* (a reading of the present: CPUs, users) or *increments* (the
amount since its previous reading: log lines). A collector whose reading is a running total
(`cumulative`) is turned into increments by the sampler, which keeps the baseline durably.

A running total made of several independent counters (the series of a Prometheus metric, one byte
counter per network interface) is reported per series in `Reading.series`, keyed by the series'
canonical label set (`series_key`), so the sampler can difference each on its own: one series
resetting or disappearing must not make the others' totals look new.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Literal

from agent.aggregate import LabelSet
from agent.fields import Field

Kind = Literal["level", "increment"]


class CollectorError(Exception):
    """An expected failure of a source (unreachable, unreadable, unparsable): one line, no trace."""


class SourceMissing(CollectorError):
    """The source does not exist (yet): a log file not written, a product not started."""


class NotYet(CollectorError):
    """The source answered, but without the metric asked for: a running total not declared yet
    (prometheus_client's multiprocess mode declares a counter only once a worker has written it).
    For a counter that answer is a reading of nothing: every series that appears after it has
    counted from 0 since, so the sampler bills its whole first value. For a level it is an
    error, as for any reading that finds nothing (a typo in a selector never bills 0 quietly)."""


def series_key(labels: Mapping[str, str]) -> str:
    """The canonical text of a label set: JSON of the labels sorted by name, `{"code":"200"}`.

    One label set has exactly one key whatever order the source listed the labels in, and the key
    turns back into the labels (`series_labels`), so stored baselines can later be broken down by
    label.
    """
    return json.dumps(dict(sorted(labels.items())), ensure_ascii=False, separators=(",", ":"))


def series_labels(key: str) -> dict[str, str]:
    """The label set a `series_key` was made from."""
    return dict(json.loads(key))


# The most distinct label sets one reading carries; the rest of its usage goes under `()`. It
# bounds a reading's memory whatever the source holds (a label that is really a request id).
MAX_LABEL_SETS = 10_000


def fold(key: LabelSet, keep: str | None) -> LabelSet:
    """Where a label set's usage goes beyond MAX_LABEL_SETS: `()`, or, where a label must never
    be folded (`keep`: SaaS mode's customer label), that label alone, so the usage stays its
    customer's. Such label sets are bounded by the customers there are."""
    if keep is None:
        return ()
    return tuple(pair for pair in key if pair[0] == keep)


def label_set(labels: Mapping[str, str | None]) -> LabelSet:
    """(name, value) pairs sorted by name, only the labels that have a value; `()` for none."""
    return tuple(sorted((k, v) for k, v in labels.items() if v is not None))


@dataclass(frozen=True)
class Unread:
    """Usage the collector can tell went unread, so it will never be billed: a log generation
    deleted or truncated with bytes it had not read, copies it cannot see. One per event; the
    sampler stores it with the sample, so `status` counts it and health names it with the fix.

    `what` says what was lost and where (one line, no fix), `fix` what the seller should change,
    `amount` the bytes (or units) known lost, 0 when the amount is unknown.
    """

    what: str
    fix: str
    amount: int = 0


@dataclass(frozen=True)
class Reading:
    """What one `read` returns: the value and the collector's position to persist with it.

    `series` (optional) splits a running total into its independent counters, keyed by
    `series_key(labels)`; `value` is then their sum (`Reading.of_series` builds both). With
    `counter: true` (or a built-in byte counter) the sampler differences each series on its own.
    `epochs` (optional, same keys) marks each series' life, e.g. OpenMetrics `_created` or an
    interface's ifindex: a changed epoch means that series restarted from 0.
    `started` (optional, same keys) is when each series began counting, in seconds since the
    epoch, where the source says (OpenMetrics `_created`, Prometheus `process_start_time_seconds`):
    on a dimension's first reading, a series that began after the machine booted counts from 0.
    `legacy_total` is only for built-ins whose reading changed meaning: what an older agent would
    have read, to migrate a baseline it saved.
    `breakdown` (optional) splits `value` by labels, `{(("tenant", "acme"),): Decimal(12)}` (see
    `label_set`); its parts sum to `value` (usage without labels under `()`). For a running
    total (`counter: true`) give `series` instead: with a breakdown present, the sampler breaks
    each sample down by the labels of the series its increment came from.
    """

    value: Decimal
    state: dict[str, Any] | None = None
    series: Mapping[str, Decimal] | None = None
    epochs: Mapping[str, str] | None = None
    legacy_total: Decimal | None = None

    @classmethod
    def of_series(
        cls,
        series: Iterable[tuple[Mapping[str, str], Decimal]],
        state: dict[str, Any] | None = None,
        epochs: Iterable[tuple[Mapping[str, str], str]] = (),
        legacy_total: Decimal | None = None,
        breakdown: Mapping[LabelSet, Decimal] | None = None,
        started: Iterable[tuple[Mapping[str, str], Decimal]] = (),
    ) -> Reading:
        """A reading made of per-series running totals; a label set listed twice is summed.
        A `breakdown` (with `counter: true`, any mapping, e.g. `{}`) asks for samples broken
        down by the labels of each series."""
        values: dict[str, Decimal] = {}
        for labels, value in series:
            key = series_key(labels)
            values[key] = values.get(key, Decimal(0)) + value
        marks = {series_key(labels): str(epoch) for labels, epoch in epochs}
        begun = {series_key(labels): Decimal(at) for labels, at in started}
        return cls(
            sum(values.values(), Decimal(0)),
            state,
            values,
            {k: v for k, v in marks.items() if k in values} or None,
            legacy_total,
            breakdown=breakdown,
            started={k: v for k, v in begun.items() if k in values} or None,
        )

    # A problem with part of the source that did not stop the reading (a log line whose value is
    # not a number): the sample is stored, and the problem is counted in `status` as an error.
    problem: str | None = None
    breakdown: Mapping[LabelSet, Decimal] | None = None
    # Usage this reading found lost for good (see `Unread`); the value is still stored.
    unread: tuple[Unread, ...] = ()
    started: Mapping[str, Decimal] | None = None
    # Lines this reading read, for the agent's metrics (`log`; a collector of lines asked to
    # count them by `report_lines`); None: not counted.
    lines: int | None = None


@dataclass
class Sources:
    """The outside world a collector reads from, passed in so tests can replace it."""

    psutil: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    proc: Path = Path("/proc")  # procfs root: the kernel's boot id
    sys: Path = Path("/sys")  # sysfs root: which network interfaces are backed by a device
    # What `prepare-image` recorded of the logs in the image (imagerecord.ImageRecord), when it
    # applies: only to this instance's first boot (`run` claims it); None: `start_at` decides.
    image: Any = None
    # Whether a counter that began after boot may count from 0 on its first reading (SPEC: on a
    # fresh ledger). False where a ledger was already used in this boot (`run` finds its health
    # file or a damaged copy written since boot): that ledger may have billed the counter.
    count_from_boot: bool = True

    def boot_id(self) -> str | None:
        """The kernel's boot id, new at every boot; None where the kernel does not offer one.

        Unlike psutil's boot time (now minus uptime), it does not move when the wall clock is
        stepped (NTP at boot, a VM restored from a snapshot).
        """
        try:
            text = (self.proc / "sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        return text or None

    def boot_time(self) -> Decimal | None:
        """When the machine booted, in seconds since the epoch (`btime` in /proc/stat); None where
        it cannot be read. It is the wall clock's time at boot, so a counter's start (a time on
        the same clock) can be compared with it."""
        try:
            text = (self.proc / "stat").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("btime "):
                try:
                    return Decimal(line.split()[1])
                except (IndexError, ArithmeticError):
                    return None
        return None

    def get_psutil(self) -> Any:
        if self.psutil is None:
            import psutil

            self.psutil = psutil
        return self.psutil


class Collector:
    """Base class for every collector, built-in or third-party.

    Subclasses set `type_name` and `options` (the keys their config mapping takes besides `type` and
    `counter`), and override `read`. They may override `kind`/`cumulative` when those depend on the
    options, and `probe` to tell `check --offline` whether the source exists yet.
    """

    type_name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Field]] = {}
    produces: ClassVar[Kind] = "level"
    # A label never folded into `()` beyond MAX_LABEL_SETS (see `fold`): SaaS mode's customer
    # label, set by the sampler.
    keep_label: str | None = None
    # Whether the running totals it reads live on this machine, so that a new boot (the kernel's
    # boot id) restarts them; False for a source that reads other machines' counters (promql).
    local_counters: ClassVar[bool] = True

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        self.config = dict(options)
        self.sources = sources

    @classmethod
    def kind(cls, options: Mapping[str, Any]) -> Kind:
        """What `read` yields for these options: `level` or `increment` (or a running total)."""
        return cls.produces

    @classmethod
    def cumulative(cls, options: Mapping[str, Any]) -> bool:
        """True when `read` returns a running total that the sampler must difference."""
        return False

    @classmethod
    def validate(cls, options: dict[str, Any], path: str) -> None:
        """Cross-key checks beyond each option's own spec; raise ConfigError naming the key."""

    def labels(self) -> frozenset[str] | None:
        """The label names this collector's breakdowns can carry; None: unknown (any)."""
        return None

    def count_labels(self, on: bool) -> None:
        """Whether the dimension bills labels (allocations); a collector for which keeping them
        apart costs work skips it when off. By default there is nothing to skip."""
        return None

    def report_lines(self, on: bool) -> None:
        """Whether each reading says how many lines it read (`Reading.lines`: the metrics' lines
        read); a collector for which counting costs work counts only when on. By default a
        collector reads no lines."""
        return None

    def probe(self) -> None:
        """Raise SourceMissing when the source is absent; by default every source is present."""

    def read(self, state: dict[str, Any] | None) -> Reading:
        """Take one reading. `state` is what the previous reading returned (None at first)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the collector holds between readings (open files); by default
        nothing. Called when a reload drops or changes its dimension."""

    def read_within(self, state: dict[str, Any] | None, in_time: Callable[[], bool]) -> Reading:
        """`read` bounded by the dimension's `timeout`: `in_time()` turns False at the deadline.
        A collector whose read can be long (a log backlog) overrides it to stop at a safe point
        and go on at the next reading; by default the read runs whole (the daemon abandons a
        read past its deadline, never waits for it)."""
        return self.read(state)
