"""Log counting speed: the matching engine and the log collector against `grep -cE`, side by side.

Generates a 3M-line access log (about 300 MB) in a temporary directory, warms the page cache, then
times, in alternation, for each of five kinds of pattern:

- `grep -cE PATTERN` (named groups written as plain groups),
- the engine alone: `LineMatcher.scan` over the file's blocks (held in memory, cut at newlines as
  the collector cuts them, `log.BLOCK` bytes each),
- the whole collector: `LogCollector.read` of the file (`start_at: beginning`): reading, the
  engine, positions and fingerprints,

and prints the median of several runs and the ratios grep_time / time (1.0 = as fast as grep), in
wall time and in CPU time (this process plus the children it waited for; on a shared machine the
steadier figure). The labelled pattern is counted per label, as a dimension with allocations
counts it, and its label counts are checked against Python's `re` line by line. Then the CPU that
one sampling round pays for a live log with 30 rotated `.gz` copies beside it.

    python benchmarks/logcount.py [--lines 3000000] [--runs 5] [--log PATH]
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
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from agent.collectors import Sources
from agent.collectors.linecount import LineMatcher
from agent.collectors.log import LogCollector
from agent.collectors.logblocks import BLOCK

# (kind, pattern, labels counted)
PATTERNS = [
    ("frequent literal", '"GET /api/v1/orders', False),
    ("character class", '" 5[0-9][0-9] ', False),
    ("alternation", '"GET /api/v(1|2)/(items|search)', False),
    ("rare literal", '"PUT /api/v2/items', False),
    ("labelled alternation", '"GET /api/v1/(?P<kind>items|orders) ', True),
]


def generate(path: Path, lines: int) -> None:
    """An access log: requests spread over a few API paths, and one line in 500 with a referer
    that repeats the frequent request (a line holding a pattern twice must count once)."""
    rng = random.Random(42)
    paths = ["/api/v1/orders"] * 2 + ["/api/v1/orders/123"] * 2 + ["/api/v1/items"] * 2 + [
        "/api/v1/users", "/api/v2/items?page=3", "/api/v2/search?q=shoes",
        "/api/v1/search?q=hats", "/static/app.js", "/static/app.js", "/health"]  # fmt: skip
    methods = ["GET"] * 7 + ["POST"] * 2 + ["PUT"]
    codes = [200] * 85 + [404] * 8 + [301] * 3 + [500, 502, 503, 504]
    with open(path, "w") as f:
        for i in range(lines):
            ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            referer = '"GET /api/v1/orders HTTP/1.1"' if rng.random() < 0.002 else '"-"'
            f.write(
                f"{ip} - - [26/Nov/2026:10:{i // 60000 % 60:02d}:{i // 1000 % 60:02d} +0000] "
                f'"{rng.choice(methods)} {rng.choice(paths)} HTTP/1.1" {rng.choice(codes)} '
                f'{rng.randrange(100, 9000)} {referer} "curl/8.0"\n'
            )


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds (this process plus the children it waited for), result."""
    start, cpu = time.perf_counter(), _cpu()
    result = fn()
    return time.perf_counter() - start, _cpu() - cpu, result


def _cpu() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def grep(path: Path, pattern: str) -> int:
    plain = re.sub(r"\(\?P<\w+>", "(", pattern)
    out = subprocess.run(["grep", "-cE", plain, str(path)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def blocks(path: Path) -> list[bytes]:
    """The file in blocks of complete lines, as the collector hands them to the engine."""
    data = path.read_bytes()
    out, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + BLOCK) + 1 or len(data)
        out.append(data[start:end])
        start = end
    return out


def engine(chunks: list[bytes], matcher: LineMatcher) -> int:
    matcher.take_parts()
    return int(sum((matcher.scan(chunk) for chunk in chunks), Decimal(0)))


def collector(path: Path, pattern: str, labels: bool) -> tuple[int, dict]:
    options = {"path": str(path), "pattern": pattern, "mode": "count", "start_at": "beginning",
               "encoding": "utf-8", "max_line_bytes": 65536}  # fmt: skip
    reader = LogCollector(options, Sources())
    reader.count_labels(labels)
    reading = reader.read(None)
    return int(reading.value), dict(reading.breakdown or {})


def labels_by_python(path: Path, pattern: str) -> Counter:
    """The oracle for the labelled pattern: Python's `re` on each line (this pattern is safe)."""
    search = re.compile(pattern.encode()).search
    counts: Counter = Counter()
    with open(path, "rb") as f:
        for line in f:
            m = search(line.rstrip(b"\n"))
            if m:
                counts[tuple((k, v.decode()) for k, v in sorted(m.groupdict().items()))] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=3_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--log", type=Path, help="use this log instead of generating one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or Path(tmp) / "access.log"
        if args.log is None:
            generate(log, args.lines)
        chunks = blocks(log)  # (also warms the page cache)
        size = sum(map(len, chunks))
        lines = sum(c.count(b"\n") for c in chunks)
        print(
            f"{lines:,} lines, {size / 2**20:.0f} MiB, "
            f"{len(chunks)} blocks of {BLOCK >> 20} MiB, median of {args.runs} runs; "
            "ratio = grep time / time (>= 1: at least as fast as grep)"
        )
        print(
            f"{'pattern':<22} {'grep -cE':>8} {'engine':>7} {'ratio':>5} {'cpu':>5}"
            f" {'read()':>7} {'ratio':>5} {'cpu':>5} {'lines':>9}  engine"
        )
        for kind, pattern, labels in PATTERNS:
            matcher = LineMatcher(pattern)
            matcher.count_labels(labels)
            runs: dict[str, list[tuple[float, float]]] = {"grep": [], "engine": [], "read": []}
            counts: dict[str, object] = {}
            breakdown: dict = {}
            steps: list[tuple[str, Callable[[], object]]] = [
                ("grep", lambda p=pattern: grep(log, p)),  # type: ignore[misc]
                ("engine", lambda m=matcher: engine(chunks, m)),  # type: ignore[misc]
                ("read", lambda p=pattern, on=labels: collector(log, p, on)),  # type: ignore[misc]
            ]
            for _ in range(args.runs):
                for name, fn in steps:
                    wall, cpu, result = timed(fn)
                    if name == "read":
                        result, breakdown = result  # type: ignore[misc]
                    counts[name] = result
                    runs[name].append((wall, cpu))
            if len(set(counts.values())) != 1:
                raise SystemExit(f"counts differ for {pattern!r}: {counts}")
            if labels:
                want = labels_by_python(log, pattern)
                got = {k: int(v) for k, v in breakdown.items()}
                if got != dict(want):
                    raise SystemExit(f"label counts differ for {pattern!r}: {got} != {want}")
            g, e, r = (
                [statistics.median(x[i] for x in runs[k]) for i in (0, 1)]
                for k in ("grep", "engine", "read")
            )
            print(
                f"{kind:<22} {g[0]:>7.3f}s {e[0]:>6.3f}s {g[0] / e[0]:>5.2f} {g[1] / e[1]:>5.2f}"
                f" {r[0]:>6.3f}s {g[0] / r[0]:>5.2f} {g[1] / r[1]:>5.2f} {counts['grep']:>9,}"
                f"  {matcher.engine}"
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
    reader = LogCollector(options, Sources())
    state = reader.read(None).state
    used = []
    for k in range(rounds):
        with open(log, "ab") as f:
            f.write(b'%d "GET /api/x"\n' % k * 5)
        start = time.process_time()
        reading = reader.read(state)
        used.append(time.process_time() - start)
        state = reading.state
    print(
        f"one reading beside {copies} .gz copies: {statistics.median(used) * 1000:.2f} ms CPU "
        f"(median of {rounds}), saved state {len(json.dumps(state)):,} bytes"
    )


if __name__ == "__main__":
    main()
