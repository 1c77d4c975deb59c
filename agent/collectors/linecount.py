"""Counting matching lines in a buffer of complete lines, at close to grep's speed.

A per-line Python loop manages about a third of `grep -c` here. Instead the regex engine scans the
whole buffer in C: the pattern is wrapped as `(?:PATTERN)[^\\n]*\\n()` so each match also
consumes the rest of its line and its newline (one match per line, even for a pattern that matches
the empty string), and `findall`, whose only group is empty, just counts.

That shortcut is exact only when a match cannot run across a newline. Patterns that could
(`\\s`, `[^"]`, an explicit `\\n`, ...) take the exact path: each match is confined to its line and
re-checked there. `mode: sum` always takes a per-match path, since it needs each line's value,
and so does a pattern with named groups other than `value` (labels): each matching line's usage is
added to its label set in `parts`. A pattern without labels keeps the fast path.
"""

from __future__ import annotations

import re
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.aggregate import LabelSet, reading_problem
from agent.collectors.base import fold

if sys.version_info >= (3, 11):
    from re import _parser as sre_parse  # type: ignore[attr-defined]
else:  # pragma: no cover
    import sre_parse

NEWLINE = 10
MAX_PARTS = 10_000  # label sets kept apart per scan (base.MAX_LABEL_SETS); the rest go to ()
SPARSE_BYTES = 1024  # fewer required-literal hits than one per this many bytes: visit each
DENSE_SKIP = 7  # after a dense block, blocks that go straight to the regex engine
DENSE_AFTER = 64  # candidates seen before density is judged
GLOBAL_FLAGS = re.compile(rb"^(?:\(\?[aiLmsux]+\))+")


def may_match_newline(pattern: str) -> bool:
    """Conservatively: can some match of `pattern` contain a newline?"""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return True
    return _walk(parsed, dotall=bool(parsed.state.flags & re.DOTALL))


def needs_line_by_line(pattern: str) -> bool:
    """Whether the pattern can tell a line inside a buffer from the same line on its own.

    Lookarounds peek at neighbouring lines, and `\\A`/`\\Z` mean the start and end of the whole
    string: such patterns are matched one line at a time (slower, and rare in log patterns).
    """
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return True
    return _peeks(list(parsed.data))


def _peeks(items: list[tuple[Any, Any]]) -> bool:
    for op, arg in items:
        name = _name(op)
        if name in ("ASSERT", "ASSERT_NOT"):
            return True
        if name == "AT" and _name(arg) in ("AT_BEGINNING_STRING", "AT_END_STRING"):
            return True
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") and _peeks(list(arg[2])):
            return True
        if name == "SUBPATTERN" and _peeks(list(arg[-1])):
            return True
        if name == "BRANCH" and any(_peeks(list(b)) for b in arg[1]):
            return True
        if name == "ATOMIC_GROUP" and _peeks(list(arg)):
            return True
        if name == "GROUPREF_EXISTS":
            return True
    return False


def _walk(items: object, dotall: bool) -> bool:
    for op, arg in items:  # type: ignore[attr-defined]
        name = _name(op)
        if name == "LITERAL":
            if arg == NEWLINE:
                return True
        elif name == "NOT_LITERAL":
            if arg != NEWLINE:
                return True
        elif name == "ANY":
            if dotall:
                return True
        elif name == "IN":
            if _set_has_newline(arg):
                return True
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            if _walk(arg[2], dotall):
                return True
        elif name == "SUBPATTERN":
            if _walk(arg[-1], dotall):
                return True
        elif name == "BRANCH":
            if any(_walk(branch, dotall) for branch in arg[1]):
                return True
        elif name in ("ASSERT", "ASSERT_NOT"):
            # A lookaround consumes nothing, but one that can see a newline peeks past the line.
            if _walk(arg[1], dotall):
                return True
        elif name == "ATOMIC_GROUP":
            if _walk(arg, dotall):
                return True
        elif name in ("AT", "GROUPREF", "GROUPREF_EXISTS"):
            if name != "AT":
                return True  # a back-reference could repeat a newline; stay exact
        else:
            return True  # anything unforeseen: take the exact path
    return False


def required_literal(pattern: str) -> str | None:
    """The longest run of plain characters that every match must contain, if any.

    Only the top-level sequence is looked at (not inside groups, branches or repeats), and nothing
    is promised under IGNORECASE; None when there is no run of at least two characters.
    """
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    best: list[int] = []
    run: list[int] = []
    items: list[tuple[Any, Any]] = list(parsed.data)
    for op, arg in items:
        if _name(op) == "LITERAL":
            run.append(arg)
            continue
        if len(run) > len(best):
            best = run
        run = []
    if len(run) > len(best):
        best = run
    return "".join(map(chr, best)) if len(best) >= 2 else None


def _name(op: object) -> str:
    """sre opcodes are ints with a `name` (their str() is the number on Python 3.10)."""
    return str(getattr(op, "name", op))


NEWLINE_CATEGORIES = (
    "CATEGORY_SPACE",
    "CATEGORY_NOT_DIGIT",
    "CATEGORY_NOT_WORD",
    "CATEGORY_LINEBREAK",
)


def _set_has_newline(items: list[tuple[Any, Any]]) -> bool:
    """Whether a character set `[...]` (or its negation) admits a newline."""
    negate = any(_name(op) == "NEGATE" for op, _ in items)
    contains = False
    for op, arg in items:
        name = _name(op)
        if name == "LITERAL":
            contains |= arg == NEWLINE
        elif name == "RANGE":
            contains |= arg[0] <= NEWLINE <= arg[1]
        elif name == "CATEGORY":
            contains |= _name(arg) in NEWLINE_CATEGORIES
    return contains != negate


class LineMatcher:
    """Counts lines matching `pattern`, or sums its named group `value` over matching lines.

    With named groups other than `value` (its `labels`), each matching line's usage is also added
    to `parts` under the line's label set: a group that did not take part in the line gives that
    label no value. The caller empties `parts` (`take_parts`) between scans it keeps or drops.
    """

    def __init__(self, pattern: str, mode: str = "count", encoding: str = "utf-8") -> None:
        raw = pattern.encode(encoding)
        self.mode = mode
        self.encoding = encoding
        self.pattern = re.compile(raw, re.MULTILINE)
        self.labels = tuple(sorted(n for n in self.pattern.groupindex if n != "value"))
        self.parts: dict[LabelSet, Any] | None = {} if self.labels else None
        self.keep_label: str | None = None  # never folded beyond MAX_PARTS (base.fold)
        self._label_sets: dict[Any, LabelSet] = {}  # raw group values -> label set (a cache)
        self._exact = may_match_newline(pattern) or mode == "sum"
        self.exact = self._exact or bool(self.labels)
        # One match per line (see the module docstring); the empty group keeps findall cheap.
        # Leading global flags such as (?i) must stay in front of the wrapper.
        flags = GLOBAL_FLAGS.match(raw)
        lead, body = (flags.group(0), raw[flags.end() :]) if flags else (b"", raw)
        self._fast = re.compile(lead + b"(?:" + body + b")[^\n]*\n()", re.MULTILINE)
        literal = required_literal(pattern)
        self.line_by_line = needs_line_by_line(pattern)
        # Short literals gain nothing: bytes.count is slow on them when their first byte is common.
        usable = literal is not None and len(literal) >= 6 and not self.line_by_line
        self.literal = literal.encode(encoding) if usable and literal else None
        self._trust_regex = 0
        self.bad_values = 0
        self.matched_lines = 0  # in sum mode: how many lines matched (count mode: the value)

    def scan(self, buf: bytes | bytearray, start: int = 0, end: int | None = None) -> Decimal:
        """Count (or sum over) the matching lines in buf[start:end], which holds complete lines."""
        end = len(buf) if end is None else end
        if self.line_by_line:
            return self._scan_line_by_line(buf, start, end)
        total = Decimal(0)
        if self.literal is not None and self._trust_regex == 0:
            # A long literal is found at memchr speed: visit only the lines that hold it. When
            # they turn out dense, the regex engine takes the rest of the buffer, and the next few
            # blocks go straight to it (a busy log stays busy).
            total, start = self._scan_candidates(buf, start, end)
            if start >= end:
                return total
            self._trust_regex = DENSE_SKIP
        elif self._trust_regex:
            self._trust_regex -= 1
        if not self.exact:
            return total + len(self._fast.findall(buf, start, end))
        return total + self._scan_exact(buf, start, end)

    def _scan_candidates(self, buf: bytes | bytearray, start: int, end: int) -> tuple[Decimal, int]:
        """Judge only the lines holding the required literal. Returns (value, where it stopped):
        `end`, or the start of a line once candidates come denser than one per SPARSE_BYTES."""
        assert self.literal is not None
        total = Decimal(0)
        find, rfind, search = buf.find, buf.rfind, self.pattern.search
        pos, seen = start, 0
        while True:
            i = find(self.literal, pos, end)
            if i < 0:
                return total, end
            line_start = max(rfind(b"\n", start, i) + 1, start)  # rfind gives -1: not 0
            line_end = find(b"\n", i, end)
            if line_end < 0:
                line_end = end
            m = search(buf, line_start, line_end)
            if m is not None:
                total += self._usage(m)
            pos = line_end + 1
            seen += 1
            if seen >= DENSE_AFTER and seen * SPARSE_BYTES > pos - start:
                return total, pos

    def _scan_line_by_line(self, buf: bytes | bytearray, start: int, end: int) -> Decimal:
        """Each line as its own string: exact for any pattern, at per-line Python speed."""
        total = Decimal(0)
        search, find = self.pattern.search, buf.find
        pos = start
        while pos < end:
            line_end = find(b"\n", pos, end)
            if line_end < 0:
                line_end = end
            m = search(bytes(buf[pos:line_end]))
            if m is not None:
                total += self._usage(m)
            pos = line_end + 1
        return total

    def _usage(self, m: re.Match[bytes]) -> Any:
        """A matching line's usage (1, or its value in sum mode), also added to its label set
        while labels are counted."""
        if self.parts is not None:
            return self._take(m)
        return self._value(m) if self.mode == "sum" else 1

    def match_line(self, line: bytes) -> Decimal:
        """The value one line adds (0 or 1 in count mode): used for capped very long lines."""
        return self._scan_line_by_line(line, 0, len(line))

    def _scan_exact(self, buf: bytes | bytearray, start: int, end: int) -> Decimal:
        total = Decimal(0)
        pos = start
        search = self.pattern.search
        while pos < end:
            m = search(buf, pos, end)
            if m is None or m.start() >= end:
                break  # (an empty match at `end` is the start of a line that is not ours)
            # No newline between `start` and the match: the line starts at `start`, not at 0.
            line_start = max(buf.rfind(b"\n", start, m.start()) + 1, start)
            line_end = buf.find(b"\n", m.start(), end)
            if line_end < 0:
                line_end = end
            if m.end() > line_end:  # it ran past its line: judge the line on its own
                m = search(buf, line_start, line_end)
            if m is not None:
                total += self._usage(m)
            pos = line_end + 1
        return total

    def _take(self, m: re.Match[bytes]) -> Decimal | int:
        """The line's usage, also added to its label set in `parts`."""
        assert self.parts is not None
        value: Decimal | int = self._value(m) if self.mode == "sum" else 1
        raw = m.group(*self.labels)
        key = self._label_sets.get(raw)
        if key is None:
            values: tuple[Any, ...] = (raw,) if len(self.labels) == 1 else raw
            key = tuple(
                (name, v.decode(self.encoding, errors="replace"))
                for name, v in zip(self.labels, values, strict=True)
                if v is not None
            )
            if len(self._label_sets) < MAX_PARTS:
                self._label_sets[raw] = key
        parts = self.parts
        if key in parts:
            parts[key] += value
        elif len(parts) < MAX_PARTS:
            parts[key] = value
        else:
            key = fold(key, self.keep_label)
            parts[key] = parts.get(key, 0) + value
        return value

    def count_labels(self, on: bool) -> None:
        """Off: the labels are not counted (no allocations bill them), and a pattern whose only
        slow part is its named groups keeps the fast path."""
        self.parts = {} if on and self.labels else None
        self.exact = self._exact or self.parts is not None

    def take_parts(self) -> dict[LabelSet, Decimal]:
        """The usage per label set since the last call (nothing without labels), then empty."""
        parts, self.parts = self.parts or {}, None if self.parts is None else {}
        return {k: Decimal(v) for k, v in parts.items() if v}

    def _value(self, m: re.Match[bytes]) -> Decimal:
        """The line's number; a value that is not a finite decimal (nan, inf, 1e61, 61 digits)
        adds 0 and is counted in `bad_values`, so one odd line never stops the dimension."""
        self.matched_lines += 1
        raw = m.group("value")
        try:
            value = (
                Decimal(raw.decode(self.encoding, errors="replace").strip()) if raw else Decimal(0)
            )
        except InvalidOperation:
            self.bad_values += 1
            return Decimal(0)
        if reading_problem(value) is not None:
            self.bad_values += 1
            return Decimal(0)
        return value
