"""`sample`: every collector once; each dimension's raw reading and what it would add to the hour.
Reads saved positions and baselines, writes nothing. `--from-beginning` also tests each log
pattern against the lines already in its files."""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal
from typing import Any

from agent.aggregate import exact, plain, shown
from agent.clock import HOUR, Clock
from agent.commands.common import load_config, open_ledger_readonly
from agent.errors import EX_OK
from agent.warnings import COLLECTOR_FAILED, USAGE_UNREAD, Warnings


def cmd_sample(args: argparse.Namespace) -> int:
    """Run every collector once; print each dimension's raw reading and what it adds to the hour."""
    from agent.collecting.sampling import Sampler, take_within
    from agent.collectors.log import LogCollector
    from agent.modes.choose import mode_for

    cfg = load_config(args)
    mode = mode_for(cfg)
    warns = Warnings(cfg.accepted_warnings, sys.stderr)
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
            warns.say(COLLECTOR_FAILED, f"{dim.name}: {s.error}")
        else:
            text = f"{dim.name} {plain(s.value)}  (raw {plain(s.raw)}, {dim.aggregate}); "
            text += _billed(dim, t, s.value)
            if isinstance(collector, LogCollector):
                last = collector.last
                text += f"; log: {last.lines} lines read, {plain(last.matched)} matched"
            print(text)
            for lost in s.unread:  # what `run` would log, count in status and name in health
                warns.say(
                    USAGE_UNREAD, f"{dim.name}: usage went unread: {lost.what}; fix: {lost.fix}"
                )
            for line in mode.sample_lines(s.breakdown or {}, ledger):  # by label set or customer
                print(line)
        if getattr(args, "from_beginning", False) and dim.collector.type == "log":
            for line in pattern_lines(dim):
                print(line)
    return EX_OK


def _billed(dim: Any, t: float, value: Decimal) -> str:
    """What the reading is worth in the dimension's billed units: after `scale`, what an hour
    holding only this reading would send after rounding (the sealed hour rounds its total), and,
    where an hour's samples add up (`integral`, `sum` of levels), what an hour at this level
    bills."""
    from agent.aggregate import Point, combine_exact, to_decimal, to_quantity
    from agent.windows import span_for

    exact_value = combine_exact(dim.aggregate, [Point(t, value, span_for(t, dim.interval))])
    alone = to_quantity(exact_value, dim.scale, dim.rounding, dim.decimals)
    hour_value = to_decimal(exact_value)
    text = (
        f"billed units {_units(hour_value * dim.scale)} (scale {exact(dim.scale)}); an hour of "
        f"only this reading sends {alone.text} (rounding {dim.rounding})"
    )
    level_hour = _level_hour(dim, value)
    if level_hour is not None:
        whole = to_quantity(level_hour, dim.scale, dim.rounding, dim.decimals)
        text += f"; an hour at this level bills {whole.text}"
    return text


def _units(value: Decimal) -> str:
    """Billed units for people: six decimals, or six significant digits where those show 0."""
    text = plain(value)
    if text != "0" or not value:
        return text
    return exact(value.quantize(Decimal(1).scaleb(value.adjusted() - 5)))


def _level_hour(dim: Any, value: Decimal) -> Decimal | None:
    """What a whole hour of readings at `value` adds up to before scale (None where the hour's
    quantity is that of one reading: max, min, avg, last, and increments)."""
    if dim.collector.kind != "level":
        return None
    if dim.aggregate == "integral":
        return value  # value-hours: the level held for the hour
    if dim.aggregate == "sum":
        return value * (HOUR // dim.interval)  # one sample per interval
    return None


def pattern_lines(dim: Any) -> list[str]:
    """`--from-beginning`: the dimension's pattern over the lines already in its files."""
    from agent.collectors.patterntest import try_pattern

    opts = dim.collector.options
    found = try_pattern(opts)
    if not found.files:
        return [f"  pattern test: no file matches {opts['path']}"]
    what = "count" if opts["mode"] == "count" else "sum of value"
    lines = [
        f"  pattern test from the beginning of {len(found.files)} file(s): {found.lines:,} lines, "
        f"{found.matching:,} matching ({what} {plain(found.value)})"
        + (f"; {found.unfinished} last line(s) without a newline not counted" if found.unfinished
           else "")
    ]  # fmt: skip
    for problem in found.unreadable:
        lines.append(f"    cannot read {problem}")
    enc = opts["encoding"]
    lines += [f"    matches:      {shown(x, encoding=enc)}" for x in found.matched_examples]
    lines += [f"    does not:     {shown(x, encoding=enc)}" for x in found.other_examples]
    for name, (top, count) in found.top_values().items():
        values = ", ".join(f"{shown(v, 60)} {plain(u)}" for v, u in top) or "(none)"
        more = f" (top {len(top)} of {count:,})" if count > len(top) else ""
        lines.append(f"    label {name}: {values}{more}")
    return lines
