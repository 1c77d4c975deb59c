"""Log patterns run in linear time: what needs backtracking is a config error naming the feature;
a line written to make Python's engine backtrack for ever is counted at once, on every path; the
scan lets other threads run; re2 is loaded only when a pattern's groups need it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.collectors import linecount
from agent.collectors.linecount import LineMatcher, check_pattern
from agent.errors import EX_CONFIG, ConfigError
from tests.conftest import PRODUCT, ROOT, run_cli

NEEDS_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 cannot parse it")

REFUSED = [
    pytest.param('"GET (?=/api)', "a lookahead (?=...)", "without (?=...)", id="lookahead"),
    pytest.param('"GET (?!/static)', "a negative lookahead (?!...)", "without (?!...)", id="neg"),
    pytest.param("(?<=GET )/api", "a lookbehind (?<=...)", "without (?<=...)", id="lookbehind"),
    pytest.param("(?<!POST )/api", "a negative lookbehind", "without (?<!...)", id="neg-behind"),
    pytest.param(r"(\w+) \1", "a backreference", "without the backreference", id="backref"),
    pytest.param("(?P<m>GET) (?P=m)", "a backreference", "the backreference", id="named-backref"),
    pytest.param("(a)?(?(1)b|c)", "a conditional group", "without (?(...)...)", id="conditional"),
    pytest.param(
        "(?>GET|POST) /api", "an atomic group (?>...)", "(?>...)", marks=NEEDS_311, id="atomic"
    ),
    pytest.param(
        r"/api/\w++ HTTP",
        "a possessive quantifier",
        "the trailing +",
        marks=NEEDS_311,
        id="possessive",
    ),
    pytest.param(
        r"(?:(?P<t>\w*),?)+",
        "the named group (?P<t>...)",
        "at least one character",
        id="group-under-empty-repeat",
    ),
]


@pytest.mark.parametrize(("pattern", "feature", "fix"), REFUSED)
def test_what_needs_backtracking_is_refused_naming_the_feature(
    pattern: str, feature: str, fix: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError) as raised:
        check_pattern(pattern)
    message = str(raised.value)
    assert feature in message and fix in message and "\n" not in message
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: api\n"
        f"    collector: {{type: log, path: {tmp_path}/a.log, pattern: '{pattern}'}}\n"
    )
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert error.value.path == "dimensions[0].collector.pattern"
    assert str(error.value) == f"dimensions[0].collector.pattern: {message}"


def test_the_locale_flag_is_refused() -> None:
    """(The config's own check refuses it first: `(?L)` is not valid in a str pattern.)"""
    with pytest.raises(ValueError, match=r"uses the locale flag \(\?L\)"):
        check_pattern("(?L)error")


def test_check_exits_78_with_one_line_for_a_lookahead(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: api\n"
        f"    collector: {{type: log, path: {tmp_path}/a.log, pattern: '\"GET (?=/api)'}}\n"
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stderr.strip().splitlines() == [
        "metering-agent: dimensions[0].collector.pattern: uses a lookahead (?=...), which needs"
        " a backtracking engine; log patterns run in linear time: rewrite it without (?=...)"
    ]


def test_check_names_each_log_pattern_engine(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text('"GET /api/v1/orders HTTP/1.1"\n')
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            dimensions:
              - name: api
                collector: {{type: log, path: {log}, pattern: '"GET /api/'}}
              - name: big
                collector: {{type: log, path: {log}, pattern: '(?:.{{0,9}}a.{{0,9}}b){{50}}'}}
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            """
        )
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok    collector api: log ready (pattern on hyperscan)\n" in result.stdout
    assert "ok    collector big: log ready (pattern on re2)\n" in result.stdout
    assert "ok    collector vcpus: system ready\n" in result.stdout


# -- the hostile line ---------------------------------------------------------------------------

HOSTILE = r'"(GET|POST) /api/(\w+/?)+ HTTP'
BAD = b'10.0.0.9 - - "GET /api/' + b"a" * 40 + b'!" 404 0'  # re: 2**40 paths, never ends
NORMAL = [
    b'10.0.0.1 - - "GET /api/v1/orders HTTP/1.1" 200 512',
    b'10.0.0.2 - - "POST /api/v1/orders/ HTTP/1.1" 201 64',
    b'10.0.0.3 - - "GET /static/app.js HTTP/1.1" 200 9000',
    b'10.0.0.4 - - "PUT /api/v1/orders HTTP/1.1" 200 12',
]


def hostile_log(copies: int = 1000) -> bytes:
    """Normal lines (2 of 4 match) and the crafted line, which does not match."""
    return b"".join(line + b"\n" for line in [*NORMAL, BAD]) * copies


@pytest.mark.parametrize(
    ("pattern", "labels", "engine"),
    [
        (HOSTILE, False, "hyperscan"),
        (r'"(?P<method>GET|POST) /api/(\w+/?)+ HTTP', True, "hyperscan, labels as 2 expressions"),
        (r'"(GET|POST) /api/(?P<path>(\w+/?)+) HTTP', True, "hyperscan + re2 for labels"),
    ],
)
def test_a_line_that_makes_re_backtrack_for_ever_is_counted_at_once(
    pattern: str, labels: bool, engine: str
) -> None:
    matcher = LineMatcher(pattern)
    matcher.count_labels(labels)
    assert matcher.engine == engine
    data = hostile_log()
    start = time.perf_counter()
    got = matcher.scan(data)
    elapsed = time.perf_counter() - start
    assert got == 2000
    assert elapsed < 0.5
    assert matcher.match_line(BAD) == 0  # the same line, capped (log.py: over-long lines)
    parts = matcher.take_parts()
    if "method" in pattern:
        assert parts == {(("method", "GET"),): 1000, (("method", "POST"),): 1000}
    elif "path" in pattern:
        assert parts == {(("path", "v1/orders"),): 1000, (("path", "v1/orders/"),): 1000}


def test_a_matching_line_that_backtracks_before_its_match_reads_its_groups_at_once() -> None:
    """Python's search would spend for ever at the first `"GET /api/` before finding the second;
    re2 reads the group on that line in linear time."""
    line = BAD + b' "GET /api/x/y HTTP/1.1"'
    matcher = LineMatcher(r'"(GET|POST) /api/(?P<path>(\w+/?)+) HTTP')
    start = time.perf_counter()
    assert matcher.scan((line + b"\n") * 100) == 100
    assert time.perf_counter() - start < 0.5
    assert matcher.take_parts() == {(("path", "x/y"),): 100}


def test_the_hostile_line_on_re2_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, expressions: Any) -> None:
        raise ValueError("refused for the test")  # what _Hyperscan says of what hyperscan refuses

    monkeypatch.setattr(linecount._Hyperscan, "__init__", refuse)
    for pattern in (HOSTILE, r'"(?P<method>GET|POST) /api/(\w+/?)+ HTTP'):
        matcher = LineMatcher(pattern)
        assert matcher.engine == "re2"
        start = time.perf_counter()
        assert matcher.scan(hostile_log()) == 2000
        assert time.perf_counter() - start < 1.0


def test_a_pattern_hyperscan_refuses_runs_on_re2() -> None:
    """Hyperscan says "Pattern is too large"; re2 takes it and is exact (Python's own engine is
    exponential on the last line, so the expectation is written out)."""
    pattern = r"(?:.{0,9}a.{0,9}b){50}"
    check_pattern(pattern)
    matcher = LineMatcher(pattern)
    assert matcher.engine == "re2"
    lines = [b"ab" * 60, b"ab" * 49, b"a-b" * 50, b"", b"a" * 300]
    assert matcher.scan(b"".join(line + b"\n" for line in lines) * 100) == 200


def test_the_scan_lets_other_threads_run() -> None:
    """Hyperscan releases the GIL while it scans: another thread keeps running in the middle of
    a long scan (a backtracking `re` would hold it throughout)."""
    data = (b"x" * 99 + b"\n") * 600_000  # 60 MB, no match
    matcher = LineMatcher('"PUT /api/v2/items')
    matcher.scan(b"warm up\n")
    ticks: list[float] = []
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())

    thread = threading.Thread(target=other)
    thread.start()
    spans = []
    try:
        for _ in range(5):
            start = time.perf_counter()
            assert matcher.scan(data) == 0
            spans.append((start, time.perf_counter()))
    finally:
        stop.set()
        thread.join()
    inside = [t for a, b in spans for t in ticks if a + (b - a) / 4 < t < b - (b - a) / 4]
    assert inside


# -- re2 only when needed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "labels", "lines", "loaded"),
    [
        ('"GET /api/', False, [b'"GET /api/v1/items '], False),
        (r'"GET /api/v1/(?P<kind>items|orders) ', True, [b'"GET /api/v1/items x'], False),
        # both values on one line: read with re2
        (
            r'"GET /api/v1/(?P<kind>items|orders) ',
            True,
            [b'"GET /api/v1/items "GET /api/v1/orders '],
            True,
        ),
        (r"tenant=(?P<tenant>\w+)", True, [b"tenant=a"], True),
        (r"tenant=(?P<tenant>\w+)", False, [b"tenant=a"], False),
    ],
)
def test_re2_is_imported_only_when_a_line_needs_its_groups_read(
    pattern: str, labels: bool, lines: list[bytes], loaded: bool
) -> None:
    data = b"".join(line + b"\n" for line in lines)
    code = textwrap.dedent(
        f"""
        import sys
        from agent.collectors.linecount import LineMatcher, check_pattern
        check_pattern({pattern!r})
        m = LineMatcher({pattern!r})
        m.count_labels({labels!r})
        assert m.scan({data!r}) == {len(lines)}
        print("re2" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == str(loaded)


def test_sum_mode_on_the_hostile_pattern_reads_values_in_linear_time() -> None:
    matcher = LineMatcher(r'"(GET|POST) /api/(\w+/?)+ HTTP/1.1" \d+ (?P<value>\d+)', "sum")
    assert matcher.engine == "hyperscan + re2 for values"
    start = time.perf_counter()
    assert matcher.scan(hostile_log()) == Decimal((512 + 64) * 1000)
    assert time.perf_counter() - start < 0.5


def test_a_pattern_compiled_in_a_child_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon compiles hyperscan databases in a short-lived child (`compile_in_child`) and
    loads them: the same counts, and what hyperscan refuses is still refused."""
    monkeypatch.setattr(linecount, "_compiler", linecount._InChild())
    monkeypatch.setattr(linecount, "_cache", {})
    for pattern in ('"(GET|POST) /api/', r'" 5[0-9][0-9] ', '"GET /api/v1/(?P<kind>items|orders) '):
        here = LineMatcher(pattern)
        assert here.engine.startswith("hyperscan")
        log = hostile_log()
        assert here.scan(log) == len(
            [ln for ln in log.split(b"\n") if re.search(pattern.encode(), ln)]
        )
    assert not linecount._Hyperscan.accepts([r"(?:.{0,9}a.{0,9}b){50}"])
