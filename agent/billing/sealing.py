"""Sealing: every past hour with unsealed samples becomes one immutable request, once.

It runs at each boundary, at start-up, after each sampling round and at a stop, and it looks at what
the ledger holds rather than at which timer fired, so a suspend, a clock jump or a missed trigger
never skips or repeats an hour.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from agent.aggregate import Point, Quantity, combine_exact, to_decimal, to_quantity
from agent.billing.allocations import MAX_ALLOCATIONS, allocate
from agent.clock import HOUR, hour_start, iso, iso_hour
from agent.config.model import Config, Dimension
from agent.ledger import Ledger
from agent.windows import record_timestamp, send_slot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sealed:
    dimension: str
    hour: int
    quantity: str
    samples: int


def seal_hours(
    ledger: Ledger,
    config: Config,
    now: float,
    offset: float,
    include_current: bool = False,
    hold: Callable[[str, int], bool] | None = None,
) -> list[Sealed]:
    """Seal every hour before the current one (and the current one too at a stop).

    Each (dimension, hour) seals in its own transaction: one that cannot be sealed (a value the
    arithmetic refuses, a database error) is logged, kept in the ledger for `status` and health,
    and retried at the next pass, while every other dimension's hours go on being sealed and sent.
    `hold(dimension, hour)` keeps an hour open while a read for it is still within its deadline.
    """
    dims = {d.name: d for d in config.dimensions}
    before = hour_start(now) + (HOUR if include_current else 0)
    with ledger.transaction() as db:
        pairs = ledger.unsealed_hours(db, before)
    sealed: list[Sealed] = []
    failed: set[str] = set()
    for name, hour in pairs:
        dim = dims.get(name)
        if dim is None:
            log.warning(
                "hour %s dimension %s: samples kept but not sealed: the dimension is no "
                "longer in the config",
                iso_hour(hour),
                name,
            )
            continue
        if hold is not None and not include_current and hold(name, hour):
            continue
        try:
            if config.mode == "saas":
                sealed.extend(_seal_customers(ledger, config, dim, hour, now, offset))
                continue
            done = _seal_one(ledger, config, dim, hour, now, offset)
        except Exception as e:  # contained: this dimension's hour only
            failed.add(name)
            _note_seal_error(ledger, name, hour, f"{type(e).__name__}: {e}")
            continue
        if done is not None:
            sealed.append(done)
    if config.mode == "saas":
        sealed.extend(_release_held(ledger, config, now))
    for name, _hour, _error in ledger.seal_errors():
        if name not in failed and name in dims and ledger.clear_seal_error(name):
            log.info("dimension %s: its hours seal again", name)
    for s in sealed if config.mode != "saas" else ():  # saas: one line per (dimension, hour)
        log.info(
            "hour %s dimension %s: sealed quantity %s from %d samples",
            iso_hour(s.hour),
            s.dimension,
            s.quantity,
            s.samples,
        )
    return sealed


def _seal_one(
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


def drop_bad_points(
    ledger: Ledger, db: sqlite3.Connection, name: str, hour: int, points: list[Point]
) -> list[Point]:
    """The hour's points less those that are not a finite number, which are deleted.

    Stored by an agent that did not check values yet (a `rows=nan` line): such a value is that
    round's collector error today, so it is dropped and the hour's finite samples are billed
    rather than held for good.
    """
    bad = [p for p in points if not p.value.is_finite()]
    if not bad:
        return points
    ledger.drop_samples(db, name, [p.t for p in bad])
    log.warning(
        "hour %s dimension %s: dropped %d stored sample(s) that are not a finite number "
        "(the first at %s: %s)",
        iso_hour(hour),
        name,
        len(bad),
        iso(bad[0].t),
        bad[0].value,
    )
    return [p for p in points if p.value.is_finite()]


def _seal_customers(
    ledger: Ledger, config: Config, dim: Dimension, hour: int, now: float, offset: float
) -> list[Sealed]:
    """SaaS mode: the (dimension, hour) sealed per customer (saas_sealing.seal_one)."""
    from agent.billing import saas_sealing

    done = saas_sealing.seal_one(ledger, config, dim, hour, now, offset)
    return [Sealed(s.dimension, s.hour, s.quantity, 0) for s in done or ()]


def _release_held(ledger: Ledger, config: Config, now: float) -> list[Sealed]:
    """SaaS mode: held usage sealed for labels that became customers (or expired)."""
    from agent.billing import saas_sealing

    try:
        done = saas_sealing.release_held(ledger, config, now)
    except Exception as e:  # contained: sealing of the hours themselves went on
        log.error("held usage: cannot release: %s: %s", type(e).__name__, e)
        return []
    return [Sealed(s.dimension, s.hour, s.quantity, 0) for s in done]


def billed(dim: Dimension, points: list[Point]) -> tuple[Decimal, Quantity]:
    """The hour's aggregate and the quantity it bills: what sealing stores and `status` shows."""
    raw = combine_exact(dim.aggregate, points)
    return to_decimal(raw), to_quantity(raw, dim.scale, dim.rounding, dim.decimals)


def so_far(ledger: Ledger, dim: Dimension, hour: int) -> str | None:
    """What `dim`'s open hour would bill if it were sealed now (None: no sample yet). Reads only,
    skipping a value that is not finite as sealing drops it; None too when the arithmetic fails
    (sealing will then record the hour's seal error, which status shows)."""
    points = [p for p in ledger.points(ledger.db, dim.name, hour) if p.value.is_finite()]
    try:
        return billed(dim, points)[1].text if points else None
    except (ArithmeticError, ValueError):  # e.g. decimal.Overflow: as seal_hours contains it
        return None


def _note_seal_error(ledger: Ledger, name: str, hour: int, error: str) -> None:
    try:
        new = ledger.record_seal_error(name, hour, error)
    except Exception as e:  # the ledger itself failing: say so, keep the daemon running
        log.error(
            "hour %s dimension %s: cannot seal (%s), nor record why (%s)",
            iso_hour(hour),
            name,
            error,
            e,
        )
        return
    if new:
        log.error(
            "hour %s dimension %s: cannot seal: %s; its samples are kept and sealing is "
            "retried; the other dimensions are not held",
            iso_hour(hour),
            name,
            error,
        )


def carries(dim: Dimension) -> bool:
    """Late samples for a sealed hour move to the next open hour only where that cannot inflate
    a level: sums and integrals add up, a max or average would be distorted."""
    return dim.aggregate in ("sum", "integral")
