"""SaaS mode: one record per (customer, dimension, hour), each customer billed exactly what it
alone would be (billing/saas_sealing.py), sent in BatchMeterUsage calls with the seller's
credentials, within the 24 h window and before the month-end cutoff.

The mode (`SaasMode`, the Mode of modes/mode.py), its sealing pass (`seal_hours`) and its send
pass (`BatchSender`): the shared pass (identity, expiry, permission probe, health) with pending
records sent in paced BatchMeterUsage calls. What is its own: each record's result lands on that
record (Success -> sent, CustomerNotSubscribed and DuplicateRecord -> rejected),
UnprocessedRecords are retried with backoff, a whole call refused for what one record holds is
split in halves until that record is alone, the window is applied before a call (one record out
of bounds would fail the call), and calls are paced under the 10 requests/s quota.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.billing import saas_sealing
from agent.billing.hour import Sealed
from agent.billing.sealing import seal_pass
from agent.billing.turn import Turn
from agent.clock import Clock
from agent.config.model import Config, Dimension, Saas
from agent.config.tables import check_redirect
from agent.errors import ConfigError
from agent.fulfillment.process import HandlerProcess, handler_command
from agent.host.identity import ContainerIdentity, Identity
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.modes.trials import SaasTrial, TrialCustomer, TrialView
from agent.sending.batches import BatchClient, Call, plan, where
from agent.sending.budget import CallBudget
from agent.sending.client import MeteringClient, dry_run_verdict
from agent.sending.outcomes import (
    BATCH_INVALID,
    BATCH_REFUSED,
    BATCH_SUCCESS,
    PRODUCT_CODE_REFUSED,
    SAAS_PRODUCT_HINT,
    SAAS_ROLE_HINT,
    BatchOutcome,
    Outcome,
)
from agent.sending.policy import (
    BACKOFF_BASE,
    DRYRUN_RECHECK,
    Report,
    _never,
    backoff,
    expires_at,
    sendable_at,
)
from agent.sending.send_pass import SendPass
from agent.windows import SAAS_OUT_OF_WINDOW, expired_upto, saas_expires_at

log = logging.getLogger(__name__)

PAGE = 2_500  # pending records read at a time (a seller's agent may hold 300,000 an hour)
PASS_TIME = 300.0  # a send pass ends after this long (the daemon's SENDER_TIMEOUT is 600 s)
REFUSED = {
    "CustomerNotSubscribed": "CustomerNotSubscribed: the customer has no subscription to the "
    "product (unsubscribed, or another customer's license)",
    "DuplicateRecord": "DuplicateRecord: a different quantity was already recorded for this "
    "customer, dimension and hour",
}

Say = Callable[[str, str], None]


def seal_hours(
    ledger: Ledger,
    config: Config,
    now: float,
    offset: float,
    include_current: bool = False,
    hold: Callable[[str, int], bool] | None = None,
    turn: Turn | None = None,
) -> list[Sealed]:
    """Seal every past hour with unsealed samples per customer (the current one too at a stop),
    then release held usage whose label is now a customer: the sealing pass
    (billing/sealing.py) with SaaS mode's (dimension, hour), in steps (`turn` between them)."""
    mode = SaasMode(settings(config))
    return mode.seal_hours(ledger, config, now, offset, include_current, hold, turn)


def settings(config: Config) -> Saas:
    """The config's `saas:` section, which SaaS mode bills with."""
    if config.saas is None:
        raise ConfigError("saas", f"SaaS mode needs mode: saas in {config.source}")
    return config.saas


class BatchSender(SendPass):
    """One SaaS send pass: the shared pass (identity, expiry, permission probe, health) with
    pending records sent in paced BatchMeterUsage calls."""

    probe_name = "BatchMeterUsage permission probe (0 records)"
    saas = True  # sends SaaS records only (customer != ''), as pending_records reads them
    other_kind = ("instance hour(s)", "instance")
    patience = PASS_TIME  # a pass may last this long (a fleet's hour is 12,000 calls)

    def __init__(
        self,
        ledger: Ledger,
        config: Config,
        client: BatchClient,
        clock: Clock,
        rng: Any = None,
    ) -> None:
        super().__init__(ledger, config, client, clock, rng)
        self.batch: BatchClient = client
        self.calls = 0  # BatchMeterUsage calls made by this sender (not the probe)
        # the account's calls a second, shared with the fulfillment handler's ResolveCustomer
        self.budget = CallBudget.in_state_dir(config.state_dir, clock)

    def _probe(self, now: float) -> Outcome:
        return self.batch.probe_batch(self.config.product_code)

    def _expire_out_of_window(self, now: float, report: Report) -> None:
        upto = expired_upto(now)
        while page := self.ledger.pending_records(limit=PAGE, timestamp_upto=upto):
            for h in page:
                self._mark_expired(h, now, SAAS_OUT_OF_WINDOW, report)

    def _send_pending(self, report: Report, flush: bool, deadline: float) -> None:
        after: tuple[int, str, str] | None = None
        while self.clock.time() < deadline:
            page = self.ledger.pending_records(after=after, limit=PAGE)
            if not page:
                return
            last = page[-1]
            after = (last.hour, last.dimension, last.customer)
            now, state = self.clock.time(), self.ledger.send_state()
            ready = []
            for h in page:
                if now >= expires_at(h):
                    self._mark_expired(h, now, SAAS_OUT_OF_WINDOW, report)
                    continue
                at = sendable_at(state, h.next_attempt)
                if not flush and (at is None or at > now):
                    continue
                if h.customer_ref is None:  # sealing writes records of known customers only
                    log.error("%s: sealed without customer %s's ids; never sent, it expires",
                              where(h), h.customer)  # fmt: skip
                    continue
                ready.append(h)
            queue = deque(plan(ready))
            while queue:
                if not self._send_call(queue, report, deadline):
                    return

    def _pace(self) -> float:
        """Wait for the next slot of the account's call budget (sending/budget.py, shared with
        the fulfillment handler); the time the next call starts."""
        return self.budget.take()

    def _send_call(self, queue: deque[Call], report: Report, deadline: float) -> bool:
        """Send the call at the queue's head and act on its answer; False ends the pass."""
        call = queue[0]
        if self.clock.time() >= deadline:
            return False
        now = self._pace()
        late = [i for i, h in enumerate(call.records) if now >= expires_at(h)]
        if late:  # expired while earlier calls went: never sent (it would fail the call)
            for i in late:
                self._mark_expired(call.records[i], now, SAAS_OUT_OF_WINDOW, report)
            queue[0] = call = call.part(i for i in range(len(call.records)) if i not in late)
            if not call.records:
                queue.popleft()
                return True
        self.ledger.begin_attempts(call.records, now)
        self.calls += 1
        outcome = self.batch.batch_meter_usage(call.requests, call.product_code)
        now = self.clock.time()
        status, code, error = outcome.call.status, outcome.call.code, outcome.call.error
        first, n = call.records[0], len(call.records)
        match status:
            case "sent":
                queue.popleft()
                return self._settle(call, outcome, now, report, queue, deadline)
            case "retry":
                delay = self.ledger.back_off(now, error or "send failed", self._backoff)
                log.warning("%s and %d more: BatchMeterUsage failed (%s); retrying after %.1f s",
                            where(first), n - 1, error, delay)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "", now + delay)
                                                       for h in call.records])  # fmt: skip
                report.retry += [(h.dimension, h.hour, error or "") for h in call.records]
                if now + delay >= deadline:
                    return False
                self.clock.sleep(delay)
                return True  # the same call again, identical
            case "unauthorized":
                log.error("%s and %d more: not authorized (%s); sending paused, probing every "
                          "%d s", where(first), n - 1, error, DRYRUN_RECHECK)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "", h.next_attempt)
                                                       for h in call.records])  # fmt: skip
                self.ledger.deauthorize(now, error or "not authorized",
                                        now + DRYRUN_RECHECK)  # fmt: skip
                report.paused = True
                return False
            case "held" if code == PRODUCT_CODE_REFUSED:
                self._hold(call.records, now, error, report)
                queue.popleft()
                return True
            case "held" | "rejected" | "expired" | "dryrun_ok" if n > 1 and code in BATCH_INVALID:
                # One record may spoil the call: each half on its own, until it is alone.
                log.warning(
                    "%s and %d more: BatchMeterUsage refused the call (%s); splitting it in "
                    "halves to find the record", where(first), n - 1, error,
                )  # fmt: skip
                queue.popleft()
                left, right = call.halves()
                queue.extendleft((right, left))
                return True
            case "held":
                self._hold(call.records, now, error, report)
            case "expired":
                for h in call.records:
                    self._mark_expired(h, now, "the service said so", report, error=error)
            case "rejected" | "dryrun_ok" if n == 1 and code in BATCH_INVALID:
                # Halving isolated the record the call was refused for: only it is rejected.
                self._reject([(first, error or "rejected")], now, report, failure=True)
            case "rejected" | "dryrun_ok":
                # Refused for something not about one record's content (DisabledApiException,
                # an unknown code): nothing is rejected. The records stay pending and the pass
                # ends; sending backs off (the next calls would be refused alike) and health
                # says why, like instance mode's held hours.
                delay = self.ledger.back_off(now, f"BatchMeterUsage refused: {error}",
                                             self._backoff)  # fmt: skip
                log.error("%s and %d more: BatchMeterUsage refused the call (%s); records kept "
                          "pending, sending again after %.0f s", where(first), n - 1, error,
                          delay)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "refused", now + delay)
                                                       for h in call.records])  # fmt: skip
                report.held += [(h.dimension, h.hour, error or "") for h in call.records]
                return False
            case _:
                _never(status)
        queue.popleft()
        return True

    def _settle(
        self,
        call: Call,
        outcome: BatchOutcome,
        now: float,
        report: Report,
        queue: deque[Call],
        deadline: float,
    ) -> bool:
        """Each record's result to its record: sent, rejected, or (unprocessed) retried."""
        sent, rejected, again = [], [], []
        for r in outcome.results:
            h = call.records[r.index]
            if r.status == BATCH_SUCCESS:
                sent.append((h, r.record_id))
            elif r.status in BATCH_REFUSED:
                rejected.append((h, REFUSED.get(r.status, r.status)))
            else:
                again.append(r.index)
        if sent:
            self.ledger.note_success(now, accepted=True)
        delay = 0.0
        if again:
            reason = f"UnprocessedRecords: {len(again)} of {len(call.records)} records"
            delay = self.ledger.back_off(now, reason, self._backoff)
        retry = [(call.records[i], "UnprocessedRecords: resubmitted", now + delay) for i in again]
        self.ledger.settle_records(now, sent=sent, retry=retry)
        self._reject(rejected, now, report)
        self._unsubscribed(
            (h.customer for r in outcome.results if r.status == "CustomerNotSubscribed"
             for h in (call.records[r.index],)), now
        )  # fmt: skip
        for h, record_id in sent:
            log.debug("%s: sent quantity %s, record %s", where(h), h.quantity.text, record_id)
            report.sent.append((h.dimension, h.hour, record_id or ""))
        log.info("BatchMeterUsage: %d records, %d sent, %d rejected, %d unprocessed (from %s)",
                 len(call.records), len(sent), len(rejected), len(again),
                 where(call.records[0]))  # fmt: skip
        if not again:
            return True
        for h, error, _ in retry:
            log.warning("%s: unprocessed; resubmitting after %.1f s", where(h), delay)
            report.retry.append((h.dimension, h.hour, error))
        if now + delay >= deadline:
            return False
        self.clock.sleep(delay)
        queue.appendleft(call.part(again))
        return True

    def _reject(
        self,
        rejected: list[tuple[SealedHour, str]],
        now: float,
        report: Report,
        failure: bool = False,
    ) -> None:
        """Settle records rejected. `failure`: the call itself failed (a record isolated by
        halving) and failing_since is set; a per-record Status of a call that succeeded
        (CustomerNotSubscribed, DuplicateRecord) is no send failure of the agent: each rejected
        record shows in health on its own (unless its quantity is 0)."""
        if not rejected:
            return
        self.ledger.settle_records(now, rejected=rejected)
        for h, error in rejected:
            log.error("%s: quantity %s rejected: %s", where(h), h.quantity.text, error)
            report.rejected.append((h.dimension, h.hour, error))
        if failure:
            self.ledger.note_failure(now, f"{where(rejected[-1][0])} rejected: {rejected[-1][1]}")

    def _unsubscribed(self, labels: Iterable[str], now: float) -> None:
        """A customer answered CustomerNotSubscribed has left (unsubscribed, or its license
        ended): it is marked removed, so no more idle zeros are sealed for it; usage of its
        label is still sealed and sent (SPEC: a removed customer's usage is billed)."""
        for label in sorted(set(labels)):
            if self.ledger.remove_customer(label, now):
                log.warning("customer %s: CustomerNotSubscribed; marked removed (no more idle "
                            "zeros; usage with its label is still billed)", label)  # fmt: skip

    def _hold(
        self, records: Sequence[SealedHour], now: float, error: str | None, report: Report
    ) -> None:
        """The seller's configuration was refused (product code, dimension): pending until they
        expire, retried on their own backoff, as instance mode holds an hour."""
        retry = []
        for h in records:
            delay = max(BACKOFF_BASE, backoff(h.attempts + 1, self.rng))
            retry.append((h, error or "held", now + delay))
            log.error("%s: quantity %s refused (%s); held, not lost: fix the config (product_code, "
                      "dimensions[].name) or the listing and restart", where(h), h.quantity.text,
                      error)  # fmt: skip
            report.held.append((h.dimension, h.hour, error or ""))
        self.ledger.settle_records(now, retry=retry)
        self.ledger.note_failure(now, f"{where(records[-1])} refused: {error}")


class SaasMode:
    """SaaS mode (see the module docstring), with the config's `saas:` settings."""

    name = "saas"

    def __init__(self, settings: Saas) -> None:
        self.settings = settings

    def key(self, h: SealedHour) -> dict[str, str]:
        return {"customer": h.customer or saas_sealing.NO_LABEL}

    def expires_at(self, timestamp: float) -> float:
        return saas_expires_at(timestamp)

    def pending_bounds(self, ledger: Ledger) -> list[SealedHour]:
        return ledger.pending_bounds(saas=True)

    def other_pending(self, ledger: Ledger) -> tuple[str, int, int] | None:
        n, oldest = ledger.pending_other_kind(True)
        return ("instance", n, oldest) if n and oldest is not None else None

    def seal_hours(
        self,
        ledger: Ledger,
        config: Config,
        now: float,
        offset: float,
        include_current: bool = False,
        hold: Callable[[str, int], bool] | None = None,
        turn: Turn | None = None,
    ) -> list[Sealed]:
        def one(dim: Dimension, hour: int) -> list[Sealed]:
            return saas_sealing.seal_each(
                ledger, config, self.settings, dim, hour, now, offset, turn
            )

        def then() -> list[Sealed]:
            return saas_sealing.release(ledger, config, now)

        # an unsubscribing customer's open usage first: the pass then holds what comes after
        flushed = saas_sealing.seal_leaving(ledger, config, self.settings, now)
        return flushed + seal_pass(ledger, config, now, one, include_current, hold, then, turn)

    def sender(self, ledger: Ledger, config: Config, client: Any, clock: Clock) -> SendPass:
        return BatchSender(ledger, config, client, clock)

    def identity(self, clock: Clock, state_dir: Path) -> Identity:
        """The seller's own ledger (its customers, pending records, held usage) on the seller's
        machine: never tied to an EC2 instance, so never moved aside (as a task's volume)."""
        return ContainerIdentity(f"saas-{socket.gethostname()}", "hostname", clock, state_dir)

    def registration(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        """The fulfillment handler child, when saas.registration is set (its redirect checked
        now)."""
        if self.settings.registration is None:
            return None
        check_redirect(self.settings.registration.redirect)
        return HandlerProcess(handler_command(running_config, clock, log_format), clock.monotonic)

    def notifications(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        """The subscription queue child (`watch-subscriptions`), when saas.notifications is set."""
        if self.settings.notifications is None:
            return None
        command = handler_command(running_config, clock, log_format, "watch-subscriptions")
        return HandlerProcess(command, clock.monotonic, name="subscription queue")

    def sealing_due(self, ledger: Ledger) -> bool:
        """An unsubscribe waits for its customer's open usage to be sealed."""
        return bool(ledger.flushes_due())

    def credentials(self, platform: str, method: str | None) -> tuple[str | None, str | None]:
        """The seller's own credentials sign BatchMeterUsage: no container role to insist on."""
        return None, None

    def check_permission(
        self, client: MeteringClient, config: Config, clock: Clock, say: Say
    ) -> None:
        """No DryRun: an empty BatchMeterUsage is the permission probe."""
        outcome = client.probe_batch(config.product_code)
        say("ok", dry_run_verdict(
            outcome, "BatchMeterUsage (0 records)", SAAS_ROLE_HINT, SAAS_PRODUCT_HINT
        ))  # fmt: skip

    def sample_lines(self, breakdown: Mapping[Any, Decimal], ledger: Ledger | None) -> list[str]:
        return saas_sealing.customer_lines(self.settings.customer_label, breakdown, ledger)

    def customer_option(self, customer: str | None, source: Path) -> None:
        return None

    def so_far(self, ledger: Ledger, dim: Dimension, hour: int) -> str | None:
        return saas_sealing.so_far_total(ledger, dim, self.settings.customer_label, hour)

    def status(self, ledger: Ledger, config: Config, now: float) -> dict[str, Any]:
        return saas_sealing.status_sections(ledger, config, self.settings.customer_label, now)

    def customers(self, command: str, source: Path) -> Saas:
        return self.settings

    def trial(self, customers: Sequence[TrialCustomer], source: Path) -> TrialView:
        return SaasTrial(self.settings, customers)

    def image_refusal(self) -> str | None:
        return (
            "prepare-image is for AMI products; a SaaS ledger holds the seller's customers and "
            "unsent records and is never removed for an image"
        )
