"""`report`: what was billed, hour by hour, with record ids, for a buyer to reconcile against
their AWS bill. Read-only."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from agent.clock import Clock
from agent.commands.common import hour_row, load_config, open_ledger_readonly, table
from agent.errors import EX_OK, UsageError
from agent.ledger import Ledger
from agent.modes.choose import mode_for
from agent.modes.mode import Mode

_AGO = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = ["hour", "dimension", "quantity", "state", "record_id", "timestamp", "sent_at",
           "product_code", "attempts", "last_error"]  # fmt: skip


def parse_when(text: str, now: float, option: str) -> float:
    """`90m`, `24h`, `7d`, `2w` ago, or a date / ISO time (UTC unless it says otherwise)."""
    m = _AGO.match(text)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: expected a duration ago (90m, 24h, 7d, 2w) or a date "
            "(2026-11-01, 2026-11-01T13:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def rows(
    ledger: Ledger | None,
    since: float,
    until: float | None,
    mode: Mode,
    customer: str | None = None,
) -> list[dict[str, Any]]:
    """The billed records of the period, each with what its mode keys it by (SaaS mode: its
    customer); only `customer`'s when given."""
    if ledger is None:
        return []
    hours = ledger.hours(since=since - since % 3600, until=until)
    return [{**mode.key(h), **hour_row(h)} for h in hours if customer in (None, h.customer)]


def render(data: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        columns = ["customer", *COLUMNS] if data and "customer" in data[0] else COLUMNS
        writer = csv.DictWriter(out, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data)
        return out.getvalue().rstrip("\n")
    return _table(data)


def _table(data: list[dict[str, Any]]) -> str:
    if not data:
        return "no sealed hours in this period"
    cols = ["hour", "dimension", "quantity", "state", "record_id", "sent_at"]
    if "customer" in data[0]:
        cols.insert(1, "customer")
    lines = table([[c.upper() for c in cols]] + [[str(r[c] or "-") for c in cols] for r in data])
    totals: dict[str, Decimal] = {}
    for r in data:
        if r["state"] == "sent":
            who = f"{r['customer']} " if "customer" in r else ""
            name = who + r["dimension"]
            totals[name] = totals.get(name, Decimal(0)) + Decimal(r["quantity"])
    lines.append("")
    lines.append("billed (sent) totals:")
    for dim, total in sorted(totals.items()):
        lines.append(f"  {dim}: {format(total, 'f')}")
    other = [r for r in data if r["state"] != "sent"]
    if other:
        lines.append(f"not billed: {len(other)} hour(s) pending, rejected or expired (see state)")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    now = Clock().time()
    since = parse_when(args.since, now, "--since")
    until = parse_when(args.until, now, "--until") if args.until else None
    if until is not None and until <= since:
        raise UsageError("--until must be later than --since")
    mode = mode_for(cfg)
    mode.customer_option(args.customer, cfg.source)  # instance mode has no customers
    ledger = open_ledger_readonly(cfg.state_dir, "report")
    data = rows(ledger, since, until, mode, args.customer)
    if args.customer is not None and not data and (ledger is None or not _known(ledger, args)):
        raise UsageError(
            f"--customer {args.customer}: no such customer in {cfg.state_dir}; "
            "see `metering-agent customers list`"
        )
    print(render(data, args.format))
    return EX_OK


def _known(ledger: Any, args: argparse.Namespace) -> bool:
    return ledger.customer(args.customer) is not None
