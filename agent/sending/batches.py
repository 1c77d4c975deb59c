"""SaaS mode's sending: sealed per-customer records in BatchMeterUsage calls.

Planning is pure (`plan`): pending records become calls of at most 25 records and under 1 MB, one
product per call; records naming a license (CustomerAWSAccountId + LicenseArn) go without the
request's ProductCode, legacy CustomerIdentifier records with it, never in one call. Each record is
built only from its sealed row (the customer's ids are copied into it at sealing), so a resend is
identical whatever happens to the customers table meanwhile.

The send pass (`BatchSender`) is instance mode's `Sender` with another request: the same send
state (authorized, backoff, failures, health), the same permission probe schedule (an empty
BatchMeterUsage where instance mode uses a DryRun), the same backoff and expiry handling. What is
its own: each record's result lands on that record (Success -> sent, CustomerNotSubscribed and
DuplicateRecord -> rejected), UnprocessedRecords are retried with backoff, a whole call refused
for what one record holds is split in halves until that record is alone, the 24 h window and the
month-end cutoff are applied before a call (one record out of bounds would fail the call), and
calls are paced under the 10 requests/s quota through the clock.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from agent.aggregate import to_json
from agent.clock import Clock, iso_hour
from agent.config.model import Config
from agent.ledger import Ledger
from agent.ledger.hours import CustomerRef, SealedHour
from agent.sending import policy as sending
from agent.sending.outcomes import (
    BATCH_INVALID,
    BATCH_REFUSED,
    BATCH_SUCCESS,
    PRODUCT_CODE_REFUSED,
    BatchOutcome,
    Outcome,
)
from agent.sending.policy import BACKOFF_BASE, Report, backoff, expires_at, sendable_at
from agent.windows import SAAS_OUT_OF_WINDOW, expired_upto

log = logging.getLogger(__name__)

MAX_RECORDS = 25  # UsageRecords a call (the model's maximum)
MAX_CALL_BYTES = 1_000_000  # a call's body stays under 1 MB
ENVELOPE = 512  # bytes of a body around its records: {"UsageRecords": [...], "ProductCode": ...}
PACE = 0.101  # seconds between two calls' starts: under 10 a second, the account's quota
PAGE = 2_500  # pending records read at a time (a seller's agent may hold 300,000 an hour)
PASS_TIME = 300.0  # a send pass ends after this long (the daemon's SENDER_TIMEOUT is 600 s)
REFUSED = {
    "CustomerNotSubscribed": "CustomerNotSubscribed: the customer has no subscription to the "
    "product (unsubscribed, or another customer's license)",
    "DuplicateRecord": "DuplicateRecord: a different quantity was already recorded for this "
    "customer, dimension and hour",
}


class BatchClient(sending.Client, Protocol):
    def batch_meter_usage(
        self, records: Sequence[Mapping[str, Any]], product_code: str | None
    ) -> BatchOutcome: ...

    def probe_batch(self, product_code: str) -> Outcome: ...


# -- planning (pure) ---------------------------------------------------------------------------


def usage_record(h: SealedHour) -> dict[str, Any]:
    """The record's UsageRecord: from the sealed row only (its customer's ids as sealed), so it
    is the same on every resend, even after the customer came back with a new license."""
    customer = h.customer_ref
    if customer is None:
        raise ValueError(f"{_where(h)}: sealed without its customer's ids")
    record: dict[str, Any] = {
        "Timestamp": datetime.fromtimestamp(h.timestamp, tz=timezone.utc),
        "Dimension": h.dimension,
    }
    if customer.legacy:
        record["CustomerIdentifier"] = customer.customer_identifier
    else:
        record["CustomerAWSAccountId"] = customer.account_id
        record["LicenseArn"] = customer.license_arn
    for key, value in h.quantity.request_fields().items():  # UsageQuantity[AsDecimal]
        record[key.removeprefix("Usage")] = value
    if h.allocations:
        record["UsageAllocations"] = to_json(h.allocations)
    return record


def record_bytes(record: Mapping[str, Any]) -> int:
    """A UsageRecord's size in the request body, as botocore writes it (json.dumps; Timestamp
    as epoch seconds), plus the ", " that separates it from the next."""
    plain = {k: int(v.timestamp()) if isinstance(v, datetime) else v for k, v in record.items()}
    return len(json.dumps(plain).encode()) + 2


@dataclass(frozen=True)
class Call:
    """One BatchMeterUsage request: its sealed records and their UsageRecords, in order."""

    product_code: str | None  # the request's ProductCode: legacy records only
    records: tuple[SealedHour, ...]
    requests: tuple[dict[str, Any], ...]

    def halves(self) -> tuple[Call, Call]:
        mid = (len(self.records) + 1) // 2
        return self.part(range(mid)), self.part(range(mid, len(self.records)))

    def part(self, indices: Iterable[int]) -> Call:
        keep = list(indices)
        return Call(
            self.product_code,
            tuple(self.records[i] for i in keep),
            tuple(self.requests[i] for i in keep),
        )


def record_key(h: SealedHour) -> tuple[CustomerRef | None, str, int]:
    """What the service tells records apart by (and results are matched on): the customer's
    ids, the dimension and the Timestamp."""
    return (h.customer_ref, h.dimension, h.timestamp)


def plan(records: Iterable[SealedHour]) -> list[Call]:
    """Group records (oldest first) into calls: at most MAX_RECORDS and under MAX_CALL_BYTES
    each, one product and one kind of customer (license or legacy) per call, never two records
    with one key (record_key) in a call: results are matched by key, so one's would be lost.
    Deterministic: the same records in the same order make the same calls (a resend after a
    crash is identical)."""
    calls: list[tuple[int, Call]] = []
    open_: dict[tuple[str, bool], tuple[int, list[SealedHour], list[dict[str, Any]], int]] = {}

    def close(key: tuple[str, bool]) -> None:
        first, hours, requests, _ = open_.pop(key)
        code = key[0] if key[1] else None
        calls.append((first, Call(code, tuple(hours), tuple(requests))))

    for n, h in enumerate(records):
        assert h.customer_ref is not None  # BatchSender sends sealed ids only
        key = (h.product_code, h.customer_ref.legacy)
        request = usage_record(h)
        size = record_bytes(request)
        if key in open_:
            _, hours, _, used = open_[key]
            clash = any(record_key(o) == record_key(h) for o in hours)
            if len(hours) >= MAX_RECORDS or used + size > MAX_CALL_BYTES or clash:
                close(key)
        if key not in open_:
            open_[key] = (n, [], [], ENVELOPE)
        first, hours, requests, used = open_[key]
        hours.append(h)
        requests.append(request)
        open_[key] = (first, hours, requests, used + size)
    for key in list(open_):
        close(key)
    return [call for _, call in sorted(calls, key=lambda c: c[0])]


# -- the send pass -----------------------------------------------------------------------------


def _where(h: SealedHour) -> str:
    return f"hour {iso_hour(h.hour)} dimension {h.dimension} customer {h.customer}"


class BatchSender(sending.Sender):
    """One SaaS send pass: instance mode's run (identity, expiry, permission probe, health) with
    pending records sent in paced BatchMeterUsage calls."""

    probe_name = "BatchMeterUsage permission probe (0 records)"
    saas = True  # sends SaaS records only (customer != ''), as pending_records reads them

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
        self._last_call = float("-inf")

    def run(self, flush: bool = False, deadline: float | None = None) -> Report:
        """As Sender.run; a pass may last PASS_TIME (a fleet's hour is 12,000 calls)."""
        if deadline is None:
            deadline = self.clock.time() + PASS_TIME
        return super().run(flush, deadline)

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
                              _where(h), h.customer)  # fmt: skip
                    continue
                ready.append(h)
            queue = deque(plan(ready))
            while queue:
                if not self._send_call(queue, report, deadline):
                    return

    def _pace(self) -> float:
        """Wait until PACE after the previous call's start; the time the next call starts."""
        now = self.clock.time()
        wait = self._last_call + PACE - now
        if wait > 0:
            self.clock.sleep(wait)
            now = self.clock.time()
        self._last_call = now
        return now

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
                            _where(first), n - 1, error, delay)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "", now + delay)
                                                       for h in call.records])  # fmt: skip
                report.retry += [(h.dimension, h.hour, error or "") for h in call.records]
                if now + delay >= deadline:
                    return False
                self.clock.sleep(delay)
                return True  # the same call again, identical
            case "unauthorized":
                log.error("%s and %d more: not authorized (%s); sending paused, probing every "
                          "%d s", _where(first), n - 1, error, sending.DRYRUN_RECHECK)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "", h.next_attempt)
                                                       for h in call.records])  # fmt: skip
                self.ledger.deauthorize(now, error or "not authorized",
                                        now + sending.DRYRUN_RECHECK)  # fmt: skip
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
                    "halves to find the record", _where(first), n - 1, error,
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
                          "pending, sending again after %.0f s", _where(first), n - 1, error,
                          delay)  # fmt: skip
                self.ledger.settle_records(now, retry=[(h, error or "refused", now + delay)
                                                       for h in call.records])  # fmt: skip
                report.held += [(h.dimension, h.hour, error or "") for h in call.records]
                return False
            case _:
                sending._never(status)
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
            self.ledger.note_success(now)
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
            log.debug("%s: sent quantity %s, record %s", _where(h), h.quantity.text, record_id)
            report.sent.append((h.dimension, h.hour, record_id or ""))
        log.info("BatchMeterUsage: %d records, %d sent, %d rejected, %d unprocessed (from %s)",
                 len(call.records), len(sent), len(rejected), len(again),
                 _where(call.records[0]))  # fmt: skip
        if not again:
            return True
        for h, error, _ in retry:
            log.warning("%s: unprocessed; resubmitting after %.1f s", _where(h), delay)
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
            log.error("%s: quantity %s rejected: %s", _where(h), h.quantity.text, error)
            report.rejected.append((h.dimension, h.hour, error))
        if failure:
            self.ledger.note_failure(now, f"{_where(rejected[-1][0])} rejected: {rejected[-1][1]}")

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
                      "dimensions[].name) or the listing and restart", _where(h), h.quantity.text,
                      error)  # fmt: skip
            report.held.append((h.dimension, h.hour, error or ""))
        self.ledger.settle_records(now, retry=retry)
        self.ledger.note_failure(now, f"{_where(records[-1])} refused: {error}")
