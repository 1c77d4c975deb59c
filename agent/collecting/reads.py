"""Collector reads, one dimension at a time each, in daemon threads with a total deadline.

A round no longer reads every dimension in turn under one lock: each dimension's reads run on its
own worker thread, so a slow or hung source skips only its own instants while the others keep theirs
(and `integral` keeps its weight). A read that passes its deadline no longer holds sealing, and
no new read of that dimension starts while it is still running (a collector is never used by two
threads): its instants are skipped and counted. The threads are daemons: SIGTERM and the exit
never wait for a hung source.

A stop's last reading (`Reads.last`) is queued behind the read in flight on the same worker, so it
starts the moment that one ends, and neither it nor the wait for it (`Reads.idle`) passes the
stop's deadline: a hung source is left behind, the stop goes on.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.clock import hour_start, iso


@dataclass(frozen=True)
class InFlight:
    t: float  # the sampling instant being read
    deadline: float  # on the monotonic clock


class _Worker:
    """A daemon thread that runs one dimension's reads, one at a time (a thread per dimension, not
    per read: starting a thread costs more CPU than most reads)."""

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._work: deque[Callable[[], None]] = deque()
        self.busy = False  # a read is running or queued
        self.thread = threading.Thread(target=self._run, name=f"read {name}", daemon=True)
        self.thread.start()

    def give(self, work: Callable[[], None]) -> None:
        """Run `work` next: at once when idle, else after what runs now (a stop's last read)."""
        with self._cond:
            self.busy = True
            self._work.append(work)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._work:
                    self._cond.wait()
                work = self._work.popleft()
            try:
                work()
            finally:
                with self._cond:
                    self.busy = bool(self._work)
                    self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self.busy, timeout)


class Reads:
    """The read in flight for each dimension."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._reads: dict[str, InFlight] = {}
        self._workers: dict[str, _Worker] = {}

    def start(
        self, name: str, t: float, budget: float, work: Callable[[Callable[[], bool]], None]
    ) -> str | None:
        """Run `work(in_time)` on `name`'s worker thread for its instant `t`; `in_time()` says
        whether the deadline (`budget` seconds from now) has not passed yet. Returns None, or why
        the instant is skipped: the previous read of this dimension is still running."""
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = _Worker(name)
            current = self._reads.get(name)
            if worker.busy and current is not None:
                late = self.monotonic() > current.deadline
                return f"instant skipped: the read for {iso(current.t)} is still running" + (
                    " past its timeout (abandoned)" if late else ""
                )
            deadline = self.monotonic() + budget
            self._reads[name] = InFlight(t, deadline)
            worker.give(lambda: work(lambda: self.monotonic() <= deadline))
        return None

    def holds(self, name: str, hour: int) -> bool:
        """True while a read of `name` for an instant in or before `hour` is within its deadline:
        sealing waits for it (at most one timeout) rather than drop a sample a moment late."""
        with self._lock:
            current = self._reads.get(name)
            worker = self._workers.get(name)
        return (
            current is not None
            and worker is not None
            and worker.busy
            and self.monotonic() <= current.deadline
            and hour_start(current.t) <= hour
        )

    def last(
        self,
        name: str,
        t: float,
        timeout: float,
        end: float,
        work: Callable[[Callable[[], bool]], None],
    ) -> float:
        """A stop's last reading of `name` at instant `t`: `work(in_time)` runs on the worker as
        soon as the read in flight (if any) ends, with `timeout` s from then. It has until the
        in-flight read's deadline (or now) plus `timeout`, never past `end` (monotonic): that
        time is returned, and a read that could only start after it does not run."""
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = _Worker(name)
            current = self._reads.get(name)
            now = self.monotonic()
            after = max(now, current.deadline) if worker.busy and current is not None else now
            own_end = min(end, after + timeout)

            def run() -> None:
                begun = self.monotonic()
                if begun > own_end:
                    return
                deadline = min(begun + timeout, own_end)
                with self._lock:
                    self._reads[name] = InFlight(t, deadline)
                work(lambda: self.monotonic() <= deadline)

            worker.give(run)
        return own_end

    def newest(self) -> float | None:
        """The latest instant a read was started for (any dimension), if any."""
        with self._lock:
            return max((r.t for r in self._reads.values()), default=None)

    def idle(self, until: Mapping[str, float]) -> list[str]:
        """Wait until the workers named in `until` have nothing running or queued, each at most
        until its own time there (monotonic); the names still busy then (their reads are
        abandoned)."""
        with self._lock:
            workers = {n: self._workers[n] for n in until if n in self._workers}
        return [
            name
            for name, worker in workers.items()
            if not worker.wait(max(0.0, until[name] - self.monotonic()))
        ]

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the reads in flight (tests; never the stop); True if done."""
        end = self.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        return all(w.wait(max(0.0, end - self.monotonic())) for w in workers)
