"""SaaS mode's calls, planned with no I/O: sealed per-customer records into BatchMeterUsage calls.

`plan`: pending records become calls of at most 25 records and under 1 MB, one product per call;
records naming a license (CustomerAWSAccountId + LicenseArn) go without the request's ProductCode,
legacy CustomerIdentifier records with it, never in one call. Each record is built only from its
sealed row (the customer's ids are copied into it at sealing), so a resend is identical whatever
happens to the customers table meanwhile. The send pass that makes the calls is SaaS mode's
`BatchSender` (modes/saas.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from agent.aggregate import to_json
from agent.clock import iso_hour
from agent.ledger.hours import CustomerRef, SealedHour
from agent.sending import policy as sending
from agent.sending.outcomes import (
    BatchOutcome,
    Outcome,
)

MAX_RECORDS = 25  # UsageRecords a call (the model's maximum)
MAX_CALL_BYTES = 1_000_000  # a call's body stays under 1 MB
ENVELOPE = 512  # bytes of a body around its records: {"UsageRecords": [...], "ProductCode": ...}


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
        raise ValueError(f"{where(h)}: sealed without its customer's ids")
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


def where(h: SealedHour) -> str:
    """A SaaS record, as log lines and errors name it."""
    return f"hour {iso_hour(h.hour)} dimension {h.dimension} customer {h.customer}"
