"""Sending sealed hours: oldest first, the identical sealed request every time, and the policy for
what each answer means (retry with capped, jittered backoff; pause on AccessDenied until a DryRun
passes; expire past the 6 h window; reject what can never succeed).

The client is passed in, so this runs with a real boto3 client in the short-lived `send` child and
with a fake one in unit tests.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from agent import health, sealing
from agent.aggregate import Quantity
from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.config import Config
from agent.ledger import Ledger, SealedHour
from agent.metering import PRODUCT_CODE_REFUSED, Outcome

log = logging.getLogger(__name__)

EXPIRY = 6 * HOUR - 60  # TimestampOutOfBounds past 6 h; give up a minute early
DRYRUN_RECHECK = 300.0  # while not authorized, DryRun again every 5 minutes
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
PATIENCE = 60.0  # a send run waits out short backoffs itself, up to this long, then exits


class Client(Protocol):
    def meter_usage(
        self,
        product_code: str,
        dimension: str,
        timestamp: float,
        quantity: Quantity,
        client_token: str,
    ) -> Outcome: ...

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


def work_due(ledger: Ledger, now: float) -> bool:
    """Whether a send run would do anything now: the daemon asks before spawning one."""
    dryrun_due = ledger.get_meta("dryrun_due")
    if dryrun_due is not None and dryrun_due <= now:
        return True
    if ledger.get_meta("authorized") is False:
        return False
    if (ledger.get_meta("backoff_until") or 0) > now:
        return False
    return any(h.next_attempt <= now or now - h.timestamp > EXPIRY for h in ledger.pending())


def next_due(ledger: Ledger) -> float | None:
    """When the next send or DryRun is due (for `status`)."""
    candidates = [h.next_attempt for h in ledger.pending()]
    if ledger.get_meta("authorized") is False:
        candidates = []
    backoff_until = ledger.get_meta("backoff_until") or 0
    candidates = [max(c, backoff_until) for c in candidates]
    dryrun_due = ledger.get_meta("dryrun_due")
    if dryrun_due is not None:
        candidates.append(dryrun_due)
    return min(candidates) if candidates else None


def back_off(ledger: Ledger, now: float, rng: random.Random) -> float:
    """Count one more failure in a row and hold every send until its backoff ends; the delay."""
    failures = ledger.get_meta("failures", 0) + 1
    delay = backoff(failures, rng)
    ledger.update_meta(failures=failures, backoff_until=now + delay)
    return delay


def note_unreachable(
    ledger: Ledger, config: Config, now: float, reason: str, rng: random.Random | None = None
) -> None:
    """The service could not even be addressed (no region, no IMDS): back off as for a retry."""
    delay = back_off(ledger, now, rng or random.Random())
    log.warning("cannot send: %s; trying again in %.0f s", reason, delay)
    due = ledger.get_meta("dryrun_due")
    if due is not None:
        ledger.update_meta(dryrun_due=max(due, now + delay))
    health.note_failure(ledger, now, reason)
    health.write(config.state_dir, ledger, now)


class Sender:
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
            unverified = self.ledger.get_meta("identity_unverified")
            if unverified:
                # A ledger maybe baked on another instance: `run` verifies it through IMDS.
                log.warning("not sending: %s", unverified)
                report.paused = True
                return report
            self._expire(report)
            if not self._authorized(report):
                report.paused = True
                return report
            self._send_pending(report, flush, deadline)
        finally:
            health.write(self.config.state_dir, self.ledger, self.clock.time())
        return report

    # -- DryRun ------------------------------------------------------------------------------

    def _authorized(self, report: Report) -> bool:
        now = self.clock.time()
        due = self.ledger.get_meta("dryrun_due")
        if due is not None and due <= now:
            self._dry_run(report, now)
        return self.ledger.get_meta("authorized") is not False

    def _dry_run(self, report: Report, now: float) -> None:
        dim = self.config.dimensions[0]
        outcome = self.client.dry_run(self.config.product_code, dim.name, dim.decimals, now)
        report.dry_run = outcome.status
        if outcome.status == "dryrun_ok":
            log.info("MeterUsage DryRun: permitted")
            self.ledger.update_meta(authorized=True, dryrun_due=None)
            health.note_success(self.ledger, now)
        elif outcome.status == "held" and outcome.code != PRODUCT_CODE_REFUSED:
            # An unknown dimension says the role and product are fine: only that dimension's
            # hours are held (and named in health), the others are sent.
            log.error(
                "MeterUsage DryRun for dimension %s: %s; its hours are held until the listing "
                "has it or they expire",
                dim.name,
                outcome.error,
            )
            self.ledger.update_meta(authorized=True, dryrun_due=None)
        elif outcome.status in ("unauthorized", "rejected", "expired", "held"):
            # Not authorized or not entitled: sending pauses and the DryRun repeats.
            log.error(
                "MeterUsage DryRun refused (%s); sending paused, checking again in %d s",
                outcome.error,
                DRYRUN_RECHECK,
            )
            self.ledger.update_meta(authorized=False, dryrun_due=now + DRYRUN_RECHECK)
            health.note_failure(self.ledger, now, f"DryRun: {outcome.error}")
        else:
            delay = back_off(self.ledger, now, self.rng)
            log.warning("MeterUsage DryRun failed (%s); again in %.0f s", outcome.error, delay)
            self.ledger.update_meta(dryrun_due=now + delay)
            health.note_failure(self.ledger, now, f"DryRun: {outcome.error}")

    # -- sending -----------------------------------------------------------------------------

    def _expire(self, report: Report) -> None:
        now = self.clock.time()
        for h in self.ledger.pending():
            if now - h.timestamp > EXPIRY:
                self._mark_expired(h, now, "older than the 6 h MeterUsage window", report)

    def _mark_expired(
        self, h: SealedHour, now: float, why: str, report: Report, error: str | None = None
    ) -> None:
        error = error or h.last_error or why
        log.error(
            "hour %s dimension %s: quantity %s expired unsent (%s; last error: %s)",
            iso_hour(h.hour),
            h.dimension,
            h.quantity.text,
            why,
            error,
        )
        self.ledger.mark(
            h.dimension, h.hour, state="expired", now=now, error=error, count_attempt=False
        )
        report.expired.append((h.dimension, h.hour))
        health.note_failure(self.ledger, now, f"hour {iso_hour(h.hour)} {h.dimension} expired")

    def _send_pending(self, report: Report, flush: bool, deadline: float) -> None:
        queue = self.ledger.pending()
        while queue:
            now = self.clock.time()
            if now >= deadline:
                return
            h = queue[0]
            if not flush:
                if (self.ledger.get_meta("backoff_until") or 0) > now:
                    return
                if h.next_attempt > now:
                    queue.pop(0)
                    continue
            if now - h.timestamp > EXPIRY:
                self._mark_expired(h, now, "older than the 6 h MeterUsage window", report)
                queue.pop(0)
                continue
            h = queue[0] = self._current_product(h, now, report)
            self.ledger.begin_attempt(h.dimension, h.hour, now)
            outcome = self.client.meter_usage(
                h.product_code, h.dimension, h.timestamp, h.quantity, h.client_token
            )
            now = self.clock.time()
            if outcome.status == "retry":
                delay = self._retry(h, outcome, now, report)
                if now + delay >= deadline:
                    return
                self.clock.sleep(delay)
                continue  # the same hour again, the identical request
            queue.pop(0)
            if outcome.status == "unauthorized":
                self._paused(h, outcome, now, report)
                return
            if outcome.status == "held":
                self._hold(h, outcome, now, report)
                continue
            self._settle(h, outcome, now, report)

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

    def _hold(self, h: SealedHour, outcome: Outcome, now: float, report: Report) -> None:
        """The seller's configuration was refused (product code, dimension): the hour stays
        pending until it expires, retried on its own backoff so other hours keep going out."""
        delay = max(BACKOFF_BASE, backoff(h.attempts + 1, self.rng))
        where = f"hour {iso_hour(h.hour)} dimension {h.dimension}"
        log.error(
            "%s: quantity %s refused (%s); held, not lost: fix the config (product_code, "
            "dimensions[].name) or the listing and restart; retrying in %.0f s until %s",
            where,
            h.quantity.text,
            outcome.error,
            delay,
            iso(h.timestamp + EXPIRY),
        )
        self.ledger.mark(
            h.dimension, h.hour, state="pending", now=now, error=outcome.error,
            next_attempt=now + delay, count_attempt=False,
        )  # fmt: skip
        health.note_failure(self.ledger, now, f"{where} refused: {outcome.error}")
        report.held.append((h.dimension, h.hour, outcome.error or ""))

    def _settle(self, h: SealedHour, outcome: Outcome, now: float, report: Report) -> None:
        where = f"hour {iso_hour(h.hour)} dimension {h.dimension}"
        if outcome.status == "sent":
            self.ledger.mark(
                h.dimension, h.hour, state="sent", now=now, record_id=outcome.record_id,
                count_attempt=False,
            )  # fmt: skip
            self.ledger.update_meta(failures=0, backoff_until=None, authorized=True)
            health.note_success(self.ledger, now)
            log.info("%s: sent quantity %s, record %s", where, h.quantity.text, outcome.record_id)
            report.sent.append((h.dimension, h.hour, outcome.record_id or ""))
        elif outcome.status == "expired":
            self._mark_expired(h, now, "the service said so", report, error=outcome.error)
        else:
            log.error("%s: quantity %s rejected: %s", where, h.quantity.text, outcome.error)
            self.ledger.mark(
                h.dimension, h.hour, state="rejected", now=now, error=outcome.error,
                count_attempt=False,
            )  # fmt: skip
            health.note_failure(self.ledger, now, f"{where} rejected: {outcome.error}")
            report.rejected.append((h.dimension, h.hour, outcome.error or ""))

    def _retry(self, h: SealedHour, outcome: Outcome, now: float, report: Report) -> float:
        delay = back_off(self.ledger, now, self.rng)
        log.warning(
            "hour %s dimension %s: send failed (%s); retrying after %.1f s (until %s)",
            iso_hour(h.hour),
            h.dimension,
            outcome.error,
            delay,
            iso(h.timestamp + EXPIRY),
        )
        self.ledger.mark(
            h.dimension, h.hour, state="pending", now=now, error=outcome.error,
            next_attempt=now + delay, count_attempt=False,
        )  # fmt: skip
        health.note_failure(self.ledger, now, outcome.error or "send failed")
        report.retry.append((h.dimension, h.hour, outcome.error or ""))
        return delay

    def _paused(self, h: SealedHour, outcome: Outcome, now: float, report: Report) -> None:
        log.error(
            "hour %s dimension %s: not authorized (%s); sending paused, DryRun every %d s",
            iso_hour(h.hour),
            h.dimension,
            outcome.error,
            DRYRUN_RECHECK,
        )
        self.ledger.mark(
            h.dimension, h.hour, state="pending", now=now, error=outcome.error, count_attempt=False
        )
        self.ledger.update_meta(authorized=False, dryrun_due=now + DRYRUN_RECHECK)
        health.note_failure(self.ledger, now, outcome.error or "not authorized")
        report.paused = True


def next_send(ledger: Ledger, config: Config, now: float) -> float | None:
    """When the next send or DryRun is due; while nothing is pending, the open hour's send slot
    (its end plus this instance's offset), so `status` never says `-` while an hour is open."""
    due = next_due(ledger)
    if due is not None:
        return due
    offset = sealing.send_offset(ledger.get_meta("instance_id") or "", config.metering.send_window)
    return hour_start(now) + HOUR + offset
