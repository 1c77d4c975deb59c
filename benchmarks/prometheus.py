"""Prometheus exposition: how long one reading takes on a large exporter answer.

A prometheus_client registry with one labelled counter of N series and one gauge of N series is
rendered in the classic format and in OpenMetrics; the agent's reading (every line checked, the
selected counter's series and `_created` kept) is timed against prometheus_client's own parser
reading the same text. Needs prometheus_client (the `test` extra).

    python benchmarks/prometheus.py [--series 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as classic_parse

from agent.collectors.http import prometheus_reading


def timed(fn: object, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    registry = CollectorRegistry()
    jobs = Counter("jobs", "Jobs done.", ["tenant", "kind"], registry=registry)
    other = Gauge("queue_depth", "Depth.", ["queue"], registry=registry)
    for i in range(args.series):
        jobs.labels(f"tenant-{i}", "batch").inc(i)
        other.labels(f"q{i}").set(i)
    print(f"{args.series} counter series + {args.series} gauge series")
    print(f"{'format':<12} {'bytes':>9} {'lines':>7} {'agent ms':>9} {'prometheus_client ms':>21}")
    for name, text, reference in (
        ("classic", generate_latest(registry).decode(), classic_parse),
        ("openmetrics", generate_openmetrics(registry).decode(), om_parse),
    ):
        ours = timed(lambda t=text: prometheus_reading(t, "jobs_total", []), args.repeat)
        theirs = timed(lambda t=text, r=reference: list(r(t)), args.repeat)
        print(f"{name:<12} {len(text):>9} {text.count(chr(10)):>7} {ours:>9.0f} {theirs:>21.0f}")


if __name__ == "__main__":
    main()
