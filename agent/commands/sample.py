"""`sample`: every collector once; each dimension's raw reading and what it would add to the hour.
Reads saved positions and baselines, writes nothing."""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal
from typing import Any

from agent.aggregate import plain
from agent.clock import Clock
from agent.commands.common import load_config, open_ledger_readonly
from agent.errors import EX_OK


def cmd_sample(args: argparse.Namespace) -> int:
    """Run every collector once; print each dimension's raw reading and what it adds to the hour."""
    from agent.collecting.sampling import Sampler, take_within
    from agent.collectors.log import LogCollector
    from agent.modes.choose import mode_for

    cfg = load_config(args)
    mode = mode_for(cfg)
    sampler = Sampler(cfg, all_labels=True)  # shows each reading's breakdown
    clock = Clock()
    ledger = open_ledger_readonly(cfg.state_dir)
    for dim in cfg.dimensions:
        collector = sampler.collectors.get(dim.name)
        if isinstance(collector, LogCollector):
            collector.count_lines = True
        saved = ledger.position(dim.name) if ledger else None
        t = clock.time()
        s = take_within(sampler, dim, t, saved, clock.monotonic)
        if s.error or s.value is None:
            print(f"warning: {dim.name}: {s.error}", file=sys.stderr)
            continue
        text = f"{dim.name} {plain(s.value)}  (raw {plain(s.raw)}, {dim.aggregate}); "
        text += _billed(dim, t, s.value)
        if isinstance(collector, LogCollector):
            last = collector.last
            text += f"; log: {last.lines} lines read, {plain(last.matched)} matched"
        print(text)
        for lost in s.unread:  # what `run` would log, count in status and name in health
            print(f"warning: {dim.name}: usage went unread: {lost.what}; fix: {lost.fix}",
                  file=sys.stderr)  # fmt: skip
        for line in mode.sample_lines(s.breakdown or {}, ledger):  # by label set, or by customer
            print(line)
    return EX_OK


def _billed(dim: Any, t: float, value: Decimal) -> str:
    """What the reading is worth in the dimension's billed units: after `scale`, and what an hour
    holding only this reading would send after rounding (the sealed hour rounds its total)."""
    from agent.aggregate import Point, combine_exact, to_decimal, to_quantity
    from agent.windows import span_for

    exact = combine_exact(dim.aggregate, [Point(t, value, span_for(t, dim.interval))])
    alone = to_quantity(exact, dim.scale, dim.rounding, dim.decimals)
    hour_value = to_decimal(exact)
    return (
        f"billed units {plain(hour_value * dim.scale)} (scale {plain(dim.scale)}); an hour of only "
        f"this reading sends {alone.text} (rounding {dim.rounding})"
    )
