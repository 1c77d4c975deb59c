"""SaaS sealing cost: one (dimension, hour) sealed per customer, through the real ledger.

An hour of 60 samples (one a minute) of a `sum` dimension whose breakdown names `--active`
customers per sample, drawn from `--customers` known ones (the rest get idle zeros), plus a share of
usage for labels no customer has (held). Prints the time to seal, records and held rows made, the
ledger's growth, and the process's peak RSS.

    python benchmarks/saas_sealing.py [--customers 10000] [--active 2000] [--aggregate sum]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import config as config_mod
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.modes.saas import seal_hours
from agent.windows import span_for

H = 1_800_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--active", type=int, default=2_000, help="customers with usage per sample")
    ap.add_argument("--aggregate", default="sum", choices=("sum", "max", "avg", "last"))
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(
            f"product_code: abcd1234efgh5678ijkl90mn\nstate_dir: {tmp}/state\nmode: saas\n"
            "dimensions:\n  - name: api\n    collector: {type: log, path: /x.log, "
            f"pattern: 'c=(?P<customer>\\w+)'}}\n    aggregate: {args.aggregate}\n"
        )
        cfg = config_mod.load(path)
        ledger = Ledger(cfg.state_dir)
        arn = "arn:aws:license-manager::111122223333:license:l-1"
        with ledger.transaction() as db:
            db.executemany(
                "INSERT INTO customers (label, account_id, license_arn, added_at) "
                "VALUES (?, ?, ?, 0)",
                [(f"c{i}", f"{100000000000 + i}", arn) for i in range(1, args.customers)],
            )
        ledger.add_customer(Customer("c0", "100000000000", arn, None, None, None, 0.0))
        names = [f"c{i}" for i in range(args.customers)]
        for m in range(60):
            t = H + 60.0 * m
            who = [*rng.sample(names, min(args.active, len(names))), f"x{m % 7}"]
            parts = {(("customer", c),): Decimal(rng.randint(1, 50)) for c in who}
            ledger.record_sample("api", t, sum(parts.values(), Decimal(0)), span_for(t, 60),
                                 None, carry=True, increment=True, breakdown=parts)  # fmt: skip
        size_before = sum(f.stat().st_size for f in Path(cfg.state_dir).glob("ledger.db*"))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        seal_hours(ledger, cfg, H + 3700, offset=0)
        took = time.perf_counter() - start
        records = len(ledger.hours())
        held = len(ledger.held_usage())
        size_after = sum(f.stat().st_size for f in Path(cfg.state_dir).glob("ledger.db*"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"aggregate {args.aggregate}: {args.customers} known customers, {args.active} active "
            f"per sample, 60 samples: sealed in {took:.2f} s -> {records} records, {held} held; "
            f"ledger {size_before / 2**20:.1f} -> {size_after / 2**20:.1f} MiB; peak RSS "
            f"{rss_before / 1024:.0f} -> {peak / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
