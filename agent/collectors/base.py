"""The collector protocol: one class per kind of source; a plugin overrides one method, `read`.

A collector yields either *levels* (a reading of the present: CPUs, users) or *increments* (the
amount since its previous reading: log lines). A collector whose reading is a running total
(`cumulative`) is turned into increments by the sampler, which keeps the baseline durably.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Literal

from agent.fields import Field

Kind = Literal["level", "increment"]


class CollectorError(Exception):
    """An expected failure of a source (unreachable, unreadable, unparsable): one line, no trace."""


class SourceMissing(CollectorError):
    """The source does not exist (yet): a log file not written, a product not started."""


@dataclass(frozen=True)
class Reading:
    """What one `read` returns: the value and the collector's position to persist with it."""

    value: Decimal
    state: dict[str, Any] | None = None
    # A problem with part of the source that did not stop the reading (a log line whose value is
    # not a number): the sample is stored, and the problem is counted in `status` as an error.
    problem: str | None = None


@dataclass
class Sources:
    """The outside world a collector reads from, passed in so tests can replace it."""

    psutil: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

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

    def probe(self) -> None:
        """Raise SourceMissing when the source is absent; by default every source is present."""

    def read(self, state: dict[str, Any] | None) -> Reading:
        """Take one reading. `state` is what the previous reading returned (None at first)."""
        raise NotImplementedError
