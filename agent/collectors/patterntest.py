"""Testing a log dimension's pattern against the lines already in its files (`sample
--from-beginning`): how many lines match, a few that do and a few that do not, and, for a
labelled pattern, the label values that carry the most usage.

Why apart from the collector: the collector reads from saved offsets and keeps state; this reads
every live file from its beginning, keeps nothing and writes nothing, with the very matcher the
collector uses (`LineMatcher`, linear time), so what it counts is what `run` would count on
those lines. Reads are binary and in blocks; a line longer than `max_line_bytes` at a block's end
is judged by its first bytes, as the collector does; a last line without its newline is not
counted (the collector waits for it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from agent.aggregate import LabelSet
from agent.collectors.linecount import LineMatcher
from agent.collectors.logfiles import Files

BLOCK = 1 << 20
EXAMPLES = 3  # distinct lines shown of each kind
LOOK_AT = 100_000  # lines judged one by one for examples, at most (the count is the matcher's)
TOP = 5  # values shown per label


@dataclass
class PatternTest:
    """What one pattern did on the lines already in its files."""

    files: list[str] = field(default_factory=list)
    lines: int = 0  # complete lines read
    matching: int = 0  # lines that matched
    value: Decimal = Decimal(0)  # what they add: the count, or the sum of (?P<value>...)
    unfinished: int = 0  # files whose last line has no newline yet (not counted)
    unreadable: list[str] = field(default_factory=list)  # "path: why"
    matched_examples: list[bytes] = field(default_factory=list)
    other_examples: list[bytes] = field(default_factory=list)
    labels: tuple[str, ...] = ()
    parts: dict[LabelSet, Decimal] = field(default_factory=dict)  # usage per label set

    def top_values(self, top: int = TOP) -> dict[str, tuple[list[tuple[str, Decimal]], int]]:
        """Per label: its `top` values by usage (ties by value), and how many values it has."""
        by: dict[str, dict[str, Decimal]] = {name: defaultdict(Decimal) for name in self.labels}
        for labels, usage in self.parts.items():
            for name, value in labels:
                if name in by:
                    by[name][value] += usage
        return {
            name: (sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:top], len(values))
            for name, values in by.items()
        }


def try_pattern(options: Any, examples: int = EXAMPLES) -> PatternTest:
    """Run the log collector's options (`path`, `pattern`, `mode`, `encoding`, `rotated`,
    `max_line_bytes`) over every live file from its beginning."""
    counter = LineMatcher(options["pattern"], options["mode"], options["encoding"])
    counter.count_labels(True)
    one = LineMatcher(options["pattern"], "count", options["encoding"])  # a line at a time
    result = PatternTest(labels=counter.labels)
    result.files = Files(options["path"], options.get("rotated")).live_paths()
    reader = _Reader(counter, one, result, int(options["max_line_bytes"]), examples)
    for path in result.files:
        try:
            with open(path, "rb") as f:
                reader.read(f)
        except OSError as e:
            result.unreadable.append(f"{path}: {e.strerror or e}")
    for labels, usage in counter.take_parts().items():
        result.parts[labels] = result.parts.get(labels, Decimal(0)) + usage
    return result


class _Reader:
    def __init__(
        self, counter: LineMatcher, one: LineMatcher, result: PatternTest, max_line: int, n: int
    ) -> None:
        self.counter, self.one, self.result = counter, one, result
        self.max_line, self.n = max_line, n
        self.looked = 0  # lines judged one at a time so far (LOOK_AT)

    def read(self, f: Any) -> None:
        carry = b""
        skip = False  # inside a line longer than the cap, already judged
        while True:
            chunk = f.read(BLOCK)
            if not chunk:
                break
            if skip:
                nl = chunk.find(b"\n")
                if nl < 0:
                    continue
                chunk, skip = chunk[nl + 1 :], False
            buf = carry + chunk
            last = buf.rfind(b"\n") + 1
            if last:
                self._lines(buf[:last])
            carry = buf[last:]
            if len(carry) > self.max_line:  # judged by its first bytes; the rest is skipped
                self._lines(carry[: self.max_line] + b"\n")
                carry, skip = b"", True
        if carry and not skip:
            self.result.unfinished += 1

    def _lines(self, block: bytes) -> None:
        r = self.result
        n = block.count(b"\n")
        before = self.counter.matched_lines
        value = self.counter.scan(block)
        matching = int(value) if self.counter.mode == "count" else (
            self.counter.matched_lines - before
        )  # fmt: skip
        r.lines += n
        r.matching += matching
        r.value += value
        want_match = len(r.matched_examples) < self.n and matching > 0
        want_other = len(r.other_examples) < self.n and matching < n
        if not (want_match or want_other) or self.looked >= LOOK_AT:
            return  # (the count above is whole; only the examples stop being looked for)
        for line in block.split(b"\n")[:-1]:
            self.looked += 1
            if self.looked > LOOK_AT:
                return
            hit = bool(self.one.scan(line + b"\n"))
            kept = r.matched_examples if hit else r.other_examples
            if len(kept) < self.n and line not in kept:  # distinct lines say more
                kept.append(line)
            if len(r.matched_examples) >= self.n and len(r.other_examples) >= self.n:
                return
