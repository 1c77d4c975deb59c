"""Sealing an hour with allocations: peak memory (RSS) and time, by tenants x samples.

Each case runs in a fresh process: a real ledger in a temporary dir is filled with one hour of
samples of a log dimension billed per tenant (every tenant in every sample), then sealed once.
`--repo PATH` measures another checkout of the agent (e.g. an older commit) the same way, so
two versions can be compared side by side in one run.

    .venv/bin/python benchmarks/allocations.py [--repo /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASE = r"""
import hashlib, json, resource, sys, tempfile, time
from decimal import Decimal
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from agent import config
from agent.ledger import Ledger
from agent.modes.instance import seal_hours

tenants, samples = int(sys.argv[2]), int(sys.argv[3])
work = Path(tempfile.mkdtemp())
(work / "c.yaml").write_text(f'''product_code: prod-benchmark
state_dir: {work / "state"}
dimensions:
  - name: api
    collector: {{type: log, path: {work / "x.log"}, pattern: 'tenant=(?P<tenant>\\w+)'}}
    allocations: {{tags: {{Tenant: tenant}}}}
''')
cfg = config.load(work / "c.yaml")
ledger = Ledger(cfg.state_dir)
H = 1_800_000_000 // 3600 * 3600
step = 3600 / samples
for i in range(samples):
    parts = {(("tenant", f"t{n:04d}"),): Decimal(n % 7 + 1) for n in range(tenants)}
    ledger.record_sample("api", H + i * step, sum(parts.values()), step, None, carry=False,
                         breakdown=parts)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
sealed = seal_hours(ledger, cfg, H + 3600 + 1, offset=0)
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(h,) = ledger.pending()
print(json.dumps({"before_kib": before, "peak_kib": peak, "seconds": took,
                  "allocations": len(h.allocations),
                  "digest": hashlib.sha1(repr(h.allocations).encode()).hexdigest()[:10]}))
"""


def run(repo: Path, tenants: int, samples: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(repo), str(tenants), str(samples)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="another checkout to measure beside this one")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    repos = [("this", here)] + ([("other", args.repo.resolve())] if args.repo else [])
    print(f"{'version':<7} {'tenants x samples':>18} {'peak RSS':>10} {'growth':>9} {'seal':>8}")
    print("(growth: peak RSS while sealing over RSS before it; same digest: same allocations)")
    for tenants, samples in ((1000, 60), (1000, 360), (2500, 60)):
        for name, repo in repos:
            r = run(repo, tenants, samples)
            growth = (r["peak_kib"] - r["before_kib"]) / 1024
            print(
                f"{name:<7} {f'{tenants} x {samples}':>18} {r['peak_kib'] / 1024:>7.1f} MiB "
                f"{growth:>5.1f} MiB {r['seconds']:>6.2f} s  {r['allocations']} allocations "
                f"{r['digest']}"
            )


if __name__ == "__main__":
    main()
