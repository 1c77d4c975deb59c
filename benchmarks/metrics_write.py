"""The metrics textfile (agent/daemon/metrics.py): the CPU of one write.

Why: the daemon rewrites it at every send tick (15 s) and counts the ledger's records again when
something changed them; neither may cost the footprint a sampling round costs (about 2 ms CPU).
Usage: python benchmarks/metrics_write.py [RECORDS [PENDING]] (default 6480 = 90 days x 24 h x 3
dimensions, 5 pending; a SaaS extreme: 300000 300000).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from agent.aggregate import Quantity
from agent.daemon.metrics import TextfileMetrics
from agent.ledger import Ledger

H = 1_800_000_000
ROUNDS = 300


def main(n: int, pending: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger(Path(d) / "state")
        with ledger.transaction() as db:
            for i in range(n):
                hour = H - (i // 3) * 3600
                ledger.insert_sealed(db, dimension=f"d{i % 3}", hour=hour, product_code="p",
                                     quantity=Quantity(4), timestamp=hour + 3540,
                                     client_token=f"t{i}", samples=1, raw="4",
                                     sealed_at=hour + 3600, next_attempt=hour + 3600)  # fmt: skip
            db.execute("UPDATE hours SET state = 'sent', done_at = sealed_at WHERE rowid > ?",
                       (pending,))  # fmt: skip
        now = H + 7200
        metrics = TextfileMetrics(Path(d) / "m.prom", ["d0", "d1", "d2"], now, {"d0": 3},
                                  Path(d) / "state" / "health.json")  # fmt: skip
        for name in ("d0", "d1", "d2"):
            metrics.lines_read(name, 100)
        state, bounds = ledger.send_state(), ledger.pending_bounds(saas=False)
        metrics.tick(ledger, now, state, bounds)
        for label, write in (
            ("a tick, nothing changed (render + atomic replace)",
             lambda i: metrics.tick(ledger, now + i, state, bounds)),
            ("a re-count (records, send state, health.json) + write",
             lambda i: metrics.refresh(ledger, now + i)),
        ):  # fmt: skip
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(ROUNDS):
                write(i)
            cpu = (time.process_time() - cpu) / ROUNDS * 1e3
            wall = (time.perf_counter() - wall) / ROUNDS * 1e3
            print(f"{n} records, {pending} pending: {label}: {cpu:.3f} ms CPU, {wall:.3f} ms wall")
        ledger.close()


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 6480,
        int(sys.argv[2]) if len(sys.argv) > 2 else 5,
    )
