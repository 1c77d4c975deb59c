"""`metrics: {textfile: PATH}`: the agent's own state as Prometheus metrics, in a file that
node_exporter's textfile collector serves (written by textfile.py).

One writer, the daemon (`run`): the send child's outcomes reach the file through the ledger, so
the per-dimension counters the daemon keeps in memory are never overwritten by a process that
lacks them. Written from what the daemon already holds, never from a ledger scan of its own on a
timer:
- at every send tick (15 s of clock time, the daemon's existing timer) from the send state and the
  pending bounds the tick reads anyway: the last accepted send and the oldest pending record's age;
- the record counts and health are taken again only when something changed them: whenever the
  daemon publishes health, and when the tick finds the send state or the pending bounds changed
  (a send pass did something; while a sender runs, the tick looks at the send state alone) or
  health.json rewritten (a send pass writes it when it ends). Health is health.json's `ok`: the
  verdict the product reads, with what only the daemon knows (its storage state);
- collector errors and lines read are counted as the daemon records them.

Counters: `metering_agent_collector_errors_total` continues the ledger's per-dimension count, so it
survives restarts (it resets only with a new ledger); `metering_agent_log_lines_read_total` counts
from 0 at each start (`metering_agent_start_time_seconds` says when; Prometheus' rate() and
increase() treat the drop as a reset).

Without `metrics:` the daemon holds `NoMetrics`: chosen once, nothing is counted or queried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from agent.clock import HOUR, hour_start
from agent.config.model import Config
from agent.daemon import textfile
from agent.daemon.textfile import Family
from agent.errors import ConfigError
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.ledger.send_state import SendState
from agent.sending.health import HEALTH_FILE

log = logging.getLogger(__name__)

LOOKBACK = 24 * HOUR  # the settled records counted: the hours of the last day (health's lookback)
SETTLED = ("sent", "rejected", "expired")


class Metrics(Protocol):
    """What the daemon tells its metrics; `NoMetrics` ignores it all."""

    def collector_error(self, dimension: str) -> None: ...

    def lines_read(self, dimension: str, lines: int | None) -> None: ...

    def tick(
        self,
        ledger: Ledger,
        now: float,
        state: SendState | None = None,
        bounds: Sequence[SealedHour] | None = None,
    ) -> None: ...

    def refresh(self, ledger: Ledger, now: float) -> None: ...

    def write(self, now: float) -> None: ...

    def reconfigured(self, config: Config, ledger: Ledger, now: float) -> Metrics: ...


class NoMetrics:
    """No `metrics:` in the config: nothing counted, queried or written."""

    def collector_error(self, dimension: str) -> None:
        return None

    def lines_read(self, dimension: str, lines: int | None) -> None:
        return None

    def tick(
        self,
        ledger: Ledger,
        now: float,
        state: SendState | None = None,
        bounds: Sequence[SealedHour] | None = None,
    ) -> None:
        return None

    def refresh(self, ledger: Ledger, now: float) -> None:
        return None

    def write(self, now: float) -> None:
        return None

    def reconfigured(self, config: Config, ledger: Ledger, now: float) -> Metrics:
        return metrics_for(config, ledger, started=now)


class TextfileMetrics:
    """The state behind the file, and the file. Counters are bumped by the reads' threads (under
    the daemon's round lock); the tick (the scheduler's thread) and health's publication (any
    thread) take the counts and write under this object's lock, rendering copies of the
    counters."""

    def __init__(
        self,
        path: Path,
        dimensions: Iterable[str],
        started: float,
        errors: Mapping[str, int],
        health_file: Path,
    ) -> None:
        self.path = path
        self.health_file = health_file
        self.dimensions = tuple(dimensions)
        self.started = started
        self.errors: dict[str, int] = dict(errors)
        self.lines: dict[str, int] = {}
        self.counts: dict[str, int] | None = None  # None: not yet taken from the ledger
        self.healthy: bool | None = None
        self.state: SendState | None = None
        self.bounds: tuple[SealedHour, ...] = ()
        self.health_mark: tuple[int, int] | None = None  # health.json as last read (inode, mtime)
        self._failing: str | None = None  # why the last write failed (logged once)
        self._lock = threading.RLock()  # tick, refresh and write: one at a time

    def collector_error(self, dimension: str) -> None:
        self.errors[dimension] = self.errors.get(dimension, 0) + 1

    def lines_read(self, dimension: str, lines: int | None) -> None:
        if lines is not None:
            self.lines[dimension] = self.lines.get(dimension, 0) + lines

    def tick(
        self,
        ledger: Ledger,
        now: float,
        state: SendState | None = None,
        bounds: Sequence[SealedHour] | None = None,
    ) -> None:
        """The send tick: the send state and pending bounds as it read them (None: while a
        sender runs the tick reads no bounds, so the send state is looked up, one meta read,
        and the bounds kept). When either differs from the last tick's (a send pass sent,
        refused, expired or backed off something), or health.json was written since (a send
        pass writes it when it ends), the counts and health are taken again; else the file is
        rewritten as it was, its age moved on."""
        with self._lock:
            state = ledger.send_state() if state is None else state
            bounds = self.bounds if bounds is None else tuple(bounds)
            same = state == self.state and bounds == self.bounds
            if self.counts is not None and same and _mark(self.health_file) == self.health_mark:
                self.write(now)
                return
            self.bounds = bounds
            self.refresh(ledger, now)

    def refresh(self, ledger: Ledger, now: float) -> None:
        """Health as health.json says it (written by the daemon or by a send pass: the file the
        product reads) and the ledger's record counts (through the (state, hour) index; only
        when something changed them), then the file."""
        with self._lock:
            self.health_mark = _mark(self.health_file)
            self.healthy = _ok(self.health_file)
            try:
                self.counts = ledger.record_counts(hour_start(now) - LOOKBACK)
                self.state = ledger.send_state()
            except sqlite3.Error:  # a ledger that cannot be read (named in health): the last
                pass  # counts stand, health says not ok
            if self.counts is not None and not self.counts["pending"]:
                self.bounds = ()  # (the tick's bounds may predate the send that emptied them)
            self.write(now)

    def families(self, now: float) -> list[Family]:
        counts = self.counts or {}
        state = self.state or SendState()
        errors, lines = dict(self.errors), dict(self.lines)  # (bumped by other threads)
        oldest = min((b.timestamp for b in self.bounds), default=None)
        age = 0.0 if oldest is None else max(0.0, now - oldest)
        return [
            Family("metering_agent_healthy", "gauge",
                   "1 when health.json says ok (sending works, nothing lost in the last 24 h, "
                   "storage works, no usage found unread), else 0 (also when it is missing)",
                   [((), 1 if self.healthy else 0)]),
            Family("metering_agent_pending_records", "gauge",
                   "Sealed records (one per dimension and hour; in SaaS mode per customer too) "
                   "waiting to be sent",
                   [((), counts.get("pending", 0))]),
            Family("metering_agent_recent_records", "gauge",
                   "Sealed records of the last 24 h's hours that were sent, rejected (failed for "
                   "good) or expired (out of the service's window), by state",
                   [((("state", s),), counts.get(s, 0)) for s in SETTLED]),
            Family("metering_agent_oldest_pending_age_seconds", "gauge",
                   "Seconds since the Timestamp of the oldest pending record (0: none pending); "
                   "MeterUsage refuses a record 6 h after it, BatchMeterUsage after 24 h",
                   [((), age)]),
            Family("metering_agent_last_accepted_timestamp_seconds", "gauge",
                   "Unix time the service last accepted a usage record from this agent (0: never)",
                   [((), state.last_accepted or 0)]),
            Family("metering_agent_collector_errors_total", "counter",
                   "Collector errors per dimension (kept in the ledger: continues across restarts)",
                   [((("dimension", d),), errors.get(d, 0)) for d in self.dimensions]),
            Family("metering_agent_log_lines_read_total", "counter",
                   "Lines read per log dimension since the agent started",
                   [((("dimension", d),), n) for d, n in sorted(lines.items())]),
            Family("metering_agent_start_time_seconds", "gauge",
                   "Unix time the agent started (its lines-read counters count from then)",
                   [((), self.started)]),
        ]  # fmt: skip

    def write(self, now: float) -> None:
        """Rewrite the file; a failure is logged when it begins and when it ends, never raised:
        metrics must not stop sampling or billing."""
        with self._lock:
            if self.counts is None:
                return  # nothing taken from the ledger yet: no file that says 0 pending
            try:
                textfile.replace(self.path, textfile.render(self.families(now)))
            except OSError as e:
                reason = f"{e.strerror or e}"
                if reason != self._failing:
                    log.warning("metrics file %s cannot be written: %s", self.path, reason)
                    self._failing = reason
                return
            if self._failing is not None:
                log.info("metrics file %s is written again", self.path)
                self._failing = None

    def reconfigured(self, config: Config, ledger: Ledger, now: float) -> Metrics:
        """After a reload: this object, its counters kept, with the new config's dimensions and
        path; the file it wrote before is removed when the path changed or metrics are off (it
        would be served, stale, for ever)."""
        path = None if config.metrics is None else Path(config.metrics.textfile)
        with self._lock:
            if path != self.path:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            if path is None:
                return NoMetrics()
            self.dimensions = tuple(d.name for d in config.dimensions)
            self.path = path
            self.write(now)
        return self


def metrics_for(config: Config, ledger: Ledger, started: float) -> Metrics:
    """The config's metrics, chosen once (and again at a reload); the collector error counts
    continue the ledger's."""
    if config.metrics is None:
        return NoMetrics()
    errors = {s.dimension: s.errors for s in ledger.dimension_status()}
    return TextfileMetrics(
        Path(config.metrics.textfile),
        (d.name for d in config.dimensions),
        started,
        errors,
        Path(config.state_dir) / HEALTH_FILE,
    )


def _mark(path: Path) -> tuple[int, int] | None:
    """What tells a rewritten health.json apart (a rename gives a new inode; a rewrite in place
    on a full disk, a new mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _ok(path: Path) -> bool:
    """health.json's `ok`; a file missing or unreadable is not ok (as `status --check` says)."""
    try:
        return json.loads(path.read_text()).get("ok") is True
    except (OSError, ValueError, AttributeError):
        return False


def check(config: Config) -> None:
    """`run` and `check`: the metrics file's directory must exist and be writable by this user
    (ConfigError, exit 78, naming the key). Not at load: `status` or `report` run by another
    user must not fail for it."""
    if config.metrics is None:
        return
    path = Path(config.metrics.textfile)
    if path.parent == Path(config.state_dir) and not path.parent.exists():
        return  # in the state dir (see docs/metrics.md), which `run` makes
    found = textfile.problem(path)
    if found is not None:
        raise ConfigError("metrics.textfile", found)
