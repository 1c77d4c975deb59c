"""How long sample writes wait while a SaaS hour is sealed, as in the daemon.

The daemon stores each reading under its round lock, and seals under the same lock
(daemon/daemon.py); sealing gives way between its steps (daemon/turns.py). This script builds a
ledger of `--customers` customers and one hour of 60 samples (one a minute) for each of
`--dimensions` `sum` dimensions, `--active` customers' usage in each sample (every other customer
gets an idle zero), then seals that hour on one thread while another stores a sample of the next
hour every `--every` seconds, each under the lock as the daemon's reads do. Prints the seal's total
time, the writes made during it, and the max and p99 of their waits (lock and transaction).

Run from a checkout (PYTHONPATH=. python benchmarks/seal_stall.py); with an older checkout on
PYTHONPATH (no daemon/turns.py) it measures the old way: one lock held for the whole pass.

    python benchmarks/seal_stall.py [--customers 100000] [--dimensions 3] [--active 2000]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import random
import statistics
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.ledger import Ledger
from agent.modes.saas import seal_hours
from agent.windows import span_for

H = 1_800_000_000


def round_lock() -> Any:
    try:
        from agent.daemon.turns import Turns
    except ImportError:  # before sealing in steps: a plain lock, held for the whole pass
        return threading.Lock()
    return Turns()


def build(tmp: Path, args: argparse.Namespace) -> tuple[Any, Ledger, list[str]]:
    path = tmp / "config.yaml"
    names = [f"d{i}" for i in range(args.dimensions)]
    dims = "".join(
        f"  - name: {n}\n    collector: {{type: log, path: /x.log, "
        "pattern: 'c=(?P<customer>\\w+)'}\n    aggregate: sum\n"
        for n in names
    )
    path.write_text(
        f"product_code: abcd1234efgh5678ijkl90mn\nstate_dir: {tmp}/state\nmode: saas\n"
        "dimensions:\n" + dims
    )
    cfg = config_mod.load(path)
    ledger = Ledger(cfg.state_dir)
    arn = "arn:aws:license-manager::111122223333:license:l-1"
    labels = [f"c{i}" for i in range(args.customers)]
    with ledger.transaction() as db:
        db.executemany(
            "INSERT INTO customers (label, account_id, license_arn, added_at) VALUES (?, ?, ?, 0)",
            [(c, f"{100000000000 + i}", arn) for i, c in enumerate(labels)],
        )
    rng = random.Random(1)
    for name in names:
        for m in range(60):
            t = H + 60.0 * (m + 1) - 1
            who = rng.sample(labels, min(args.active, len(labels)))
            parts = {(("customer", c),): Decimal(rng.randint(1, 50)) for c in who}
            ledger.record_sample(name, t, sum(parts.values(), Decimal(0)), span_for(t, 60),
                                 None, carry=True, increment=True, breakdown=parts)  # fmt: skip
    return cfg, ledger, names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--dimensions", type=int, default=3)
    ap.add_argument("--active", type=int, default=2_000, help="customers with usage per sample")
    ap.add_argument("--every", type=float, default=0.05, help="seconds between sample writes")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ledger, names = build(Path(tmp), args)
        lock = round_lock()
        stepped = "turn" in inspect.signature(seal_hours).parameters
        sealing = threading.Event()
        waits: list[float] = []

        def writer() -> None:
            i = 0
            sealing.wait()
            while sealing.is_set():
                t = H + 3600 + 0.001 * i
                want = time.perf_counter()
                with lock:
                    ledger.record_sample(names[i % len(names)], t, Decimal(1), 1.0, None,
                                         carry=True, increment=True)  # fmt: skip
                waits.append(time.perf_counter() - want)
                i += 1
                time.sleep(args.every)

        thread = threading.Thread(target=writer)
        thread.start()
        start = time.perf_counter()
        sealing.set()
        try:
            with lock:
                if stepped:  # as the daemon seals: the round lock given way between steps
                    seal_hours(ledger, cfg, H + 3601, offset=0, turn=lock)
                else:
                    seal_hours(ledger, cfg, H + 3601, offset=0)
            took = time.perf_counter() - start
        finally:
            sealing.clear()
            thread.join()
        records = ledger.db.execute("SELECT COUNT(*) FROM hours").fetchone()[0]
        waits.sort()
        p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))] if waits else float("nan")
        print(
            f"{'stepped' if stepped else 'one lock for the pass'}: {args.customers} customers x "
            f"{args.dimensions} dimensions ({args.active} active per sample): sealed {records} "
            f"records in {took:.1f} s; {len(waits)} sample writes during it: wait max "
            f"{waits[-1] if waits else float('nan'):.3f} s, p99 {p99:.3f} s, median "
            f"{statistics.median(waits) if waits else float('nan'):.4f} s"
        )


if __name__ == "__main__":
    main()
