"""Breakdowns by label: each collector's, the sample's (exact, counters per series, the per-hour
cap), and the ledger's (stored with the sample, kept across a reopen).

Oracles are the real thing: the lines on disk counted per tenant by a plain loop, the increments
a real prometheus_client exporter was given, the JSON a real HTTP server answered.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent import config
from agent.aggregate import LabelSet
from agent.collecting.sampling import Sampler, _exact_breakdown
from agent.collectors import Collector, CollectorError, Reading, Registry, Sources
from agent.collectors.http import HttpCollector
from agent.collectors.linecount import LineMatcher
from agent.ledger import Ledger
from tests.billing import H
from tests.conftest import PRODUCT, run_cli
from tests.fakes import FakeHost
from tests.test_prometheus_exporter import Exporter

D = Decimal
TENANTS = ("acme", "globex", "initech")
PATTERN = r'"GET /api/\S*(?: tenant=(?P<tenant>[a-z0-9-]+))?'


def tenant(name: str | None) -> LabelSet:
    return () if name is None else (("tenant", name),)


def oracle(paths: list[Path]) -> Counter[LabelSet]:
    """Matching lines per tenant, counted one line at a time in plain Python."""
    counts: Counter[LabelSet] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            if '"GET /api/' not in line:
                continue
            name = line.split("tenant=")[1].split()[0] if "tenant=" in line else None
            counts[tenant(name)] += 1
    return counts


class Agent:
    """The sampler and a real ledger, as the daemon drives them; `restart()` builds both anew."""

    def __init__(self, tmp_path: Path, collector: str, extra: str = "") -> None:
        path = tmp_path / "config.yaml"
        path.write_text(
            f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
            f"dimensions:\n  - name: usage\n    collector: {collector}\n{extra}"
        )
        self.config = config.load(path)
        self.dim = self.config.dimensions[0]
        self.host = FakeHost(tmp_path / "host")
        self.t = float(H - 300)  # readings cross an hour boundary
        self.restart()

    def restart(self) -> None:
        self.sampler = Sampler(
            self.config, Registry(), Sources(proc=self.host.proc), all_labels=True
        )
        self.ledger = Ledger(self.config.state_dir)

    def reading(self) -> Any:
        sample = self.sampler.take(self.dim, self.t, self.ledger.position(self.dim.name))
        assert sample.error is None and sample.value is not None, sample.error
        if sample.breakdown is not None:
            assert sum(sample.breakdown.values(), D(0)) == sample.value
        self.ledger.record_sample(
            self.dim.name,
            self.t,
            sample.value,
            60,
            sample.state,
            carry=True,
            increment=self.dim.collector.kind == "increment",
            breakdown=sample.breakdown,
        )
        self.t += 60
        return sample

    def stored(self) -> tuple[Decimal, Counter[LabelSet]]:
        """Every stored sample's value, and its breakdown per label set, summed."""
        total, parts = D(0), Counter[LabelSet]()
        with self.ledger.transaction() as db:
            for hour in (H - 3600, H, H + 3600):
                for p in self.ledger.points(db, self.dim.name, hour):
                    total += p.value
                    for labels, v in (p.breakdown or {(): p.value}).items():
                        parts[labels] += v  # type: ignore[assignment]
        return total, parts


def write(path: Path, lines: list[str]) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_log_breakdown_equals_the_lines_on_disk_per_tenant(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    agent = Agent(
        tmp_path, f"{{type: log, path: '{log}', pattern: '{PATTERN}', start_at: beginning}}"
    )
    n = 0

    def traffic(k: int) -> None:
        nonlocal n
        lines = []
        for _ in range(k):
            n += 1
            who = TENANTS[n % 3] if n % 4 else None  # every fourth line names no tenant
            suffix = f" tenant={who}" if who else ""
            lines.append(f'10.0.0.{n % 7} "GET /api/orders{suffix} HTTP/1.1" 200')
            if n % 5 == 0:
                lines.append(f'10.0.0.1 "GET /static/app.js tenant={who} HTTP/1.1" 200')
        write(log, lines)

    agent.reading()
    for k in (10, 37, 5):
        traffic(k)
        agent.reading()
    write(log, ['"GET /api/x tenant=acme'])  # a partial last line waits for its newline
    agent.reading()
    log.rename(tmp_path / "access.log.1")  # rotation; a new file under the name
    write(tmp_path / "access.log.1", [' HTTP/1.1" 200'])
    log.write_text("")
    traffic(20)
    agent.reading()
    agent.restart()  # positions and breakdowns both come back from the ledger
    traffic(13)
    agent.reading()
    agent.reading()

    total, parts = agent.stored()
    expected = oracle([tmp_path / "access.log.1", log])
    assert set(expected) == {tenant(t) for t in TENANTS} | {()}
    assert parts == expected
    assert total == sum(expected.values())


def test_log_sum_mode_breaks_the_values_down(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("")
    pattern = r"bytes=(?P<value>\S+)(?: project=(?P<project>\w+))?(?: team=(?P<team>\w+))?"
    agent = Agent(
        tmp_path, f"{{type: log, path: '{log}', pattern: '{pattern}', mode: sum, start_at: end}}"
    )
    agent.reading()
    write(log, ["bytes=1.5 project=a team=x", "bytes=2 project=a", "bytes=0.25", "bytes=3 team=x"])
    write(log, ["bytes=nan project=b"])  # not a number: adds 0, and no part
    sample = agent.reading()
    assert sample.value == D("6.75")
    assert sample.breakdown == {
        (("project", "a"), ("team", "x")): D("1.5"),
        (("project", "a"),): D(2),
        (): D("0.25"),
        (("team", "x"),): D(3),
    }
    assert agent.sampler.collectors["usage"].labels() == {"project", "team"}


def test_a_pattern_without_labels_keeps_the_fast_path(tmp_path: Path) -> None:
    assert not LineMatcher('"GET /api/').exact
    assert LineMatcher('"GET /api/').parts is None
    assert LineMatcher(PATTERN).exact and LineMatcher(PATTERN).labels == ("tenant",)
    log = tmp_path / "a.log"
    log.write_text("")
    agent = Agent(tmp_path, f"{{type: log, path: '{log}', pattern: 'GET'}}")
    agent.reading()
    write(log, ["GET a", "GET b"])
    sample = agent.reading()
    assert sample.value == 2 and sample.breakdown is None
    assert agent.sampler.collectors["usage"].labels() == frozenset()


def test_prometheus_counter_breakdown_is_each_series_increment(tmp_path: Path) -> None:
    exporter = Exporter(tmp_path)
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        agent = Agent(
            tmp_path,
            f"{{type: http, url: '{url}', format: prometheus, counter: true, query: jobs_total}}",
        )
        applied: Counter[LabelSet] = Counter()

        def inc(who: str, amount: int, kind: str = "batch") -> None:
            exporter.inc(who, amount, kind)
            applied[(("kind", kind), ("tenant", who))] += amount

        exporter.inc("acme", 500, "batch")  # before the first reading: not billable
        agent.reading()
        inc("acme", 3)
        inc("globex", 4, "stream")
        agent.reading()
        inc("acme", 2)
        inc("initech", 9)  # a series first seen now counts from 0
        agent.restart()  # baselines and breakdowns come back from the ledger
        agent.reading()
        exporter.restart()  # every series from 0
        inc("globex", 5, "stream")
        agent.reading()
        total, parts = agent.stored()
        assert parts == applied
        assert total == sum(applied.values()) == 23
    finally:
        exporter.stop()


class JsonServer:
    def __init__(self) -> None:
        self.body = b"{}"
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass  # no access log on the test's stderr

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stats"


@pytest.fixture
def json_server() -> Iterator[JsonServer]:
    server = JsonServer()
    yield server
    server.server.shutdown()


def http_collector(**options: Any) -> HttpCollector:
    opts = {"method": "GET", "format": "json", "mode": "value", "max_bytes": 1 << 20, **options}
    HttpCollector.validate(opts, "collector")
    return HttpCollector(opts, Sources())


def test_json_map_with_label(tmp_path: Path, json_server: JsonServer) -> None:
    answer = {"usage": {"acme": 12, "globex": 3.5, "a b/c": "0.25"}}
    json_server.body = json.dumps(answer).encode()
    c = http_collector(url=json_server.url, query="usage", label="tenant")
    reading = c.read(None)
    assert reading.breakdown == {tenant(k): D(str(v)) for k, v in answer["usage"].items()}
    assert reading.value == D("15.75") and c.labels() == {"tenant"}

    agent = Agent(
        tmp_path, f"{{type: http, url: '{json_server.url}', query: usage, label: tenant}}"
    )
    sample = agent.reading()
    assert sample.breakdown == reading.breakdown and sample.value == reading.value

    without = http_collector(url=json_server.url, query="usage")
    assert without.labels() == frozenset()
    with pytest.raises(CollectorError):
        without.read(None)  # an object is not a number
    json_server.body = b'{"usage": {"acme": "many"}}'
    with pytest.raises(CollectorError):
        c.read(None)
    json_server.body = b'{"usage": 5}'
    with pytest.raises(CollectorError):
        c.read(None)  # label: says the answer is an object of numbers


def test_label_only_on_json(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: x\n"
        "    collector: {type: http, url: 'http://x/', format: prometheus, query: a,"
        " label: tenant}\n"
    )
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert "label" in str(e.value)


def test_breakdown_sums_exactly_to_the_value() -> None:
    parts = {(("t", "a"),): D("0.1"), (("t", "b"),): 0.2, (): D(0)}
    out = _exact_breakdown(parts, D("0.5"))
    assert out == {(("t", "a"),): D("0.1"), (("t", "b"),): D("0.2"), (): D("0.2")}
    assert _exact_breakdown({(("t", "a"),): D(3)}, D(2)) == {(("t", "a"),): D(3), (): D(-1)}
    assert isinstance(_exact_breakdown({(("t", "a"),): D("NaN")}, D(1)), str)
    assert isinstance(_exact_breakdown({"tenant": D(1)}, D(1)), str)


class Plugin(Collector):
    """A third-party collector whose readings carry a breakdown."""

    type_name = "labelled"
    parts: ClassVar[dict[LabelSet, Decimal]] = {}

    def read(self, state: dict[str, Any] | None) -> Reading:
        return Reading(sum(self.parts.values(), D(0)), breakdown=dict(self.parts))


def test_label_sets_per_hour_are_capped(tmp_path: Path) -> None:
    registry = Registry()
    registry.register("labelled", Plugin)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: x\n"
        "    collector: {type: labelled}\n    aggregate: max\n    max_label_sets: 3\n"
    )
    cfg = config.load(path, registry)
    dim = cfg.dimensions[0]
    sampler = Sampler(cfg, registry, Sources(), all_labels=True)
    Plugin.parts = {tenant(f"t{i}"): D(i + 1) for i in range(5)} | {(): D(100)}
    first = sampler.take(dim, H + 10, None).breakdown
    assert first == {tenant("t0"): 1, tenant("t1"): 2, tenant("t2"): 3, (): 100 + 4 + 5}
    assert sampler.collectors["x"].labels() is None
    Plugin.parts = {tenant("t4"): D(7), tenant("t1"): D(1)}
    assert sampler.take(dim, H + 70, None).breakdown == {(): 7, tenant("t1"): 1}
    # a new hour keeps its own label sets apart again
    assert sampler.take(dim, H + 3600, None).breakdown == {tenant("t4"): 7, tenant("t1"): 1}


def test_breakdown_survives_a_reopen_and_increments_add_up(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    acme, globex = tenant("acme"), tenant("globex")
    ledger.record_sample("x", H + 1, D(5), 60, {"p": 1}, True, True, {acme: D(2), (): D(3)})
    ledger.record_sample("x", H + 1, D(4), 60, {"p": 2}, True, True, {acme: D(1), globex: D(3)})
    ledger.record_sample("x", H + 61, D(2), 60, {"p": 3}, True, True)  # no breakdown
    ledger.record_sample("y", H + 1, D(2), 60, None, True, True)
    ledger.record_sample("y", H + 1, D(1), 60, None, True, True, {globex: D(1)})
    ledger.close()
    ledger = Ledger(tmp_path)
    with ledger.transaction() as db:
        x = ledger.points(db, "x", H)
        y = ledger.points(db, "y", H)
    assert [(p.value, p.breakdown) for p in x] == [
        (D(9), {acme: D(3), (): D(3), globex: D(3)}),
        (D(2), None),
    ]
    assert [(p.value, p.breakdown) for p in y] == [(D(3), {(): D(2), globex: D(1)})]
    assert ledger.position("x") == {"p": 3}


def test_max_label_sets_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: x\n"
        "    collector: {type: system, metric: cpu_count}\n    max_label_sets: 0\n"
    )
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert "max_label_sets" in str(e.value)
    assert re.search(r"max_label_sets", json.dumps(config.json_schema()))


def test_sample_prints_the_breakdown(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    lines = [f'"GET /api/a tenant=t{i % 7}' for i in range(70)] + ['"GET /api/b'] * 30
    write(log, lines + [f'"GET /api/a tenant=t{i}' for i in range(3)])  # t0..t2 lead
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\ndimensions:\n"
        f"  - name: requests\n    collector: {{type: log, path: '{log}', pattern: '{PATTERN}',"
        " start_at: beginning}\n"
    )
    result = run_cli("sample", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("requests 103 ")
    assert out[1:] == [
        "  (no labels)  30",
        "  tenant=t0  11",
        "  tenant=t1  11",
        "  tenant=t2  11",
        "  tenant=t3  10",
        "  ... 3 more label sets  30",
    ]


def test_the_example_plugin_carries_a_breakdown(tmp_path: Path) -> None:
    usage = tmp_path / "usage.txt"
    usage.write_text("acme 12\nglobex 3.5\nacme 1\n")
    agent = Agent(tmp_path, f"{{type: file_value, path: '{usage}', label: tenant}}")
    sample = agent.reading()
    assert sample.value == D("16.5")
    assert sample.breakdown == {tenant("acme"): D(13), tenant("globex"): D("3.5")}
    assert agent.sampler.collectors["usage"].labels() == {"tenant"}


class Totals(Collector):
    """Running totals per queue, asking for a breakdown by series."""

    type_name = "totals"
    totals: ClassVar[dict[str, int]] = {}

    def read(self, state: dict[str, Any] | None) -> Reading:
        series = [({"queue": q}, D(v)) for q, v in self.totals.items()]
        return Reading.of_series(series, breakdown={})


def test_a_counter_breaks_down_by_series_across_a_reboot(tmp_path: Path) -> None:
    registry = Registry()
    registry.register("totals", Totals)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: x\n"
        "    collector: {type: totals, counter: true}\n"
    )
    cfg = config.load(path, registry)
    dim = cfg.dimensions[0]
    host = FakeHost(tmp_path / "host")
    host.boot("b1")
    sampler = Sampler(cfg, registry, Sources(proc=host.proc), all_labels=True)
    eu, us = (("queue", "eu"),), (("queue", "us"),)
    Totals.totals = {"eu": 100, "us": 50}
    first = sampler.take(dim, H + 1, None)
    assert first.value == 0 and first.breakdown == {}
    Totals.totals = {"eu": 130, "us": 40}  # us went down: it restarted, counts 40
    second = sampler.take(dim, H + 61, first.state)
    assert second.value == 70 and second.breakdown == {eu: 30, us: 40}
    host.boot("b2")
    Totals.totals = {"eu": 5}
    third = sampler.take(dim, H + 121, second.state)
    assert third.value == 5 and third.breakdown == {eu: 5}


def test_a_json_map_of_running_totals_is_differenced_per_key(
    tmp_path: Path, json_server: JsonServer
) -> None:
    """`counter: true` with `label:`: each key is its own counter. Compared as one total, a key
    that disappeared made the next increment re-bill what it had already counted."""
    agent = Agent(
        tmp_path,
        f"{{type: http, url: '{json_server.url}', query: usage, label: tenant, counter: true}}",
    )
    answers = [{"acme": 100, "globex": 50}, {"acme": 130, "globex": 60}, {"acme": 140}]
    samples = []
    for answer in answers:
        json_server.body = json.dumps({"usage": answer}).encode()
        samples.append(agent.reading())
    assert samples[1].value == 40
    assert samples[1].breakdown == {tenant("acme"): 30, tenant("globex"): 10}
    assert samples[2].value == 10  # not 140: acme's own increase; globex's key is gone
    assert samples[2].breakdown == {tenant("acme"): 10}


def test_without_allocations_no_breakdown_is_kept_and_the_fast_path_stays(tmp_path: Path) -> None:
    """A named group used only to match (`ip`) costs nothing when no allocation bills it."""
    log = tmp_path / "app.log"
    write(log, ['1.2.3.4 "GET /api/x tenant=acme', '5.6.7.8 "GET /api/y'])
    pattern = r'(?P<ip>[0-9.]+) "GET /api/'
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\ndimensions:\n"
        f"  - name: plain\n    collector: {{type: log, path: '{log}', pattern: '{pattern}',"
        " start_at: beginning}\n"
        f"  - name: billed\n    collector: {{type: log, path: '{log}', pattern: '{pattern}',"
        " start_at: beginning}\n    allocations: {tags: {Client: ip}}\n"
    )
    cfg = config.load(path)
    sampler = Sampler(cfg, Registry(), Sources())
    plain, billed = cfg.dimensions
    assert sampler.collectors["plain"].matcher.exact is False  # type: ignore[attr-defined]
    assert sampler.take(plain, H, None).breakdown is None
    got = sampler.take(billed, H, None)
    assert got.value == 2
    assert got.breakdown == {(("ip", "1.2.3.4"),): 1, (("ip", "5.6.7.8"),): 1}


def test_only_the_mapped_labels_count_against_the_cap(tmp_path: Path) -> None:
    """3 teams x 1,000 instances with max_label_sets 10: three team label sets, nothing moved
    to the untagged bucket (unmapped labels are summed away before the cap)."""
    registry = Registry()
    registry.register("labelled", Plugin)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: x\n"
        "    collector: {type: labelled}\n    max_label_sets: 10\n"
        "    allocations: {tags: {Team: team}}\n"
    )
    cfg = config.load(path, registry)
    Plugin.parts = {
        (("instance", f"i{i}"), ("team", team)): D(1)
        for i in range(1000)
        for team in ("a", "b", "c")
    }
    got = Sampler(cfg, registry, Sources()).take(cfg.dimensions[0], H, None).breakdown
    assert got == {(("team", t),): 1000 for t in ("a", "b", "c")}


def test_a_label_without_a_value_is_left_out() -> None:
    assert _exact_breakdown({(("tenant", None),): D(5)}, D(5)) == {(): D(5)}


def test_allocations_on_a_collector_without_labels_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path}\ndimensions:\n  - name: vcpus\n"
        "    collector: {type: system, metric: cpu_count}\n"
        "    allocations: {tags: {Tenant: tenant}}\n"
    )
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert "allocations.tags.Tenant" in line
