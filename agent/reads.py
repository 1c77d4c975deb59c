"""Collector reads, one dimension at a time each, in daemon threads with a total deadline.

A round no longer reads every dimension in turn under one lock: each dimension's read runs in its
own thread, so a slow or hung source skips only its own instants while the others keep theirs
(and `integral` keeps its weight). A read that passes its deadline is abandoned: its result, if
it ever comes, is discarded (its collector position with it, so nothing is counted twice), and no
new read of that dimension starts while it is still running (a collector is never used by two
threads). The threads are daemons: SIGTERM and the exit never wait for a hung source.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.clock import hour_start, iso
from agent.config import Dimension
from agent.sampling import Sample, Sampler


@dataclass(frozen=True)
class InFlight:
    t: float  # the sampling instant being read
    deadline: float  # on the monotonic clock
    thread: threading.Thread


class Reads:
    """The read in flight for each dimension."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._reads: dict[str, InFlight] = {}

    def start(
        self, name: str, t: float, budget: float, work: Callable[[Callable[[], bool]], None]
    ) -> str | None:
        """Run `work(in_time)` in a new daemon thread for `name`'s instant `t`; `in_time()` says
        whether the deadline (`budget` seconds from now) has not passed yet. Returns None, or why
        the instant is skipped: the previous read of this dimension is still running."""
        with self._lock:
            current = self._reads.get(name)
            if current is not None and current.thread.is_alive():
                late = self.monotonic() > current.deadline
                return f"instant skipped: the read for {iso(current.t)} is still running" + (
                    " past its timeout (abandoned)" if late else ""
                )
            deadline = self.monotonic() + budget
            thread = threading.Thread(
                target=work,
                args=(lambda: self.monotonic() <= deadline,),
                name=f"read {name}",
                daemon=True,
            )
            self._reads[name] = InFlight(t, deadline, thread)
            thread.start()
        return None

    def holds(self, name: str, hour: int) -> bool:
        """True while a read of `name` for an instant in or before `hour` is within its deadline:
        sealing waits for it (at most one timeout) rather than drop a sample a moment late."""
        with self._lock:
            current = self._reads.get(name)
        return (
            current is not None
            and current.thread.is_alive()
            and self.monotonic() <= current.deadline
            and hour_start(current.t) <= hour
        )

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the reads in flight (tests; never the stop); True if done."""
        end = self.monotonic() + timeout
        with self._lock:
            threads = [r.thread for r in self._reads.values()]
        for thread in threads:
            thread.join(max(0.0, end - self.monotonic()))
        return not any(t.is_alive() for t in threads)


def take_within(sampler: Sampler, dim: Dimension, t: float, saved: Any) -> Sample:
    """One reading within the dimension's `timeout`, for `check` and `sample`: a hung source is a
    failed collector there too, and the command still ends (the read's thread is a daemon)."""
    timeout = float(dim.collector.options.get("timeout", 10))
    box: list[Sample] = []
    thread = threading.Thread(
        target=lambda: box.append(sampler.take(dim, t, saved)), name=f"read {dim.name}", daemon=True
    )
    thread.start()
    thread.join(timeout)
    if box:
        return box[0]
    return Sample(dim.name, t, None, None, None, f"no answer within its {timeout:g} s timeout")
