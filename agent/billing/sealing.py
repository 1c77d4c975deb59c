"""Sealing: every past hour with unsealed samples becomes immutable records, once. The pass is the
same in both modes; what one (dimension, hour) becomes is the mode's (`seal_one`): one record
(instance_sealing.py), or one per customer (saas_sealing.py). modes/ puts the two together.

It runs at each boundary, at start-up, after each sampling round and at a stop, and it looks at what
the ledger holds rather than at which timer fired, so a suspend, a clock jump or a missed trigger
never skips or repeats an hour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agent.billing.hour import Sealed
from agent.billing.turn import Turn
from agent.clock import HOUR, hour_start, iso_hour
from agent.config.model import Config, Dimension
from agent.ledger import Ledger
from agent.ledger.faults import kind_of

log = logging.getLogger(__name__)


def seal_pass(
    ledger: Ledger,
    config: Config,
    now: float,
    seal_one: Callable[[Dimension, int], Sequence[Sealed]],
    include_current: bool = False,
    hold: Callable[[str, int], bool] | None = None,
    then: Callable[[], Sequence[Sealed]] | None = None,
    turn: Turn | None = None,
) -> list[Sealed]:
    """Seal every hour before the current one (and the current one too at a stop), each
    (dimension, hour) with the mode's `seal_one`; then the mode's `then` (SaaS mode: held usage
    released).

    Each (dimension, hour) seals in its own transaction: one that cannot be sealed (a value the
    arithmetic refuses, a database error) is logged, kept in the ledger for `status` and health,
    and retried at the next pass, while every other dimension's hours go on being sealed and sent.
    The ledger's own storage failing (disk full, damaged, gone: ledger/faults.py) is no one
    dimension's problem: it ends the pass, raised to the daemon, which names that state.
    `hold(dimension, hour)` keeps an hour open while a read for it is still within its deadline.
    `turn.give_way()` runs before each (dimension, hour) (and the mode's `seal_one` runs it
    between its own steps): the daemon lets the sample writes waiting for it go first.
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
        if turn is not None:
            turn.give_way()
        try:
            sealed.extend(seal_one(dim, hour))
        except Exception as e:  # contained: this dimension's hour only
            if kind_of(e) is not None:
                raise
            failed.add(name)
            _note_seal_error(ledger, name, hour, f"{type(e).__name__}: {e}")
            continue
    if then is not None:
        sealed.extend(then())
    for name, _hour, _error in ledger.seal_errors():
        if name not in failed and name in dims and ledger.clear_seal_error(name):
            log.info("dimension %s: its hours seal again", name)
    return sealed


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
