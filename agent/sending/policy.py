"""Sending sealed hours: oldest first, the identical sealed request every time, and the policy for
what each answer means (retry with capped, jittered backoff; pause on AccessDenied until a DryRun
passes; expire past the 6 h window; reject what can never succeed).

The client is passed in, so this runs with a real boto3 client in the short-lived `send` child and
with a fake one in unit tests.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from agent.clock import Clock, hour_start, iso, iso_hour
from agent.config.model import Config
from agent.host import platform as platforms
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.ledger.send_state import SendState
from agent.sending import health
from agent.sending.outcomes import PRODUCT_CODE_REFUSED, SIGNING, Outcome
from agent.windows import (
    OUT_OF_WINDOW,
    SAAS_OUT_OF_WINDOW,
    instance_expires_at,
    saas_expires_at,
    send_offset,
    send_slot,
)

log = logging.getLogger(__name__)

DRYRUN_RECHECK = 300.0  # while not authorized, DryRun again every 5 minutes
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
# Retried answers that are refusals at start-up under `on_check_failure: exit` (_refused_at_start).
START_REFUSALS = SIGNING | {"InvalidEndpointRegionException"}
PATIENCE = 60.0  # a send run waits out short backoffs itself, up to this long, then exits


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


def due(state: SendState, pending: list[SealedHour]) -> float | None:
    """The earliest time a send run would do something: a DryRun, a pending hour's send, or its
    expiry; None if nothing. The one rule for the daemon's scheduling, its "start a sender now?"
    (due <= now), the sender's own per-hour decision (sendable_at) and `status`."""
    if state.identity_unverified:  # nothing leaves until IMDS confirms the instance
        return None
    times = [expires_at(h) for h in pending]
    times += [t for h in pending if (t := sendable_at(state, h.next_attempt)) is not None]
    if state.dryrun_due is not None:
        times.append(state.dryrun_due)
    return min(times, default=None)


def next_send(ledger: Ledger, config: Config, now: float) -> float | None:
    """When the next send is due, for `status`: `due`, or the open hour's send slot if sooner (it
    is sealed at its end and sent at its end plus this instance's send offset)."""
    state = ledger.send_state()
    if state.identity_unverified:  # as in due(): nothing leaves
        return None
    offset = send_offset(ledger.get_meta("instance_id") or "", config.metering.send_window)
    times = (
        due(state, ledger.pending_bounds(saas=config.mode == "saas")),
        sendable_at(state, send_slot(hour_start(now), offset)),
    )
    return min((t for t in times if t is not None), default=None)


def note_unreachable(
    ledger: Ledger, config: Config, now: float, reason: str, rng: random.Random | None = None
) -> None:
    """The service could not even be addressed (no region, no IMDS): back off as for a retry."""
    delay = ledger.back_off(now, reason, functools.partial(backoff, rng=rng or random.Random()))
    log.warning("cannot send: %s; trying again in %.0f s", reason, delay)
    health.write(config.state_dir, ledger, now)


class Sender:
    saas = False  # the kind of record this sender sends: instance hours (customer '')

    def __init__(
        self,
        ledger: Ledger,
        config: Config,
        client: Client,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.client = client
        self.clock = clock
        self.rng = rng or random.Random()

    def run(self, flush: bool = False, deadline: float | None = None) -> Report:
        """One pass over the pending hours, oldest first.

        `flush` (at a stop) sends every pending hour now, ignoring send slots; otherwise only what
        is due. A retryable failure is waited out in this pass when its backoff ends before
        `deadline` (default: PATIENCE from now), else the pass ends and the daemon comes back.
        """
        report = Report()
        if deadline is None:
            deadline = self.clock.time() + PATIENCE
        try:
            unverified = self.ledger.send_state().identity_unverified
            if unverified:
                # A ledger maybe baked on another instance: `run` verifies it through IMDS.
                log.warning("not sending: %s", unverified)
                report.paused = True
                return report
            self._name_other_kind()
            self._expire_out_of_window(self.clock.time(), report)
            if not self._authorized(report, flush):
                report.paused = True
                return report
            self._send_pending(report, flush, deadline)
        finally:
            health.write(self.config.state_dir, self.ledger, self.clock.time())
        return report

    def _name_other_kind(self) -> None:
        """Pending records of the other mode (left by a config of that mode, same state_dir)
        are neither sent nor expired here: they wait for a config of their mode."""
        n, oldest = self.ledger.pending_other_kind(self.saas)
        if n:
            kind = "instance hour(s)" if self.saas else "SaaS record(s)"
            mode = "instance" if self.saas else "saas"
            log.warning("%d pending %s from hour %s on are not sent in this mode; they wait for "
                        "a config with mode: %s", n, kind, iso_hour(oldest or 0), mode)  # fmt: skip

    def _expire_out_of_window(self, now: float, report: Report) -> None:
        for h in (h for h in self.ledger.pending(saas=False) if now >= expires_at(h)):
            self._mark_expired(h, now, out_of_window(h), report)

    # -- DryRun ------------------------------------------------------------------------------

    probe_name = "MeterUsage DryRun"  # the permission probe, in log lines

    def _probe(self, now: float) -> Outcome:
        """The permission probe: MeterUsage DryRun of the first dimension."""
        dim = self.config.dimensions[0]
        return self.client.dry_run(self.config.product_code, dim.name, dim.decimals, now)

    def _authorized(self, report: Report, flush: bool = False) -> bool:
        """Whether sending may go on; a due DryRun runs first, except in a flush while sending
        is not paused: the stop flush's few seconds belong to the sealed hours (the DryRun
        stays due for the next pass)."""
        state = self.ledger.send_state()
        now, due = self.clock.time(), state.dryrun_due
        if flush and state.authorized is not False:
            return True
        if due is not None and due <= now:
            self._dry_run(report, now)
        return self.ledger.send_state().authorized is not False

    def _backoff(self, failures: int) -> float:
        return backoff(failures, self.rng)

    def _dry_run(self, report: Report, now: float) -> None:
        dim, name = self.config.dimensions[0], self.probe_name
        outcome = self._probe(now)
        report.dry_run = outcome.status
        match outcome.status:
            case "dryrun_ok":
                log.info("%s: permitted", name)
                self.ledger.authorize()
                self.ledger.note_success(now)
            case "held" if outcome.code != PRODUCT_CODE_REFUSED:
                # An unknown dimension says the role and product are fine: only that dimension's
                # hours are held (and named in health), the others are sent.
                log.error("%s for dimension %s: %s; its hours are held until the listing has it "
                          "or they expire", name, dim.name, outcome.error)  # fmt: skip
                self.ledger.authorize()
            case "unauthorized" | "rejected" | "expired" | "held":
                # Not authorized or not entitled: sending pauses and the DryRun repeats.
                log.error("%s refused (%s); sending paused, checking again in %d s",
                          name, outcome.error, DRYRUN_RECHECK)  # fmt: skip
                self.ledger.deauthorize(now, f"DryRun: {outcome.error}", now + DRYRUN_RECHECK)
            case "retry" if self._refused_at_start(outcome):
                log.error("%s failed at start-up (%s); metering.on_check_failure is exit: sending "
                          "paused", name, outcome.error)  # fmt: skip
                self.ledger.deauthorize(now, f"DryRun: {outcome.error}", now + DRYRUN_RECHECK)
            case "retry" | "sent":
                delay = self.ledger.back_off(now, f"DryRun: {outcome.error}", self._backoff)
                log.warning("%s failed (%s); again in %.0f s", name, outcome.error, delay)
            case _:
                _never(outcome.status)

    def _refused_at_start(self, outcome: Outcome) -> bool:
        """SPEC: with `on_check_failure: exit` (the default on ECS/EKS) a start-up DryRun that
        fails with anything but throttling, a 5xx or the network ends `run` with 77. Signing and
        credential answers and a wrong region are retried elsewhere (a refresh may fix them);
        before the first DryRun has passed they are refusals, so the sender exits 77 and `run`
        stops (Daemon.check_startup)."""
        if outcome.code not in START_REFUSALS or self.ledger.send_state().authorized is not None:
            return False
        plat = platforms.detect(self.config.platform, os.environ).name
        return platforms.check_failure_policy(self.config.metering.on_check_failure, plat) == "exit"

    # -- sending -----------------------------------------------------------------------------

    def _mark_expired(
        self, h: SealedHour, now: float, why: str, report: Report, error: str | None = None
    ) -> None:
        """Expire an unsent hour. Its last_error keeps the last answer (or `error`, the service's
        own), else says `why`; attempts stay as counted when requests left."""
        log.error("hour %s dimension %s%s: quantity %s expired unsent (%s; last error: %s)",
                  iso_hour(h.hour), h.dimension, f" customer {h.customer}" if h.customer else "",
                  h.quantity.text, why, error or h.last_error or "none, never sent")  # fmt: skip
        self.ledger.expire(h.dimension, h.hour, error=error or h.last_error or why, now=now,
                           customer=h.customer)  # fmt: skip
        report.expired.append((h.dimension, h.hour))
        self.ledger.note_failure(now, f"hour {iso_hour(h.hour)} {h.dimension} expired")

    def _send_pending(self, report: Report, flush: bool, deadline: float) -> None:
        queue = self.ledger.pending(saas=False)
        while queue:
            now = self.clock.time()
            if now >= deadline:
                return
            h = queue[0]
            if not flush:
                at = sendable_at(self.ledger.send_state(), h.next_attempt)
                if at is None or at > now:
                    queue.pop(0)
                    continue
            if now >= expires_at(h):
                self._mark_expired(h, now, OUT_OF_WINDOW, report)
                queue.pop(0)
                continue
            h = queue[0] = self._current_product(h, now, report)
            self.ledger.begin_attempt(h.dimension, h.hour, now)
            outcome = self.client.meter_usage(h)
            now = self.clock.time()
            where = f"hour {iso_hour(h.hour)} dimension {h.dimension}"
            error, until = outcome.error, iso(expires_at(h))
            match outcome.status:
                case "retry":
                    delay = self.ledger.back_off(now, error or "send failed", self._backoff)
                    log.warning("%s: send failed (%s); retrying after %.1f s (until %s)", where,
                                error, delay, until)  # fmt: skip
                    self.ledger.schedule_retry(h.dimension, h.hour, error=error,
                                               next_attempt=now + delay)  # fmt: skip
                    report.retry.append((h.dimension, h.hour, error or ""))
                    if now + delay >= deadline:
                        return
                    self.clock.sleep(delay)
                    continue  # the same hour again, the identical request
                case "unauthorized":
                    log.error("%s: not authorized (%s); sending paused, DryRun every %d s", where,
                              error, DRYRUN_RECHECK)  # fmt: skip
                    self.ledger.schedule_retry(h.dimension, h.hour, error=error,
                                               next_attempt=h.next_attempt)  # fmt: skip
                    self.ledger.deauthorize(now, error or "not authorized", now + DRYRUN_RECHECK)
                    report.paused = True
                    return
                case "held":
                    # The seller's configuration was refused (product code, dimension): pending
                    # until it expires, retried on its own backoff so other hours keep going out.
                    delay = max(BACKOFF_BASE, backoff(h.attempts + 1, self.rng))
                    log.error("%s: quantity %s refused (%s); held, not lost: fix the config "
                              "(product_code, dimensions[].name) or the listing and restart; "
                              "retrying in %.0f s until %s", where, h.quantity.text, error, delay,
                              until)  # fmt: skip
                    self.ledger.hold(h.dimension, h.hour, error=error, next_attempt=now + delay)
                    self.ledger.note_failure(now, f"{where} refused: {error}")
                    report.held.append((h.dimension, h.hour, error or ""))
                case "sent":
                    self.ledger.mark_sent(h.dimension, h.hour, record_id=outcome.record_id, now=now)
                    self.ledger.note_success(now)
                    log.info("%s: sent quantity %s, record %s", where, h.quantity.text,
                             outcome.record_id)  # fmt: skip
                    report.sent.append((h.dimension, h.hour, outcome.record_id or ""))
                case "expired":
                    self._mark_expired(h, now, "the service said so", report, error=error)
                case "rejected" | "dryrun_ok":
                    log.error("%s: quantity %s rejected: %s", where, h.quantity.text, error)
                    self.ledger.reject(h.dimension, h.hour, error=error, now=now)
                    self.ledger.note_failure(now, f"{where} rejected: {error}")
                    report.rejected.append((h.dimension, h.hour, error or ""))
                case _:
                    _never(outcome.status)
            queue.pop(0)

    def _current_product(self, h: SealedHour, now: float, report: Report) -> SealedHour:
        """An hour sealed under another product code goes out under the config's current one,
        with a new ClientToken, when the service never accepted it: no request of it left, or
        every one was refused for its product code. Otherwise (one may have been recorded: a
        timeout, a send child killed mid-request) it is resent identically."""
        current = self.config.product_code
        if h.product_code == current:
            return h
        if h.refusals != h.attempts:
            return h
        token = str(uuid.uuid4())
        if not self.ledger.reissue(
            h.dimension, h.hour, product_code=current, client_token=token, now=now
        ):
            return h
        log.warning(
            "hour %s dimension %s: re-issued under product code %s with a new ClientToken "
            "(sealed under %s, which the service never accepted)",
            iso_hour(h.hour),
            h.dimension,
            current,
            h.product_code,
        )
        report.reissued.append((h.dimension, h.hour))
        fresh = [x for x in self.ledger.pending() if (x.dimension, x.hour) == (h.dimension, h.hour)]
        return fresh[0] if fresh else h
