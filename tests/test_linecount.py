"""Every engine path agrees with Python's `re` judging one line at a time: counts, sums, labels.

The oracle is `re.compile(pattern.encode()).search(line)` on each line without its newline,
exactly the meaning a log pattern keeps; the lines hold what logs hold when they go wrong: `\\r`,
NUL, invalid UTF-8, empty lines, the pattern several times over.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest

from agent.collectors import linecount
from agent.collectors.linecount import LineMatcher
from agent.collectors.linepattern import Chars, parse

WORDS = [
    b"GET",
    b"POST",
    b"/api/v1/orders",
    b"/static",
    b'"',
    b" ",
    b"500",
    b"200",
    b"x",
    b"\t",
    b"\xff",
    b"job done rows=7",
    b"\r",
    b"\x00",
    b"\xc3\xa9",  # é in UTF-8
    b"\xc3",  # half of it: invalid UTF-8
    b"get",
    b"-",
]


def random_lines(seed: int, n: int, rare: bool) -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 12))]
        if rare and rng.random() > 0.01:
            words = [w for w in words if w != b"/api/v1/orders"]
        lines.append(b"".join(words))
    return b"\n".join(lines) + b"\n"


def oracle(
    pattern: str, data: bytes, mode: str = "count", labels: tuple[str, ...] = ()
) -> tuple[Decimal, dict[Any, Decimal]]:
    """Python's verdict line by line: the total, and the usage per label set."""
    compiled = re.compile(pattern.encode())
    total, parts = Decimal(0), {}
    for line in data.split(b"\n")[:-1]:
        m = compiled.search(line)
        if not m:
            continue
        value = _value(m.group("value")) if mode == "sum" else Decimal(1)
        total += value
        if labels:
            key = tuple(
                (n, m.group(n).decode("utf-8", "replace")) for n in labels if m.group(n) is not None
            )
            parts[key] = parts.get(key, Decimal(0)) + value
    return total, {k: v for k, v in parts.items() if v}


def _value(raw: bytes | None) -> Decimal:
    try:
        value = Decimal(raw.decode("utf-8", "replace").strip()) if raw else Decimal(0)
    except InvalidOperation:
        return Decimal(0)
    return value if value.is_finite() and abs(value) < Decimal("1e12") else Decimal(0)


def count(pattern: str, data: bytes) -> Decimal:
    return oracle(pattern, data)[0]


@pytest.mark.parametrize(
    "pattern",
    [
        '"GET /api/v1/orders',
        "GET/api/v1/orders",
        "/api/v1/orders",
        '" ?5[0-9][0-9]',
        "(GET|POST)/api",
        r"x\s+x",
        '[^"]*500',
        "^GET",
        "200$",
        "(?i)get",
        "x*",
        r"\AGET",
        r"200\Z",
        r"\bGET\b",
        r"\Bet\b",
        r"\r$",
        "\x00",
        r"[\x80-\xff]{2}",
        ".\r",
        "^$",
        "$",
        r"\B",
        r"^\b",
        "(?:^|-)get",
        "x(?:$|-)",
        "(?i)Ge[T]",
        "(?i:post)|[^ -~]",
        r"\s*$",
    ],
)
@pytest.mark.parametrize("rare", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_scan_agrees_with_the_oracle(pattern: str, rare: bool, seed: int) -> None:
    data = random_lines(seed, 20_000, rare)
    matcher = LineMatcher(pattern)
    got = sum((matcher.scan(chunk) for chunk in _chunks(data, 64 << 10)), Decimal(0))
    assert got == count(pattern, data)


def test_sum_agrees_with_the_oracle() -> None:
    data = random_lines(3, 20_000, rare=False)
    pattern = r"job done rows=(?P<value>\d+)"
    assert LineMatcher(pattern, "sum").scan(data) == oracle(pattern, data, "sum")[0]


def _chunks(data: bytes, size: int) -> list[bytes]:
    out, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1 or len(data)
        if end <= start:
            end = data.find(b"\n", start) + 1
        out.append(data[start:end])
        start = end
    return out


PIECES = [
    "GET",
    "POST",
    "/api",
    '"',
    " ",
    "x",
    "500",
    r"\s",
    r"\s+",
    r"\S+",
    '[^"]*',
    "[0-9]+",
    ".",
    ".*",
    "x*",
    "^",
    "$",
    "(GET|POST)",
    r"\n",
    "(?:x|\\s)",
    "[a-z]?",
    r"\b",
    r"\B",
]


def random_pattern(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4)))


def test_random_patterns_agree_with_the_oracle_from_any_start() -> None:
    """Random patterns, scanned from a `start` that has other lines before it in the buffer (as
    after a skipped long line): what lies before `start` never counts, and `^` and `\\b` see
    `start` as a line's start."""
    rng = random.Random(20261127)
    before = random_lines(7, 30, rare=False)
    for _ in range(3000):
        pattern = random_pattern(rng)
        data = random_lines(rng.randrange(1 << 30), 12, rare=False)
        buf = bytearray(before + data)
        matcher = LineMatcher(pattern)
        got = matcher.scan(buf, len(before), len(buf))
        assert got == count(pattern, data), pattern


# -- random patterns with groups: labels and values ----------------------------------------------

ATOMS = ["GET", "POST", "a", "b", "x", "/api", '"', " ", "5", "0", r"\d", r"\w", r"\s", r"\S",
         r"\W", r"\D", ".", "[a-c]", "[^a]", '[^"]', "[0-9]", r"[\s,]", "\\.", "\r", "\\x00",
         "\\xff", "é", "[é]", "^", "$", r"\b", r"\B", r"\A", r"\Z"]  # fmt: skip
ASSERTIONS = {"^", "$", r"\b", r"\B", r"\A", r"\Z"}
QUANTIFIERS = ["", "", "", "*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}"]
GROUP_QUANTIFIERS = ["", "", "?", "??", "{2}", "{1,2}", "{0,2}?"]  # bounded: the oracle backtracks
LINE_WORDS = [b"GET", b"POST", b"get", b"a", b"b", b"x", b"/api", b'"', b" ", b"5", b"0", b"500",
              b"\t", b"\r", b"\x00", b"\xff", b"\xc3\xa9", b"\xc3", b",", b".", b"ab", b"-", b"_",
              b"A", b"B", b"X", b"aa", b"12.5"]  # fmt: skip


def grouped_pattern(
    rng: random.Random, names: list[str], info: dict[str, bool], depth: int = 0
) -> str:
    """A random pattern with named groups. info["nested"]: a repeat applies to a group (Python's
    own engine can then take a long time, so the oracle is given short lines)."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.3 and depth < 3:
            if r < 0.2:
                inner = grouped_pattern(rng, names, info, depth + 1)
                name = rng.choice(["k", "t", "value", "u"])
                if rng.random() < 0.4 and name not in names and len(names) < 3:
                    names.append(name)
                    atom = f"(?P<{name}>{inner})"
                else:
                    atom = rng.choice(["(?i:{})", "(?-i:{})", "(?:{})", "({})"]).format(inner)
            else:
                branches = [grouped_pattern(rng, names, info, depth + 1) for _ in range(2)]
                atom = "(?:" + "|".join(branches) + ")"
            quantifier = rng.choice(GROUP_QUANTIFIERS)
            info["nested"] = info.get("nested", False) or bool(quantifier)
        else:
            atom = rng.choice(ATOMS)
            quantifier = "" if atom in ASSERTIONS else rng.choice(QUANTIFIERS)
        parts.append(atom + quantifier)
    pattern = "".join(parts)
    if depth == 0 and rng.random() < 0.15:
        pattern = "(?i)" + pattern
    return pattern


def grouped_lines(rng: random.Random, short: bool) -> bytes:
    lines = [
        b"".join(rng.choice(LINE_WORDS) for _ in range(rng.randint(0, 3 if short else 8)))
        if rng.random() > 0.08
        else b""
        for _ in range(30)
    ]
    return b"".join(line + b"\n" for line in lines)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_patterns_with_groups_agree_with_python(seed: int) -> None:
    """Counts, sums and every label set equal Python's, whichever path the pattern takes
    (hyperscan alone, labels as expressions, hyperscan + re2, and re2 alone)."""
    rng = random.Random(seed)
    checked = refused = 0
    while checked < 400:
        names: list[str] = []
        info: dict[str, bool] = {}
        pattern = grouped_pattern(rng, names, info)
        try:
            re.compile(pattern.encode())
            matcher = LineMatcher(
                pattern, "sum" if "value" in names and rng.random() < 0.5 else "count"
            )
        except (re.error, ValueError):
            refused += 1  # a group under a repeat that can match nothing (test_matching)
            continue
        data = grouped_lines(rng, short=info.get("nested", False))
        got = matcher.scan(data)
        assert (got, matcher.take_parts()) == oracle(pattern, data, matcher.mode, matcher.labels), (
            pattern,
            matcher.engine,
        )
        checked += 1
    assert refused < checked


def test_random_patterns_on_re2_alone_agree_with_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for what hyperscan refuses, forced for every pattern."""

    def refuse(self: Any, expressions: Any) -> None:
        raise ValueError("refused for the test")  # what _Hyperscan says of what hyperscan refuses

    monkeypatch.setattr(linecount._Hyperscan, "__init__", refuse)
    rng = random.Random(4)
    checked = 0
    while checked < 300:
        names: list[str] = []
        info: dict[str, bool] = {}
        pattern = grouped_pattern(rng, names, info)
        try:
            matcher = LineMatcher(pattern, "sum" if "value" in names else "count")
        except (re.error, ValueError):
            continue
        data = grouped_lines(rng, short=info.get("nested", False))
        got = matcher.scan(data)
        assert matcher.engine == "re2" or matcher.engine.startswith("none")
        assert (got, matcher.take_parts()) == oracle(pattern, data, matcher.mode, matcher.labels), (
            pattern
        )
        checked += 1


# -- one report per line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ['"GET /api/v1/orders', "a", "x*", r"\b", "(?i)get", "GET|orders", r"\d+", "$|GET"],
)
def test_a_line_holding_the_pattern_several_times_counts_once(pattern: str) -> None:
    line = b'"GET /api/v1/orders "GET /api/v1/orders a1 get 22 "GET /api/v1/orders/a'
    data = (line + b"\n" + b"other 0\n") * 1000
    got = LineMatcher(pattern).scan(data)
    assert (
        got == count(pattern, data) == (2000 if pattern in ("x*", r"\b", "$|GET", r"\d+") else 1000)
    )


CLASSES = ["[a-z]", "[^a-z]", "[A-Za-z0-9]", r"[\w]", r"[\W]", r"[^\w.]", r"[\s]", r"[^\s]",
           r"[\d-]", r"[\D]", ".", r"\S", "[Z-a]", "[^Z-a]", "[@-`]", r"[\x80-\xff]", r"[^\x00-\x7f]",
           "x", "K", "[^k]", r"[\x00-\x1f]", r"\xe9", r"[\xc0-\xdf]", r"[^\xe0-\xff]"]  # fmt: skip


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("flags", ["", "(?i)", "(?s)", "(?i)(?s)"])
def test_classes_admit_the_bytes_python_does(cls: str, flags: str) -> None:
    """Each class, IGNORECASE included, admits the bytes Python's engine admits: tried on all
    256 bytes (a newline excepted: no class admits it, since a match stays on its line)."""
    tree = parse(flags + cls).tree
    assert isinstance(tree, Chars)
    compiled = re.compile((flags + cls).encode())
    expected = {c for c in range(256) if compiled.fullmatch(bytes([c]))} - {10}
    assert set(tree.allowed) == expected


# -- labels ---------------------------------------------------------------------------------------


LABELLED = r'"GET /api/v1/(?P<kind>items|orders) '


def test_labels_of_fixed_strings_are_expressions_of_their_own() -> None:
    """A line that both label values match (orders first here, items further on) is read on its
    own and takes Python's choice, the leftmost."""
    lines = [
        b'"GET /api/v1/items HTTP/1.1"',
        b'"GET /api/v1/orders HTTP/1.1"',
        b'"GET /api/v1/orders "GET /api/v1/items ',
        b'"GET /api/v1/items "GET /api/v1/orders ',
        b'"GET /api/v1/users HTTP/1.1"',
        b"",
    ]
    data = b"".join(line + b"\n" for line in lines) * 500
    matcher = LineMatcher(LABELLED)
    assert matcher.engine == "hyperscan, labels as 2 expressions"
    got = matcher.scan(data)
    assert (got, matcher.take_parts()) == oracle(LABELLED, data, labels=("kind",))
    assert got == 2000
    matcher.count_labels(False)
    assert matcher.engine == "hyperscan" and matcher.scan(data) == 2000
    assert matcher.take_parts() == {}


@pytest.mark.parametrize(
    ("pattern", "engine"),
    [
        ('"GET /api/', "hyperscan"),
        (r"(?P<kind>items|orders) (?P<code>[45]0[0-4])", "hyperscan, labels as 20 expressions"),
        (r"(?i)(?P<m>get) /api", "hyperscan, labels as 8 expressions"),
        (r"tenant=(?P<tenant>[a-z0-9-]+)", "hyperscan + re2 for labels"),
        (r"(?:x|(?P<kind>items|orders))", "hyperscan + re2 for labels"),  # may not take part
        (r"(?P<k>.)s", "hyperscan + re2 for labels"),  # 255 one-byte values: too many to compile
        (r"a\nb", "none (no line can match)"),
        (r"(?:.{0,9}a.{0,9}b){50}", "re2"),  # hyperscan: "Pattern is too large"
    ],
)
def test_each_pattern_kind_runs_on_its_engine(pattern: str, engine: str) -> None:
    matcher = LineMatcher(pattern)
    assert matcher.engine == engine
    lines = [b"GET /api/ items 404 tenant=acme", b"Get /API orders 500", b"ab" * 60, b"x"]
    data = b"".join(line + b"\n" for line in lines) * 50
    if engine == "re2":  # Python's own engine takes ages on this one: only the `ab` line matches
        assert (matcher.scan(data), matcher.take_parts()) == (50, {})
        return
    assert (matcher.scan(data), matcher.take_parts()) == oracle(
        pattern, data, labels=matcher.labels
    )


def test_sum_mode_reads_each_value_and_counts_the_bad_ones() -> None:
    matcher = LineMatcher(r"rows=(?P<value>\S+)( tenant=(?P<t>\w+))?", "sum")
    data = b"rows=5 tenant=a\nrows=nan\nrows=2.5 tenant=b\nrows=1e61\nrows=1.5 tenant=a\n"
    assert matcher.engine == "hyperscan + re2 for labels and values"
    assert matcher.scan(data) == Decimal(9)
    assert matcher.bad_values == 2 and matcher.matched_lines == 5
    assert matcher.take_parts() == {(("t", "a"),): Decimal("6.5"), (("t", "b"),): Decimal("2.5")}
