"""Counting matching lines in a buffer of complete lines, in time linear in its bytes.

The pattern is translated (`linepattern`) into an expression that matches a whole matching line
and its newline, and hyperscan scans the buffer for it: one report per matching line, at the end
of its newline. Hyperscan is an automaton (no backtracking, whatever the lines hold) and releases
the GIL while it scans; its Python binding calls back per report with the GIL taken again, so the
callbacks do as little as they can.

Groups (labels, `value`) are read on each matching line alone with google-re2 (also linear, and
leftmost-first like Python, so it captures what `re` would), imported only when a pattern needs
it. A label that is one of a few fixed strings (`(?P<kind>items|orders)`) needs no re2: the
pattern is compiled once per combination of label values, and a line that exactly one of them
matches has that one's values; a line that several match is read with re2. What hyperscan
refuses (too large) runs on re2 alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.aggregate import LabelSet, reading_problem
from agent.collectors.base import fold
from agent.collectors.linepattern import (
    MAX_EXPRESSION,
    NEWLINE,
    Anchor,
    Chars,
    Node,
    Parsed,
    alt,
    capture_expression,
    empty_line,
    label_expansion,
    line_expression,
    line_form,
    parse,
    re2_fits,
    seq,
    write,
)

MAX_PARTS = 10_000  # label sets kept apart per scan (base.MAX_LABEL_SETS); the rest go to ()
EMPTY_LINE = "^\\x0a"  # reported once per empty line, whose verdict is Python's (linepattern)
RE2_MAX_MEM = 64 << 20  # re2's budget for one compiled pattern (its default, 8 MiB, is tight)

__all__ = ["LineMatcher", "check_pattern"]


def check_pattern(pattern: str, encoding: str = "utf-8") -> None:
    """ValueError, one line naming the feature and the fix, unless the pattern runs in linear
    time on one of the engines; `LogCollector.validate` makes it a ConfigError for the key."""
    parsed = parse(pattern, encoding)
    expression = line_expression(parsed.tree)
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(
            f"translates to a {len(expression):,}-byte expression (at most {MAX_EXPRESSION:,}):"
            " shorten it, or use smaller counted repeats"
        )
    on_hyperscan = not expression or _Hyperscan.accepts([expression])
    if (parsed.names or not on_hyperscan) and not re2_fits(parsed.tree):
        raise ValueError(
            "uses counted repeats above 1000 (nested ones multiplied), which re2 refuses; re2"
            + (" reads the named groups" if parsed.names else " runs what hyperscan cannot")
            + ": use smaller counts"
        )
    if not on_hyperscan:
        _Re2Lines(parsed)  # compiles, or says why not


class _Tally:
    """What the scan callbacks write into (slots: the callbacks' cost is the engine's cost)."""

    __slots__ = ("by_id", "ends", "last", "n", "shared")

    def __init__(self, ids: int = 0) -> None:
        self.n = 0
        self.by_id = [0] * ids
        self.last = -1
        self.shared: list[int] = []
        self.ends: list[int] = []


def _on_line(_id: int, _from: int, _to: int, _flags: int, tally: _Tally) -> None:
    tally.n += 1


def _on_line_by_id(id_: int, _from: int, _to: int, _flags: int, tally: _Tally) -> None:
    tally.by_id[id_] += 1


def _on_labelled_line(id_: int, _from: int, to: int, _flags: int, tally: _Tally) -> None:
    tally.by_id[id_] += 1
    if to <= tally.last:  # reported again (by another id), or out of order: the line is re-read
        tally.shared.append(to)
    else:
        tally.last = to  # the furthest report so far


def _on_line_end(_id: int, _from: int, to: int, _flags: int, tally: _Tally) -> None:
    tally.ends.append(to)


class _Hyperscan:
    """A hyperscan database of line expressions, ids in list order."""

    def __init__(self, expressions: Sequence[str]) -> None:
        import hyperscan

        self.db = hyperscan.loadb(_compiled(tuple(expressions)), hyperscan.HS_MODE_BLOCK)
        self.scratch = hyperscan.Scratch(self.db)  # (a loaded database comes without one)

    @staticmethod
    def accepts(expressions: Sequence[str]) -> bool:
        try:
            _compiled(tuple(expressions))
        except ValueError:
            return False
        return True

    def scan(self, data: Any, callback: Callable[..., None], tally: _Tally) -> None:
        self.db.scan(data, match_event_handler=callback, context=tally, scratch=self.scratch)

    def ids(self, line: bytes) -> set[int]:
        """The ids that match one line (given without its newline)."""
        tally = _Tally()
        self.scan(line + b"\n", _on_line_end_id, tally)
        return set(tally.ends)


_COMPILE = """
import hyperscan, json, sys
expressions = [e.encode("ascii") for e in json.load(sys.stdin)]
db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
try:
    db.compile(expressions=expressions, ids=list(range(len(expressions))),
               elements=len(expressions), flags=[hyperscan.HS_FLAG_MULTILINE] * len(expressions))
except hyperscan.error as e:
    sys.stderr.write(str(e))
    sys.exit(3)
sys.stdout.buffer.write(hyperscan.dumpb(db))
"""


class _InProcess:
    """Compile here: what commands and tests use."""

    def compile(self, expressions: tuple[str, ...]) -> bytes:
        import hyperscan

        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        try:
            db.compile(
                expressions=[e.encode("ascii") for e in expressions],
                ids=list(range(len(expressions))),
                elements=len(expressions),
                flags=[hyperscan.HS_FLAG_MULTILINE] * len(expressions),
            )
        except hyperscan.error as e:
            raise ValueError(str(e)) from None
        return bytes(hyperscan.dumpb(db))


class _InChild:
    """Compile in a short-lived child and load the result: hyperscan's compiler takes about
    4 MiB that a long-lived process would keep for good (glibc holds on to what it frees); the
    compiled database is a few KiB. The daemon compiles this way."""

    def compile(self, expressions: tuple[str, ...]) -> bytes:
        done = subprocess.run(
            [sys.executable, "-c", _COMPILE],
            input=json.dumps(list(expressions)).encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 3:
            raise ValueError(done.stderr.decode(errors="replace").strip())
        if done.returncode != 0:
            raise RuntimeError(
                "compiling a log pattern failed: "
                + (done.stderr.decode(errors="replace").strip().splitlines() or ["no answer"])[-1]
            )
        return done.stdout


_compiler: _InProcess | _InChild = _InProcess()
_cache: dict[tuple[str, ...], bytes | ValueError] = {}


def compile_in_child() -> None:
    """Compile hyperscan databases in a short-lived child from now on (the daemon: see
    `_InChild`)."""
    global _compiler
    _compiler = _InChild()


def _compiled(expressions: tuple[str, ...]) -> bytes:
    """The serialized database of these expressions, compiled once per process (config
    validation and each collector ask for the same); ValueError if hyperscan refuses them."""
    found = _cache.get(expressions)
    if found is None:
        try:
            found = _compiler.compile(expressions)
        except ValueError as e:
            found = e
        if len(_cache) >= 64:
            _cache.clear()
        _cache[expressions] = found
    if isinstance(found, ValueError):
        raise found
    return found


def _on_line_end_id(id_: int, _from: int, _to: int, _flags: int, tally: _Tally) -> None:
    tally.ends.append(id_)


def _re2() -> Any:
    """google-re2, imported on first need: about 1.5 MiB of RSS that most patterns never use."""
    import re2

    return re2


def _re2_compile(expression: str) -> Any:
    re2 = _re2()
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1  # bytes are bytes, not UTF-8
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(expression.encode("ascii"), options)
    except re2.error as e:
        raise ValueError(f"is too large for the linear-time engines (re2: {e})") from None


class _Re2Groups:
    """The named groups of one line, read with re2 (leftmost-first, as Python)."""

    def __init__(self, tree: Node) -> None:
        expression, self.names = capture_expression(tree)
        regex = _re2_compile(expression)
        # The binding's own matcher: spans for every group at once, half the cost of search().
        self._match = regex._regexp.Match
        self._anchor = _re2()._Anchor.UNANCHORED

    def read(self, line: bytes) -> dict[str, bytes | None] | None:
        spans = self._match(self._anchor, line, 0, len(line))
        if spans[0][0] < 0:
            return None
        return {
            name: line[s:e] if s >= 0 else None
            for name, (s, e) in zip(self.names, spans[1:], strict=True)
        }


class _Re2Lines:
    """re2 alone (what hyperscan refuses): the same line expression, one search per matching
    line, and empty lines found too, for Python's verdict."""

    def __init__(self, parsed: Parsed) -> None:
        form = alt(line_form(parsed.tree), seq(Anchor("bol"), Chars(frozenset({NEWLINE}))))
        regex = _re2_compile("(?m)" + write(form))
        self._match = regex._regexp.Match
        self._anchor = _re2()._Anchor.UNANCHORED

    def ends(self, view: memoryview) -> list[int]:
        """End offsets (after the newline) of the lines that match or are empty."""
        out, pos, end = [], 0, len(view)
        while pos < end:
            (s, e), *_ = self._match(self._anchor, view, pos, end)
            if s < 0:
                break
            out.append(e)
            pos = e
        return out


class LineMatcher:
    """Counts lines matching `pattern`, or sums its named group `value` over matching lines.

    With named groups other than `value` (its `labels`), each matching line's usage is also added
    to `parts` under the line's label set: a group that did not take part in the line gives that
    label no value. The caller empties `parts` (`take_parts`) between scans it keeps or drops.
    A pattern that needs backtracking is a ValueError (`check_pattern`).
    """

    def __init__(self, pattern: str, mode: str = "count", encoding: str = "utf-8") -> None:
        self.mode = mode
        self.encoding = encoding
        self._parsed = parse(pattern, encoding)
        self.labels = tuple(sorted(n for n in self._parsed.names if n != "value"))
        self.parts: dict[LabelSet, Any] | None = {} if self.labels else None
        self.keep_label: str | None = None  # never folded beyond MAX_PARTS (base.fold)
        self._label_sets: dict[tuple[bytes | None, ...], LabelSet] = {}  # a cache
        self.bad_values = 0
        self.matched_lines = 0  # in sum mode: how many lines matched (count mode: the value)
        self._empty = empty_line(self._parsed.raw)  # Python's verdict on an empty line
        self._scan: Callable[[Any, int, int], Decimal] | None = None
        self._engine = ""
        self._hs: _Hyperscan | None = None
        self._groups: _Re2Groups | None = None
        self._re2_lines: _Re2Lines | None = None
        self._combos: list[tuple[bytes | None, ...]] = []  # per expression id: label values
        self._main_ids = 0  # expressions before the empty-line one
        self._with_empty = False  # the empty-line expression is compiled after them
        self._empty_ids: set[int] = set()  # the ids that match an empty line

    # -- the public surface (log.py) -------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """Whether each matching line is looked at on its own (its labels or value are read)."""
        return self.parts is not None or self.mode == "sum"

    @property
    def engine(self) -> str:
        """Which engine runs this pattern, and how (for `check`)."""
        self._choose()
        return self._engine

    def count_labels(self, on: bool) -> None:
        """Off: the labels are not counted (no allocations bill them), and a pattern whose only
        slow part is its named groups keeps the plain count."""
        parts: dict[LabelSet, Any] | None = {} if on and self.labels else None
        if (parts is None) != (self.parts is None):
            self._scan = None  # chosen again at the next scan
        self.parts = parts

    def take_parts(self) -> dict[LabelSet, Decimal]:
        """The usage per label set since the last call (nothing without labels), then empty."""
        parts, self.parts = self.parts or {}, None if self.parts is None else {}
        return {k: Decimal(v) for k, v in parts.items() if v}

    def scan(self, buf: bytes | bytearray, start: int = 0, end: int | None = None) -> Decimal:
        """Count (or sum over) the matching lines in buf[start:end], which holds complete lines."""
        end = len(buf) if end is None else end
        if end <= start:
            return Decimal(0)
        scan = self._scan or self._choose()
        return scan(buf, start, end)

    def match_line(self, line: bytes) -> Decimal:
        """The value one line adds (0 or 1 in count mode): used for capped very long lines."""
        return self.scan(bytes(line) + b"\n")

    # -- choosing the engine -------------------------------------------------------------------

    def _choose(self) -> Callable[[Any, int, int], Decimal]:
        if self._scan is not None:
            return self._scan
        tree = self._parsed.tree
        expression = line_expression(tree)
        grouped = self.exact
        if not expression and self._empty is None:
            self._engine, self._scan = "none (no line can match)", self._scan_nothing
            return self._scan
        if grouped and self.mode == "count" and self._choose_expanded():
            return self._scan  # type: ignore[return-value]
        main = [expression] if expression else []
        try:
            self._hs_with_empty(main, per_id=grouped)
        except ValueError:
            self._re2_lines = self._re2_lines or _Re2Lines(self._parsed)
            if grouped:
                self._groups = self._groups or _Re2Groups(tree)
            self._engine, self._scan = "re2", self._scan_re2
            return self._scan
        if grouped:
            self._groups = self._groups or _Re2Groups(tree)
            what = " and ".join(
                w for w, on in (("labels", self.parts is not None), ("values", self.mode == "sum"))
                if on
            )  # fmt: skip
            self._engine, self._scan = f"hyperscan + re2 for {what}", self._scan_then_read
        elif self._with_empty:
            self._engine, self._scan = "hyperscan", self._scan_count_by_id
        else:
            self._engine, self._scan = "hyperscan", self._scan_count
        return self._scan

    def _hs_with_empty(self, main: list[str], per_id: bool) -> None:
        """Compile `main` with hyperscan, and the empty-line expression after them when empty
        lines need Python's verdict: always where lines are read per id (labels), else when
        the engine's verdict on an empty line differs from Python's."""
        hs = _Hyperscan(main) if main else None  # ValueError: hyperscan refuses them
        on_empty = hs.ids(b"") if hs is not None else set()
        self._empty_ids = on_empty
        self._with_empty = (
            bool(on_empty) or self._empty is not None
            if per_id
            else bool(on_empty) != (self._empty is not None)
        )
        if self._with_empty:
            hs = _Hyperscan([*main, EMPTY_LINE])
        assert hs is not None
        self._hs = hs
        self._main_ids = len(main)

    def _choose_expanded(self) -> bool:
        expansion = label_expansion(self._parsed.tree, self.labels)
        if expansion is None:
            return False
        expressions = []
        self._combos = []
        for values, tree in expansion:
            expression = line_expression(tree)
            if expression:
                expressions.append(expression)
                self._combos.append(tuple(values[n] for n in self.labels))
        if not expressions:
            return False
        try:
            self._hs_with_empty(expressions, per_id=True)
        except ValueError:
            return False
        self._engine = f"hyperscan, labels as {len(expressions)} expressions"
        self._scan = self._scan_expanded
        return True

    # -- the scans -------------------------------------------------------------------------------

    def _scan_nothing(self, buf: Any, start: int, end: int) -> Decimal:
        return Decimal(0)

    def _scan_count(self, buf: Any, start: int, end: int) -> Decimal:
        assert self._hs is not None
        tally = _Tally()
        with memoryview(buf) as view:
            self._hs.scan(view[start:end], _on_line, tally)
        return Decimal(tally.n)

    def _scan_count_by_id(self, buf: Any, start: int, end: int) -> Decimal:
        """Counting where the engine and Python disagree on an empty line (`\\B`, before 3.14):
        the engine's count, corrected by the number of empty lines."""
        assert self._hs is not None
        tally = _Tally(self._main_ids + 1)
        with memoryview(buf) as view:
            self._hs.scan(view[start:end], _on_line_by_id, tally)
        empties = tally.by_id[-1]
        n = sum(tally.by_id[: self._main_ids]) - (empties if self._empty_ids else 0)
        return Decimal(n + (empties if self._empty is not None else 0))

    def _scan_expanded(self, buf: Any, start: int, end: int) -> Decimal:
        """Labels by expression: each id's count goes to its label values, except on the lines
        that several ids reported (and empty lines), which are read on their own."""
        assert self._hs is not None
        tally = _Tally(self._main_ids + self._with_empty)
        with memoryview(buf) as view:
            self._hs.scan(view[start:end], _on_labelled_line, tally)
        total = Decimal(0)
        by_id = tally.by_id
        for to in sorted(set(tally.shared)):
            line = self._line(buf, start, to)
            for i in self._hs.ids(line):
                by_id[i] -= 1
            total += self._read_line(line)
        for i, n in enumerate(by_id[: self._main_ids]):
            if n:
                total += n
                self._add_part(self._combos[i], n)
        if self._with_empty and by_id[-1] and self._empty is not None:
            for _ in range(by_id[-1]):
                total += self._use_groups(self._empty)
        return total

    def _scan_then_read(self, buf: Any, start: int, end: int) -> Decimal:
        """Hyperscan finds the matching lines; re2 reads each one's groups."""
        assert self._hs is not None
        tally = _Tally()
        with memoryview(buf) as view:
            self._hs.scan(view[start:end], _on_line_end, tally)
        total = Decimal(0)
        for to in sorted(set(tally.ends)):  # (an empty line is reported twice: see _hs_with_empty)
            total += self._read_line(self._line(buf, start, to))
        return total

    def _scan_re2(self, buf: Any, start: int, end: int) -> Decimal:
        assert self._re2_lines is not None
        total = Decimal(0)
        with memoryview(buf) as view:
            ends = self._re2_lines.ends(view[start:end])
        for to in ends:
            line = self._line(buf, start, to)
            if self.exact:
                total += self._read_line(line)
            elif line or self._empty is not None:
                total += 1
        return total

    # -- one line --------------------------------------------------------------------------------

    @staticmethod
    def _line(buf: Any, start: int, to: int) -> bytes:
        """The line whose newline ends at `to` (relative to `start`), without its newline."""
        end = start + to - 1
        return bytes(buf[max(buf.rfind(b"\n", start, end) + 1, start) : end])

    def _read_line(self, line: bytes) -> Decimal | int:
        """A line an engine reported: its usage from its own groups (Python's verdict when it is
        empty)."""
        if not line:
            return 0 if self._empty is None else self._use_groups(self._empty)
        if self._groups is None:
            self._groups = _Re2Groups(self._parsed.tree)
        groups = self._groups.read(line)
        if groups is None:  # the engines disagree: count the line as hyperscan found it
            groups = {}
        return self._use_groups(groups)

    def _use_groups(self, groups: Mapping[str, bytes | None]) -> Decimal | int:
        value: Decimal | int = self._value(groups.get("value")) if self.mode == "sum" else 1
        if self.parts is not None:
            self._add_part(tuple(groups.get(n) for n in self.labels), value)
        return value

    def _add_part(self, raw: tuple[bytes | None, ...], value: Decimal | int) -> None:
        """Add usage to its label set in `parts`; beyond MAX_PARTS label sets, a new one's usage
        goes to its folded set."""
        parts = self.parts
        if parts is None:
            return
        key = self._label_sets.get(raw)
        if key is None:
            key = tuple(
                (name, v.decode(self.encoding, errors="replace"))
                for name, v in zip(self.labels, raw, strict=True)
                if v is not None
            )
            if len(self._label_sets) < MAX_PARTS:
                self._label_sets[raw] = key
        if key in parts:
            parts[key] += value
        elif len(parts) < MAX_PARTS:
            parts[key] = value
        else:
            key = fold(key, self.keep_label)
            parts[key] = parts.get(key, 0) + value

    def _value(self, raw: bytes | None) -> Decimal:
        """The line's number; a value that is not a finite decimal (nan, inf, 1e61, 61 digits)
        adds 0 and is counted in `bad_values`, so one odd line never stops the dimension."""
        self.matched_lines += 1
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
