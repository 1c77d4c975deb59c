"""The send pass both modes share: nothing leaves a ledger whose instance is unverified; records
past their window are expired first; a due permission probe runs (MeterUsage DryRun, or SaaS
mode's empty BatchMeterUsage) and pauses sending while refused; health.json is rewritten at the
end, whatever happened. What a pass sends, and how, is its mode's: `Sender` (modes/instance.py,
one MeterUsage per hour) and `BatchSender` (modes/saas.py, BatchMeterUsage calls).

The client is passed in, so this runs with a real boto3 client in the short-lived `send` child and
with a fake one in unit tests.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from typing import Any

from agent.clock import Clock, iso_hour
from agent.config.model import Config
from agent.host import platform as platforms
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.sending import health
from agent.sending.outcomes import PRODUCT_CODE_REFUSED, SIGNING, Outcome
from agent.sending.policy import DRYRUN_RECHECK, Report, _never, backoff

log = logging.getLogger(__name__)

# Retried answers that are refusals at start-up under `on_check_failure: exit` (_refused_at_start).
START_REFUSALS = SIGNING | {"InvalidEndpointRegionException"}
PATIENCE = 60.0  # a send run waits out short backoffs itself, up to this long, then exits


def note_unreachable(
    ledger: Ledger, config: Config, now: float, reason: str, rng: random.Random | None = None
) -> None:
    """The service could not even be addressed (no region, no IMDS): back off as for a retry."""
    delay = ledger.back_off(now, reason, functools.partial(backoff, rng=rng or random.Random()))
    log.warning("cannot send: %s; trying again in %.0f s", reason, delay)
    health.write(config.state_dir, ledger, now)


class SendPass:
    """One pass over a ledger's pending records of one kind (`saas`: SaaS records, else instance
    hours); the mode's sender fills in `_probe`, `_expire_out_of_window` and `_send_pending`."""

    saas = False  # the kind of record this pass sends: instance hours (customer '') or SaaS
    other_kind = ("SaaS record(s)", "saas")  # the other kind, and its mode, in log lines
    probe_name = "permission probe"  # in log lines
    patience = PATIENCE  # a pass's default length

    def __init__(
        self,
        ledger: Ledger,
        config: Config,
        client: Any,
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
        `deadline` (default: `patience` from now), else the pass ends and the daemon comes back.
        """
        report = Report()
        if deadline is None:
            deadline = self.clock.time() + self.patience
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
            kind, mode = self.other_kind
            log.warning("%d pending %s from hour %s on are not sent in this mode; they wait for "
                        "a config with mode: %s", n, kind, iso_hour(oldest or 0), mode)  # fmt: skip

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

    # -- the mode's part ---------------------------------------------------------------------

    def _probe(self, now: float) -> Outcome:
        """The permission probe."""
        raise NotImplementedError

    def _expire_out_of_window(self, now: float, report: Report) -> None:
        """Expire this kind's pending records that are past their window."""
        raise NotImplementedError

    def _send_pending(self, report: Report, flush: bool, deadline: float) -> None:
        """Send what is due (all pending with `flush`) until `deadline`."""
        raise NotImplementedError
