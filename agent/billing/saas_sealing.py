"""SaaS mode's sealing: one record per (customer, dimension, hour), each customer billed exactly
what it alone would have been billed (SPEC "SaaS mode").

Why not a split of the total: rounding and `max`/`min`/`last`/`avg` do not distribute over
customers (two customers at 0.4 each round to 0 apiece, not 1 between them), and a customer must
never pay for another's usage. So each customer's points (its share of each sample of the hour, 0
where it had none) go through the dimension's own arithmetic, `hour.billed`, on their own.

The customer is the value of `saas.customer_label` in a sample's breakdown (the sampler keeps it in
every dimension). Usage whose label names no customer in the ledger (or that has no label) is held
in `held_usage` with its points and sealed by a later pass once `customers add` names it, while its
Timestamp is less than 24 h - 60 s old; after that it is kept as an `expired` record. Every known,
not removed customer without usage in a (dimension, hour) that has samples gets an idle zero.

Subscription notifications (ledger/subscriptions.py): a customer whose buyer is unsubscribing has
its open usage sealed at once (`seal_leaving`); its usage after that is held, not sent, and it
gets no idle zeros.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent.aggregate import LabelSet, Point, Quantity, plain, shown, to_quantity
from agent.billing.allocations import MAX_ALLOCATIONS, allocate
from agent.billing.hour import Sealed, billed, drop_bad_points
from agent.billing.turn import Turn, released
from agent.clock import HOUR, hour_start, iso, iso_hour
from agent.config.model import Config, Dimension, Saas
from agent.ledger import Ledger
from agent.ledger.faults import kind_of
from agent.ledger.samples import HeldUsage
from agent.ledger.subscriptions import LEAVING, SUBSCRIBED, Subscription
from agent.windows import expired_upto, record_timestamp, saas_expires_at, send_slot

log = logging.getLogger(__name__)

ZERO = Decimal(0)
UNKNOWN = "unknown customer"
UNSUBSCRIBED = "unsubscribed customer"  # usage after a customer's unsubscribe: held, not sent
NO_LABEL = "(no label)"  # usage that carried no customer label


@dataclass(frozen=True)
class CustomerSealed:
    customer: str
    dimension: str
    hour: int
    quantity: str


# One customer's shares of an hour: by sample index, its usage (and, for a dimension with
# allocations, that usage by the other labels).
Shares = dict[int, Decimal] | dict[int, tuple[Decimal, dict[LabelSet, Decimal]]]


def split_by_customer(
    points: Sequence[Point], label: str, dim: Dimension
) -> dict[str, list[Point]]:
    """Each customer's points: its share of each sample (the parts of the sample's breakdown
    whose `label` has that value), with what is left of the breakdown (the other labels, for the
    allocations). Usage without the label is under ''.

    A customer absent from a sample counts 0 there. For `sum` and `integral` a 0 changes nothing,
    so only the samples it took part in are listed; for the other aggregates every sample is (a
    0 lowers a `min`, counts in an `avg`, is the `last`). Either way the hour's last sample is
    listed for every customer: it is the record's Timestamp.
    """
    by = shares_by_customer(points, label, dim)
    return {c: customer_points(points, mine, dim) for c, mine in by.items()}


def shares_by_customer(points: Sequence[Point], label: str, dim: Dimension) -> dict[str, Shares]:
    """Each sample's breakdown read once, into each customer's shares (see split_by_customer);
    points are made from them one customer at a time (customer_points), so an hour of many
    customers never holds every customer's points at once."""
    keep = frozenset(dim.allocations.values()) if dim.allocations else None
    plain: dict[str, dict[int, Decimal]] = {}
    rich: dict[str, dict[int, tuple[Decimal, dict[LabelSet, Decimal]]]] = {}
    for i, p in enumerate(points):
        parts: Mapping[LabelSet, Decimal] = (
            p.breakdown if p.breakdown is not None else {(): p.value}
        )
        for labels, value in parts.items():
            if not value:
                continue
            customer = ""
            for name, v in labels:
                if name == label:
                    customer = v
                    break
            if keep is None:
                mine = plain.setdefault(customer, {})
                mine[i] = mine.get(i, ZERO) + value
                continue
            rest = tuple(pair for pair in labels if pair[0] in keep)
            kept = rich.setdefault(customer, {})
            total, by_rest = kept.get(i, (ZERO, {}))
            by_rest[rest] = by_rest.get(rest, ZERO) + value
            kept[i] = (total + value, by_rest)
    return dict(plain) if keep is None else dict(rich)


def customer_points(points: Sequence[Point], mine: Shares, dim: Dimension) -> list[Point]:
    """One customer's points from its shares (see split_by_customer for which are listed)."""
    last = len(points) - 1
    if dim.aggregate in ("sum", "integral"):
        indices: Sequence[int] = sorted({*mine, last})
    else:
        indices = range(len(points))
    out = []
    for i in indices:
        p, share = points[i], mine.get(i)
        if dim.allocations is None:
            out.append(Point(p.t, share if isinstance(share, Decimal) else ZERO, p.span))
        elif share is None:
            out.append(Point(p.t, ZERO, p.span, {}))
        else:
            assert isinstance(share, tuple)
            total, by_rest = share
            out.append(Point(p.t, total, p.span, {k: v for k, v in by_rest.items() if v}))
    return out


STEP = 1_000  # customer records (or holds) written per transaction


def seal_one(
    ledger: Ledger, config: Config, saas: Saas, dim: Dimension, hour: int, now: float,
    offset: float, turn: Turn | None = None,
) -> list[Sealed] | None:  # fmt: skip
    """Seal one dimension's hour for every customer: a record per known customer with usage, an
    idle zero per known customer without (`saas.idle_zero`), the rest held. None if another
    pass sealed it first.

    In steps, each its own short transaction, so that sampling never waits long on the ledger
    (100,000 customers in one transaction held its write lock for 15.7 s): the first marks the
    hour as being sealed as it reads the points (no sample joins it after; see
    Samples.begin_seal), each next one writes the records of up to STEP customers in label order
    and the label it got to, the last deletes the samples. `turn` gives way before each step and
    is released while the records are worked out (the daemon's round lock: sample writes go
    first). A pass stopped half-way (a crash, a stop) is taken up by the next one after the last
    label done: every customer once. The labels with usage come from the hour's points, which
    no longer change, so every pass walks the same ones; only idle zeros follow the customers
    table as it is at each pass."""
    name = dim.name
    with ledger.transaction() as db:
        points = drop_bad_points(ledger, db, name, hour, ledger.points(db, name, hour))
        if not points:
            return None
        ledger.begin_seal(db, name, hour, now)
        leaving = ledger.leaving_labels(db)  # unsubscribing or gone: held, no idle zeros
    with released(turn):  # no write: who the customers are, each one's share of each sample
        known, active = ledger.customer_labels()
        active = active - leaving if saas.idle_zero else set()
        split = shares_by_customer(points, saas.customer_label, dim)
        timestamp = record_timestamp(max(p.t for p in points), hour)
        labels = sorted(set(split) | active)
    done: list[Sealed] = []
    held: list[str] = []
    unsubscribed: list[str] = []
    idle = 0
    while True:
        if turn is not None:
            turn.give_way()
        with ledger.transaction() as db:
            going, upto = ledger.seal_progress(db, name, hour)
            if not going:
                return done or None  # another pass finished it
            first = 0 if upto is None else bisect.bisect_right(labels, upto)
            step = labels[first : first + STEP]
            if not step:
                ledger.end_seal(db, name, hour)
                break
            # asked again at each step: an unsubscribe may seal a customer's open usage
            # between two steps (seal_leaving, at the daemon's send tick)
            leaving, flushed = ledger.leaving_labels(db), ledger.flushed_labels(db)
            for customer in step:
                mine = split.get(customer)
                # a customer that is leaving, or whose open usage its unsubscribe sealed (an
                # `early` record of this hour): no second record, no idle zero; its usage held
                if customer in leaving or (
                    customer in flushed and ledger.has_record(db, customer, name, hour)
                ):
                    if mine is not None:
                        own = customer_points(points, mine, dim)
                        ledger.hold_usage(db, customer, name, hour, own, now)
                        unsubscribed.append(customer)
                    continue
                if mine is not None and customer not in known:
                    own = customer_points(points, mine, dim)
                    ledger.hold_usage(db, customer, name, hour, own, now)
                    held.append(customer)
                    continue
                if mine is None:  # idle zero: what an hour of nothing bills
                    raw, quantity = ZERO, to_quantity(ZERO, dim.scale, dim.rounding, dim.decimals)
                    own = []
                    idle += 1
                else:
                    own = customer_points(points, mine, dim)
                    raw, quantity = billed(dim, own)
                _insert(ledger, db, config, dim, customer, hour, own, raw, quantity,
                        timestamp, len(own), now, send_slot(hour, offset))  # fmt: skip
                done.append(Sealed(name, hour, quantity.text, 0))
            ledger.advance_seal(db, name, hour, step[-1])
    for customer in unsubscribed:
        log.warning(
            "hour %s dimension %s: usage of customer %s after its unsubscribe held, not sent (%s)",
            iso_hour(hour),
            name,
            customer,
            UNSUBSCRIBED,
        )
    for customer in held:
        log.warning(
            "hour %s dimension %s: usage of %s held (%s): it is sealed once `customers "
            "add` names it, within 24 h",
            iso_hour(hour),
            name,
            f"label {customer!r}" if customer else "samples without the customer label",
            UNKNOWN,
        )
    log.info(
        "hour %s dimension %s: sealed %d customer record(s) (%d idle zero(s)) from %d samples; "
        "%d label(s) held",
        iso_hour(hour),
        name,
        len(done),
        idle,
        len(points),
        len(held),
    )
    return done


def _insert(
    ledger: Ledger, db: sqlite3.Connection, config: Config, dim: Dimension, customer: str,
    hour: int, points: Sequence[Point], raw: Decimal, quantity: Quantity, timestamp: int,
    samples: int, now: float, next_attempt: float,
) -> None:  # fmt: skip
    if quantity.clamped_from is not None:
        log.warning(
            "hour %s dimension %s customer %s: quantity %s is outside what the service "
            "accepts; sending %s",
            iso_hour(hour),
            dim.name,
            customer,
            quantity.clamped_from,
            quantity.text,
        )
    allocated = allocate(dim, list(points), quantity)
    if allocated.folded:
        log.warning(
            "hour %s dimension %s customer %s: %d tag sets beyond the %d allocations a record "
            "takes are billed untagged (the smallest)",
            iso_hour(hour),
            dim.name,
            customer,
            allocated.folded,
            MAX_ALLOCATIONS,
        )
    ledger.insert_sealed(
        db,
        dimension=dim.name,
        hour=hour,
        product_code=config.product_code,
        quantity=quantity,
        timestamp=timestamp,
        client_token=str(uuid.uuid4()),
        samples=samples,
        raw=format(raw.normalize(), "f"),
        sealed_at=now,
        next_attempt=next_attempt,
        allocations=allocated.allocations,
        customer=customer,
        keep_samples=True,
    )


def release_held(ledger: Ledger, config: Config, now: float) -> list[CustomerSealed]:
    """Seal held usage whose label is now a customer (removed ones too: the usage is theirs),
    while its Timestamp is within the 24 h window; usage past the window, whoever it belongs to,
    becomes an `expired` record (logged, shown by status, report and health). Each held
    (label, dimension, hour) in its own transaction; returns the records made (either kind)."""
    dims = {d.name: d for d in config.dimensions}
    released: list[CustomerSealed] = []
    leaving = ledger.leaving_labels(ledger.db)
    for held in ledger.held_usage(settle_by=expired_upto(now)):
        dim = dims.get(held.dimension)
        if dim is None:
            continue  # kept: the dimension may come back with the config
        known = held.customer != "" and ledger.customer(held.customer) is not None
        late = now >= saas_expires_at(held.timestamp)  # 24 h, or the month-end cutoff
        if known and (
            held.customer in leaving
            or ledger.has_record(ledger.db, held.customer, held.dimension, held.hour)
        ):
            if late:  # fmt: skip
                _drop_unsubscribed(ledger, held)
            continue
        if not known and not late:
            continue
        raw, quantity = billed(dim, list(held.points))
        why = None
        if late:
            why = (
                f"{UNKNOWN} {held.customer!r}: usage held until its 24 h window passed; "
                "add the customer sooner (`customers add`)"
                if not known
                else f"customer {held.customer!r} was added after the 24 h window"
            )
        with ledger.transaction() as db:
            still = ledger.held_usage(db, [held.customer])
            if not any((h.dimension, h.hour) == (held.dimension, held.hour) for h in still):
                continue  # another pass took it
            _insert(ledger, db, config, dim, held.customer, held.hour, held.points, raw,
                    quantity, held.timestamp, len(held.points), now, now)  # fmt: skip
            ledger.release_held(db, held, expired=why)
        if why is None:
            log.info(
                "hour %s dimension %s customer %s: held usage sealed, quantity %s",
                iso_hour(held.hour),
                held.dimension,
                held.customer,
                quantity.text,
            )
        else:
            log.error(
                "hour %s dimension %s customer %s: quantity %s expired unsent: %s",
                iso_hour(held.hour),
                held.dimension,
                held.customer or "(no label)",
                quantity.text,
                why,
            )
        released.append(CustomerSealed(held.customer, held.dimension, held.hour, quantity.text))
    return released


def _drop_unsubscribed(ledger: Ledger, held: HeldUsage) -> None:
    """Usage held after a customer's unsubscribe, past its window: AWS refuses it (the
    customer is gone, or its hour's record was sealed at the unsubscribe), so it is forgotten
    with a line, not kept as an expired record (no revenue of a subscription was lost)."""
    with ledger.transaction() as db:
        ledger.release_held(db, held)
    log.warning(
        "hour %s dimension %s customer %s: usage after its unsubscribe (%d sample(s)) not "
        "billed: its window has passed", iso_hour(held.hour), held.dimension, held.customer,
        len(held.points),
    )  # fmt: skip


def held_rows(
    held: Sequence[HeldUsage], dims: Mapping[str, Dimension], leaving: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Held usage as `status` shows it: what each would bill if sealed now, and until when;
    `leaving`: labels of customers whose usage is held because they unsubscribed."""

    rows: list[dict[str, Any]] = []
    for h in held:
        dim = dims.get(h.dimension)
        try:
            quantity = billed(dim, list(h.points))[1].text if dim else None
        except (ArithmeticError, ValueError):
            quantity = None
        rows.append(
            {
                "hour": iso_hour(h.hour),
                "dimension": h.dimension,
                "customer": UNSUBSCRIBED if h.customer in leaving else UNKNOWN,
                "label": h.customer,
                "quantity": quantity,
                "state": "held",
                "expires_at": iso(saas_expires_at(h.timestamp)),
            }
        )
    return rows


# -- a customer's unsubscribe ---------------------------------------------------------------------
# `unsubscribe-pending` gives the seller one hour to send the buyer's last records. So at the first
# sealing pass after the notification is applied (each round, and the daemon's send tick), every
# (dimension, hour) of that customer with unsealed samples, the current hour included, becomes its
# record now (`early`): the customer's own points so far, through the dimension's own arithmetic,
# with next_attempt now (not the hour's send slot), so the daemon's sender sends it at once. The
# customer's parts are then taken out of those samples, in the same transaction that clears the
# buyer's `flush_due`: what stays is the other customers' usage, and this customer's later usage,
# which seal_one holds (its hour already has its record, and the buyer is leaving).


def seal_leaving(ledger: Ledger, config: Config, saas: Saas, now: float) -> list[Sealed]:
    """Seal now the open usage of every buyer an unsubscribe named (see the comment above);
    each buyer in its own transaction. A buyer no customer has yet has nothing to seal (its
    usage, if any, is held as an unknown customer's)."""
    sealed: list[Sealed] = []
    for buyer, labels in ledger.flushes_due():
        try:
            sealed += _seal_leaving(ledger, config, saas, now, buyer, labels)
        except Exception as e:  # contained: retried at the next pass, logged when it changes
            if kind_of(e) is not None:  # the ledger's storage: the daemon names that state
                raise
            error = f"{type(e).__name__}: {e}"
            if _flush_errors.get(buyer) != error:
                log.error("subscription: buyer %s unsubscribing, but its open usage cannot be "
                          "sealed now (%s); retried each pass, and billed with its hour if it "
                          "still fails", buyer, error)  # fmt: skip
            _flush_errors[buyer] = error
            continue
        _flush_errors.pop(buyer, None)
        if not labels:
            log.info("subscription: buyer %s unsubscribing, but no customer has its ids; nothing "
                     "to seal", buyer)  # fmt: skip
    return sealed


_flush_errors: dict[str, str] = {}  # buyer -> the error its last flush failed with (logged once)


def _seal_leaving(
    ledger: Ledger, config: Config, saas: Saas, now: float, buyer: str, labels: list[str]
) -> list[Sealed]:
    """One buyer's open usage sealed now, in one transaction that clears its flush_due."""
    dims = {d.name: d for d in config.dimensions}
    sealed: list[Sealed] = []
    with ledger.transaction() as db:
        pairs = ledger.unsealed_hours(db, hour_start(now) + HOUR)
        for label in labels:
            for name, hour in pairs:
                dim = dims.get(name)
                if dim is None or ledger.has_record(db, label, name, hour):
                    continue
                points = [p for p in ledger.points(db, name, hour) if p.value.is_finite()]
                if not points:
                    continue
                mine = shares_by_customer(points, saas.customer_label, dim).get(label)
                if mine is None and not saas.idle_zero:
                    continue
                if mine is None:  # an idle zero: what an hour of nothing bills
                    own: list[Point] = []
                    raw = ZERO
                    quantity = to_quantity(ZERO, dim.scale, dim.rounding, dim.decimals)
                else:
                    own = customer_points(points, mine, dim)
                    raw, quantity = billed(dim, own)
                timestamp = record_timestamp(max(p.t for p in points), hour)
                _insert(ledger, db, config, dim, label, hour, own, raw, quantity, timestamp,
                        len(own), now, now)  # fmt: skip
                ledger.mark_early(db, label, name, hour)
                ledger.take_out_customer(db, name, hour, saas.customer_label, label)
                sealed.append(Sealed(name, hour, quantity.text, 0))
                log.info("hour %s dimension %s customer %s: unsubscribing; its usage so far "
                         "sealed now, quantity %s, sent at once", iso_hour(hour), name, label,
                         quantity.text)  # fmt: skip
        ledger.flush_done(db, buyer, now)
    return sealed


def seal_each(
    ledger: Ledger, config: Config, saas: Saas, dim: Dimension, hour: int, now: float,
    offset: float, turn: Turn | None = None,
) -> list[Sealed]:  # fmt: skip
    """One (dimension, hour) sealed per customer (seal_one), as the sealing pass counts them."""
    return seal_one(ledger, config, saas, dim, hour, now, offset, turn) or []


def release(ledger: Ledger, config: Config, now: float) -> list[Sealed]:
    """Held usage sealed for labels that became customers (or expired), after each pass;
    contained: the sealing of the hours themselves went on."""
    try:
        done = release_held(ledger, config, now)
    except Exception as e:
        log.error("held usage: cannot release: %s: %s", type(e).__name__, e)
        return []
    return [Sealed(s.dimension, s.hour, s.quantity, 0) for s in done]


def so_far_by_customer(ledger: Ledger, dim: Dimension, label: str, hour: int) -> dict[str, str]:
    """What each customer's open hour would bill if it were sealed now (`status`); nothing when
    the arithmetic fails (sealing will record the hour's seal error, which status shows)."""
    points = [p for p in ledger.points(ledger.db, dim.name, hour) if p.value.is_finite()]
    split = split_by_customer(points, label, dim)
    try:
        return {c or NO_LABEL: billed(dim, pts)[1].text for c, pts in sorted(split.items())}
    except (ArithmeticError, ValueError):
        return {}


def so_far_total(ledger: Ledger, dim: Dimension, label: str, hour: int) -> str | None:
    """What the open hour's records would add up to if it were sealed now (`status`): each known
    customer's own quantity (rounded on its own, as sealing does), summed; usage of labels no
    customer has is held, not a record, so not in it (status lists it per customer). None
    before the hour's first sample, or when the arithmetic fails (sealing will record why).

    Not `hour.billed` over every customer's usage at once: rounding and max/min/last/avg do not
    distribute over customers (two customers' 0.4 each bill 1 each with rounding up, not 1)."""
    points = [p for p in ledger.points(ledger.db, dim.name, hour) if p.value.is_finite()]
    if not points:
        return None
    known, _ = ledger.customer_labels()
    total = ZERO
    try:
        for customer, own in split_by_customer(points, label, dim).items():
            if customer in known:
                total += Decimal(billed(dim, own)[1].text)
    except (ArithmeticError, ValueError):
        return None
    return plain(total)


def customer_lines(
    label: str, breakdown: Mapping[Any, Decimal], ledger: Ledger | None
) -> list[str]:
    """`sample`: the reading per customer (the value of `label`), each marked unknown when no
    customer has it yet (its usage would be held)."""
    by: dict[str, Decimal] = {}
    for labels, value in breakdown.items():
        who = dict(labels).get(label, "")
        by[who] = by.get(who, Decimal(0)) + value
    lines = []
    for who, value in sorted(by.items()):
        if not value:
            continue
        known = bool(who) and ledger is not None and ledger.customer(who) is not None
        note = "" if known else "  (unknown customer: held until `customers add`)"
        lines.append(f"  customer {shown(who, 60) if who else '(no label)'}  {plain(value)}{note}")
    return lines


def status_sections(ledger: Ledger, config: Config, label: str, now: float) -> dict[str, Any]:
    """`status`: the customers count, each dimension's open hour so far per customer, and usage
    held for labels no customer has (`unknown customer`)."""
    dims = {d.name: d for d in config.dimensions}
    everyone = ledger.customers(include_removed=True)
    states = ledger.subscription_states()
    leaving = frozenset(k for k, v in states.items() if v.state in LEAVING or v.flushed_at)
    by_state: dict[str, int] = {}
    for c in everyone:
        state = states[c.label].state if c.label in states else NOT_NOTIFIED
        by_state[state] = by_state.get(state, 0) + 1
    return {
        "mode": "saas",
        "customers": {
            "known": sum(1 for c in everyone if c.removed_at is None),
            "removed": sum(1 for c in everyone if c.removed_at is not None),
        },
        # counts by state, and each customer whose subscription is not plainly active
        "subscriptions": {
            "by_state": dict(sorted(by_state.items())),
            "attention": [
                subscription_json(k, v) for k, v in sorted(states.items()) if v.state != SUBSCRIBED
            ],
        },
        "current_hour_so_far_by_customer": {
            d.name: so_far_by_customer(ledger, d, label, hour_start(now)) for d in config.dimensions
        },
        "held": held_rows(ledger.held_usage(), dims, leaving),
    }


NOT_NOTIFIED = "not notified"  # no subscription notification named the customer's buyer yet


def subscription_json(label: str, s: Subscription | None) -> dict[str, Any]:
    """A customer's subscription as `status` and `customers list --json` show it."""
    if s is None:
        return {"customer": label, "state": NOT_NOTIFIED}
    return {
        "customer": label,
        "state": s.state,
        "since": iso(s.event_at),
        "offer": s.offer,
        "free_trial": s.free_trial,
        "unsubscribe_sealed_at": iso(s.flushed_at) if s.flushed_at else None,
        "unsubscribe_seal_due": s.flush_due is not None,
    }
