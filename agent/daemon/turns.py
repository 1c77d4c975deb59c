"""The daemon's round lock: reads store their samples under it, and sealing runs under it; its
holder can let the threads waiting for it go first (`give_way`).

Why: sealing an hour of many customers takes seconds (SaaS mode: 100,000 records a dimension).
It runs in short steps (billing/saas_sealing.py), and between two steps the sealer gives way, so a
read that finished meanwhile stores its sample within one step's time instead of after the whole
pass (and is not taken for a late read). A plain lock released and taken again at once would
usually go straight back to its holder: `give_way` waits until every thread that was waiting
has had its turn. While sealing works out the records (no ledger write), it does not hold the lock
at all (`released`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType


class Turns:
    """A lock (a context manager, like threading.Lock) with `give_way` and `released` for its
    holder (billing.sealing.Turn)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Condition()
        self._waiting = 0  # threads in acquire()
        self._entered = 0  # acquisitions through acquire(), ever
        self._owner: int | None = None

    def acquire(self) -> None:
        with self._state:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._state:
                self._waiting -= 1
                self._entered += 1
                self._state.notify_all()
        self._owner = threading.get_ident()

    def release(self) -> None:
        self._owner = None
        self._lock.release()

    def __enter__(self) -> Turns:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def give_way(self) -> None:
        """If this thread holds the lock and others wait for it: release it until each of those
        has had it once, then hold it again. A no-op for a thread that does not hold it."""
        if self._owner != threading.get_ident():
            return
        with self._state:
            waiting, entered = self._waiting, self._entered
        if not waiting:
            return
        self.release()
        with self._state:
            self._state.wait_for(lambda: self._entered >= entered + waiting)
        self._lock.acquire()  # not counted: the waiters' turns are what give_way waits for
        self._owner = threading.get_ident()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Not held during the block (work that writes nothing: sealing's arithmetic), held again
        after it; a no-op for a thread that does not hold it."""
        if self._owner != threading.get_ident():
            yield
            return
        self.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._owner = threading.get_ident()
