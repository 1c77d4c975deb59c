"""Log counting speed: the log collector against `grep -cE`, side by side on one file.

Generates a 3M-line access log (about 300 MB) in a temporary directory, warms the page cache, then
times, in alternation, `grep -cE PATTERN` and the agent's LogCollector reading the whole file
(`start_at: beginning`), plus a per-line Python loop for reference. Prints the median of several
runs and the ratio grep_time / agent_time (1.0 = as fast as grep), in wall time and in CPU time.
Then the CPU that one sampling round pays for a live log with 30 rotated `.gz` copies beside it.

    python benchmarks/logcount.py [--lines 3000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.collectors import Sources
from agent.collectors.log import LogCollector

# a frequent literal, the regex from NOTES.md, an alternation, and a rare literal
PATTERNS = [
    '"GET /api/v1/orders',
    '" 5[0-9][0-9] ',
    '"(GET|POST) /api/v[12]/',
    '"PUT /api/v2/items',
]


def generate(path: Path, lines: int) -> None:
    rng = random.Random(42)
    paths = ["/api/v1/orders", "/api/v1/orders/123", "/api/v1/users", "/static/app.js", "/health",
             "/api/v2/items?page=3"]  # fmt: skip
    methods = ["GET"] * 7 + ["POST"] * 2 + ["PUT"]
    codes = [200] * 85 + [404] * 8 + [301] * 3 + [500, 502, 503, 504]
    with open(path, "w") as f:
        for i in range(lines):
            ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            f.write(
                f"{ip} - - [26/Nov/2026:10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d} +0000] "
                f'"{rng.choice(methods)} {rng.choice(paths)} HTTP/1.1" {rng.choice(codes)} '
                f'{rng.randrange(100, 9000)} "-" "curl/8.0"\n'
            )


def timed(fn: Callable[[Path, str], int], log: Path, pattern: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process plus the children it waited for), result. On a
    shared machine the CPU time is the steadier figure: it does not count waiting for a core."""
    start, cpu = time.perf_counter(), _cpu()
    result = fn(log, pattern)
    return time.perf_counter() - start, _cpu() - cpu, result


def _cpu() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def grep(path: Path, pattern: str) -> int:
    out = subprocess.run(["grep", "-cE", pattern, str(path)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def agent(path: Path, pattern: str) -> int:
    options = {"path": str(path), "pattern": pattern, "mode": "count", "start_at": "beginning",
               "encoding": "utf-8", "max_line_bytes": 65536}  # fmt: skip
    return int(LogCollector(options, Sources()).read(None).value)


def per_line(path: Path, pattern: str) -> int:
    search = re.compile(pattern.encode()).search
    with open(path, "rb") as f:
        return sum(1 for line in f if search(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=3_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "access.log"
        generate(log, args.lines)
        size = log.stat().st_size
        log.read_bytes()  # warm the page cache
        print(f"{args.lines:,} lines, {size / 2**20:.0f} MiB, median of {args.runs} runs")
        print(
            f"{'pattern':<28} {'grep -cE':>9} {'agent':>9} {'per-line':>9} {'ratio':>6}"
            f" {'cpu ratio':>9}  count"
        )
        for pattern in PATTERNS:
            times: dict[str, list[float]] = {"grep": [], "agent": [], "per_line": []}
            cpu: dict[str, list[float]] = {"grep": [], "agent": []}
            counts = {}
            for _ in range(args.runs):
                for name, fn in (("grep", grep), ("agent", agent)):
                    elapsed, used, counts[name] = timed(fn, log, pattern)
                    times[name].append(elapsed)
                    cpu[name].append(used)
            elapsed, _, counts["per_line"] = timed(per_line, log, pattern)
            times["per_line"].append(elapsed)
            if len(set(counts.values())) != 1:
                raise SystemExit(f"counts differ for {pattern!r}: {counts}")
            g, a, p = (statistics.median(times[k]) for k in ("grep", "agent", "per_line"))
            c = statistics.median(cpu["grep"]) / statistics.median(cpu["agent"])
            print(
                f"{pattern:<28} {g:>8.3f}s {a:>8.3f}s {p:>8.3f}s {g / a:>6.2f} {c:>9.2f}"
                f"  {counts['agent']:,}"
            )

        reading_beside_copies(Path(tmp))


def reading_beside_copies(tmp: Path, copies: int = 30, rounds: int = 200) -> None:
    """CPU per reading of a live log that has `copies` rotated .gz copies beside it: what each
    sampling round pays for looking after rotation."""
    folder = tmp / "rotated"
    folder.mkdir()
    for i in range(1, copies + 1):
        with gzip.open(folder / f"access.log.{i}.gz", "wb") as z:
            z.write(b"".join(b'%d-%d "GET /api/x"\n' % (i, j) for j in range(2000)))
    log = folder / "access.log"
    log.write_bytes(b'x "GET /api/x"\n' * 10)
    options = {"path": str(log), "pattern": '"GET /api/', "mode": "count", "start_at": "end",
               "encoding": "utf-8", "max_line_bytes": 65536}  # fmt: skip
    collector = LogCollector(options, Sources())
    state = collector.read(None).state
    used = []
    for k in range(rounds):
        with open(log, "ab") as f:
            f.write(b'%d "GET /api/x"\n' % k * 5)
        start = time.process_time()
        reading = collector.read(state)
        used.append(time.process_time() - start)
        state = reading.state
    print(
        f"one reading beside {copies} .gz copies: {statistics.median(used) * 1000:.2f} ms CPU "
        f"(median of {rounds}), saved state {len(json.dumps(state)):,} bytes"
    )


if __name__ == "__main__":
    main()
