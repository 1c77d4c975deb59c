"""Pure: the fulfillment handler's limits, each given `now` (the handler's monotonic clock).

A registration is one POST per buyer, so anything beyond a few from one client, or beyond a few
ResolveCustomer calls a second in all, is a flood: it is answered at once (429 or 503 with
Retry-After), never queued. The same token posted again (a double click, a reload) is answered
from a short cache of its first answer, without a second call.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# ResolveCustomer from the handler: at most this many a second (burst: RESOLVE_BURST), well under
# the account's 10/s that it shares with BatchMeterUsage (sending/budget.py keeps the sum under).
RESOLVE_PER_SECOND = 2.0
RESOLVE_BURST = 4
# One client (an address; behind a trusted proxy, the address it forwards): a buyer posts once,
# perhaps again; a flood from N addresses then passes at most N a minute to ResolveCustomer.
CLIENT_PER_MINUTE = 1.0
CLIENT_BURST = 3
CLIENTS_KEPT = 10_000  # clients remembered; the least recently seen is forgotten first
CACHE_SECONDS = 600.0  # a token's answer is kept this long (a token is good for hours)
CACHE_KEPT = 10_000


@dataclass
class Rate:
    """A token bucket as GCRA: `per_second` on average, `burst` at once."""

    per_second: float
    burst: int
    _tat: float = field(default=-math.inf)  # when the bucket is full again

    def take(self, now: float) -> float:
        """0 when a call may go now (and it is counted); else the seconds until one may."""
        interval = 1.0 / self.per_second
        tat = max(self._tat, now)
        allowed_from = tat + interval - self.burst * interval
        if now < allowed_from:
            return allowed_from - now
        self._tat = tat + interval
        return 0.0


class ClientRates:
    """One Rate per client, the least recently seen forgotten beyond `kept`."""

    def __init__(self, per_second: float, burst: int, kept: int = CLIENTS_KEPT) -> None:
        self.per_second, self.burst, self.kept = per_second, burst, kept
        self._rates: OrderedDict[str, Rate] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str, now: float) -> float:
        with self._lock:
            rate = self._rates.pop(client, None) or Rate(self.per_second, self.burst)
            self._rates[client] = rate
            while len(self._rates) > self.kept:
                self._rates.popitem(last=False)
            return rate.take(now)


def token_key(token: str) -> str:
    """What the cache keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class AnswerCache(Generic[T]):
    """A token's answer for `seconds`, at most `kept` of them (the oldest go first)."""

    def __init__(self, seconds: float = CACHE_SECONDS, kept: int = CACHE_KEPT) -> None:
        self.seconds, self.kept = seconds, kept
        self._answers: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, now: float) -> T | None:
        with self._lock:
            found = self._answers.get(key)
            if found is None:
                return None
            if now >= found[0]:
                del self._answers[key]
                return None
            return found[1]

    def put(self, key: str, answer: T, now: float) -> None:
        with self._lock:
            self._answers.pop(key, None)
            self._answers[key] = (now + self.seconds, answer)
            while len(self._answers) > self.kept:
                self._answers.popitem(last=False)


def retry_after(seconds: float) -> str:
    """The Retry-After header's value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
