"""The exposition parser against the format's rules and against prometheus_client's own writer
and parsers (classic text and OpenMetrics)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics_reference,
)
from prometheus_client.parser import text_string_to_metric_families as parse_classic_reference

from agent.collectors import series_key
from agent.collectors.exposition import ExpositionError, parse
from agent.collectors.http import prometheus_reading


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, float(s.value)) for s in parse(text).samples]


def reference(text: str, openmetrics: bool) -> list[tuple[str, dict[str, str], float]]:
    families = (parse_openmetrics_reference if openmetrics else parse_classic_reference)(text)
    return [(s.name, s.labels, float(s.value)) for f in families for s in f.samples]


class TestEscapes:
    def test_backslash_before_n_is_a_backslash_not_a_newline(self) -> None:
        text = 'm{path="C:\\\\new"} 1\n'  # on the wire: C:\\new
        assert samples(text) == [("m", {"path": "C:\\new"}, 1.0)]

    def test_quote_and_newline(self) -> None:
        text = 'm{a="say \\"hi\\"",b="two\\nlines"} 2\n'
        assert samples(text) == [("m", {"a": 'say "hi"', "b": "two\nlines"}, 2.0)]

    def test_other_backslashes_are_kept_as_prometheus_client_does(self) -> None:
        text = 'm{a="x\\ty"} 3\n'
        assert samples(text) == [("m", {"a": "x\\ty"}, 3.0)] == reference(text, False)

    def test_braces_and_commas_inside_values(self) -> None:
        text = 'm{a="{x,y}",b="} 9"} 4\n'
        assert samples(text) == [("m", {"a": "{x,y}", "b": "} 9"}, 4.0)]


class TestFormats:
    def test_classic_timestamps_and_special_values(self) -> None:
        text = "a 1 1700000000000\nb -1.5e+06 -5\nc +Inf\nd NaN\ne{} 7\n"
        got = samples(text)
        assert got[:2] == [("a", {}, 1.0), ("b", {}, -1.5e6)]
        assert got[2][2] == math.inf and math.isnan(got[3][2]) and got[4] == ("e", {}, 7.0)

    def test_openmetrics_exemplars_float_timestamps_and_eof(self) -> None:
        text = (
            "# TYPE req counter\n"
            "# UNIT req requests\n"
            'req_total{p="/a"} 17.0 1520879607.789 # {trace_id="KOO5S4vxi0o"} 0.67\n'
            'req_total{p="/b"} 3 # {trace_id="x y"} 1.0 1520879607.7\n'
            'req_created{p="/a"} 1520430000.123\n'
            "# EOF\n"
        )
        assert samples(text) == [
            ("req_total", {"p": "/a"}, 17.0),
            ("req_total", {"p": "/b"}, 3.0),
            ("req_created", {"p": "/a"}, 1520430000.123),
        ]
        assert parse(text).types == {"req": "counter"}
        reading = prometheus_reading(text, "req", [])
        assert reading.value == 20  # _created is never summed
        assert reading.epochs == {series_key({"p": "/a"}): "1520430000.123"}

    def test_quoted_utf8_names(self) -> None:
        text = '{"my.metric","my.label"="v",le="1"} 5\n'
        assert samples(text) == [("my.metric", {"my.label": "v", "le": "1"}, 5.0)]

    @pytest.mark.parametrize(
        "line",
        [
            "m",  # no value
            "m 1,5",  # not a number
            'm{a="x} 1',  # unclosed quote
            "m{a=x} 1",  # unquoted value
            'm{a="1",a="2"} 1',  # label twice
            "m 1 2 3",  # trailing junk
            '{a="1"} 1',  # no metric name
            "m 1 # {a=1} 2",  # broken exemplar
        ],
    )
    def test_a_line_that_cannot_be_parsed_is_an_error(self, line: str) -> None:
        with pytest.raises(ExpositionError, match="line 2"):
            parse(f"ok 1\n{line}\n")

    def test_text_after_eof_is_an_error(self) -> None:
        with pytest.raises(ExpositionError, match="after # EOF"):
            parse("a 1\n# EOF\nb 2\n")

    def test_comments_are_not_samples(self) -> None:
        assert samples("# just a note\n# HELP m a\\nb\n# TYPE m gauge\nm 1\n") == [("m", {}, 1.0)]


def registry_with(values: list[tuple[str, int]]) -> CollectorRegistry:
    reg = CollectorRegistry()
    counter = Counter("jobs", "Jobs done.", ["tenant"], registry=reg)
    for label, amount in values:
        counter.labels(label).inc(amount)
    Gauge("temp", "A gauge.", registry=reg).set(-12.25)
    Histogram("lat", "Latency.", ["op"], registry=reg).labels("get").observe(0.3)
    Summary("size", "Sizes.", registry=reg).observe(512)
    if values:
        counter.labels(values[0][0]).inc(0)  # touch an existing child
    return reg


label_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(label_values, st.integers(0, 10**12)), max_size=6))
def test_matches_prometheus_client_on_its_own_output(values: list[tuple[str, int]]) -> None:
    """Whatever label values an exporter carries, we read what prometheus_client reads."""
    reg = registry_with(values)
    expected: dict[str, int] = {}
    for label, amount in values:
        expected[label] = expected.get(label, 0) + amount
    for text, openmetrics in (
        (generate_latest(reg).decode(), False),
        (generate_openmetrics(reg).decode(), True),
    ):
        assert samples(text) == reference(text, openmetrics)
        reading = prometheus_reading(text, "jobs_total", [])
        assert reading.value == sum(expected.values())
        assert reading.series == {
            series_key({"tenant": k}): Decimal(v) for k, v in expected.items()
        }
        assert set(reading.epochs or {}) == set(reading.series)
