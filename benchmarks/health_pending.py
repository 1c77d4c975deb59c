"""health.json with many pending SaaS records: the time and memory of one `health.write`.

Why: health is rewritten under the daemon's round lock; a seller's agent may hold 300,000 pending
records (100,000 customers x 3 dimensions). Usage: python benchmarks/health_pending.py [N]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from agent.aggregate import Quantity
from agent.ledger import Ledger
from agent.sending import health

H = 1_800_000_000


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger(Path(d))
        with ledger.transaction() as db:
            for i in range(n):
                ledger.insert_sealed(db, dimension="requests", hour=H, product_code="p",
                                     quantity=Quantity(1), timestamp=H + 3599,
                                     client_token=str(uuid.uuid4()), samples=1, raw="1",
                                     sealed_at=H + 3600, next_attempt=H + 3600,
                                     customer=f"c{i:06d}", keep_samples=True)  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        t0 = time.perf_counter()
        health.write(Path(d), ledger, H + 3700)
        took = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        ledger.close()
    print(f"{n} pending records: health.write {took:.2f} s, max RSS {before} -> {after} MiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300_000)
