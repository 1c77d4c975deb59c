"""Instance mode's sealing: one (dimension, hour) becomes one record, its quantity the hour's
aggregate of every sample (`billed`), with the allocations of its labels; logged as sealed."""

from __future__ import annotations

import logging
import uuid

from agent.billing.allocations import MAX_ALLOCATIONS, allocate
from agent.billing.hour import Sealed, billed, drop_bad_points
from agent.clock import iso_hour
from agent.config.model import Config, Dimension
from agent.ledger import Ledger
from agent.windows import record_timestamp, send_slot

log = logging.getLogger(__name__)


def seal_one(
    ledger: Ledger, config: Config, dim: Dimension, hour: int, now: float, offset: float
) -> Sealed | None:
    """Seal one dimension's hour in one transaction; None if another pass sealed it first."""
    name = dim.name
    with ledger.transaction() as db:
        points = drop_bad_points(ledger, db, name, hour, ledger.points(db, name, hour))
        if not points:
            return None
        raw, quantity = billed(dim, points)
        if quantity.clamped_from is not None:
            log.warning(
                "hour %s dimension %s: quantity %s is outside what MeterUsage accepts; sending %s",
                iso_hour(hour),
                name,
                quantity.clamped_from,
                quantity.text,
            )
        allocated = allocate(dim, points, quantity)
        if allocated.folded:
            log.warning(
                "hour %s dimension %s: %d tag sets beyond the %d allocations MeterUsage takes are "
                "billed untagged (the smallest)",
                iso_hour(hour),
                name,
                allocated.folded,
                MAX_ALLOCATIONS,
            )
        last = max(p.t for p in points)
        ledger.insert_sealed(
            db,
            dimension=name,
            hour=hour,
            product_code=config.product_code,
            quantity=quantity,
            timestamp=record_timestamp(last, hour),
            client_token=str(uuid.uuid4()),
            samples=len(points),
            raw=format(raw.normalize(), "f"),
            sealed_at=now,
            next_attempt=send_slot(hour, offset),
            allocations=allocated.allocations,
        )
    return Sealed(name, hour, quantity.text, len(points))


def log_sealed(sealed: list[Sealed]) -> None:
    """One line per hour sealed (SaaS sealing logs one per (dimension, hour) itself)."""
    for s in sealed:
        log.info(
            "hour %s dimension %s: sealed quantity %s from %d samples",
            iso_hour(s.hour),
            s.dimension,
            s.quantity,
            s.samples,
        )
