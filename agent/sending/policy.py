"""The send policy, with no I/O: capped, jittered backoff; when a record may go (`sendable_at`)
and when it can no longer (`expires_at`, by the record's own kind: an instance hour's 6 h, a SaaS
record's 24 h and month-end); `due`, the one rule for when a send pass would do something, which
the daemon schedules with, the sender decides with and `status` shows; a pass's Report."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from agent.ledger.hours import SealedHour
from agent.ledger.send_state import SendState
from agent.sending.outcomes import Outcome
from agent.windows import (
    OUT_OF_WINDOW,
    SAAS_OUT_OF_WINDOW,
    instance_expires_at,
    saas_expires_at,
)

DRYRUN_RECHECK = 300.0  # while not authorized, DryRun again every 5 minutes
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0


class Client(Protocol):
    def meter_usage(self, h: SealedHour) -> Outcome: ...

    def dry_run(
        self, product_code: str, dimension: str, decimals: int | None, now: float
    ) -> Outcome: ...


@dataclass
class Report:
    sent: list[tuple[str, int, str]] = field(default_factory=list)  # dimension, hour, record id
    retry: list[tuple[str, int, str]] = field(default_factory=list)
    rejected: list[tuple[str, int, str]] = field(default_factory=list)
    held: list[tuple[str, int, str]] = field(default_factory=list)  # the seller's config refused
    reissued: list[tuple[str, int]] = field(default_factory=list)
    expired: list[tuple[str, int]] = field(default_factory=list)
    dry_run: str | None = None  # outcome status of a DryRun made in this run
    paused: bool = False  # not authorized: nothing was sent


def backoff(failures: int, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter (uniform in [0, min(cap, base * 2^n)])."""
    return rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures, 30)))


def _never(x: NoReturn) -> NoReturn:
    """mypy proves each `match` on an outcome handles every one (typing.assert_never is 3.11+)."""
    raise AssertionError(f"unhandled outcome {x!r}")


def expires_at(h: SealedHour) -> float:
    """When a sealed record can no longer be sent: MeterUsage's 6 h window for an instance
    hour, BatchMeterUsage's 24 h window and month-end cutoff for a SaaS record."""
    if h.customer:
        return saas_expires_at(h.timestamp)
    return instance_expires_at(h.timestamp)


def out_of_window(h: SealedHour) -> str:
    return SAAS_OUT_OF_WINDOW if h.customer else OUT_OF_WINDOW


def sendable_at(state: SendState, next_attempt: float) -> float | None:
    """When an hour next tried at `next_attempt` may go: not before the backoff ends, and not
    while sending is paused (None)."""
    return None if state.authorized is False else max(next_attempt, state.backoff_until)


def due(
    state: SendState,
    pending: list[SealedHour],
    window: Callable[[float], float] | None = None,
) -> float | None:
    """The earliest time a send run would do something: a DryRun, a pending hour's send, or its
    expiry; None if nothing. The one rule for the daemon's scheduling, its "start a sender now?"
    (due <= now), the sender's own per-hour decision (sendable_at) and `status`. `window`: when a
    record of a Timestamp expires, for records of one mode (Mode.expires_at); else each record's
    own kind's (`expires_at`)."""
    if state.identity_unverified:  # nothing leaves until IMDS confirms the instance
        return None
    times = [expires_at(h) if window is None else window(h.timestamp) for h in pending]
    times += [t for h in pending if (t := sendable_at(state, h.next_attempt)) is not None]
    if state.dryrun_due is not None:
        times.append(state.dryrun_due)
    return min(times, default=None)
