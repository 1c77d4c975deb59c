"""HTTP probes against a local server: each format, and each way a probe can fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.collectors import CollectorError, Sources
from agent.collectors.http import HttpCollector, parse_selector, prometheus_sum
from agent.errors import ConfigError

PROM = """# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{code="200",method="GET"} 1027
http_requests_total{code="200",method="POST"} 3
http_requests_total{code="500",method="GET"} 12
http_requests_total{code="404",path="/a \\"b\\""} 1 1700000000000
active_users 42
"""

OM_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

ROUTES: dict[str, tuple[int, str, str]] = {
    "/stats": (200, "application/json", '{"users": {"active": 17, "names": ["a"]}, "ratio": 0.25}'),
    "/metrics": (200, "text/plain", PROM),
    "/text": (200, "text/plain", "queue depth: 314 items\n"),
    "/error": (500, "text/plain", "boom"),
    "/big": (200, "application/json", "[" + "1," * 2000 + "1]"),
    "/notjson": (200, "text/plain", "hello"),
    "/badprom": (200, "text/plain", "active_users 1\nactive_users{a=b} 2\n"),
    "/om": (200, OM_TYPE, '# TYPE jobs counter\njobs_total{t="a"} 4 # {id="x"} 1 1.5\n# EOF\n'),
    "/om-cut": (200, OM_TYPE, '# TYPE jobs counter\njobs_total{t="a"} 4\n'),
}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2)
        if self.path.startswith("/trickle"):  # a valid answer, one byte every 0.1 s
            data = b'{"users": {"active": 1234567}}'
            head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
            where = head if self.path == "/trickle-headers" else b""
            if not where:
                self.wfile.write(head)
            for byte in where + data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            return
        if self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/stats")
            self.end_headers()
            return
        if self.path == "/here":
            self.send_response(302)
            self.send_header("Location", "/stats")
            self.end_headers()
            return
        if self.path == "/auth":
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            status, ctype, body = (
                (200, "application/json", '{"n": 5}') if ok else (401, "text/plain", "no")
            )
        else:
            status, ctype, body = ROUTES.get(self.path, (404, "text/plain", "missing"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def probe(url: str, **options: Any) -> Decimal:
    opts = {
        "url": url,
        "method": "GET",
        "headers": None,
        "timeout": 5,
        "format": "json",
        "query": None,
        "mode": "value",
        "max_bytes": 1 << 20,
        **options,
    }
    HttpCollector.validate(opts, "collector")
    return HttpCollector(opts, Sources()).read(None).value


def test_json_with_jmespath(server: str) -> None:
    assert probe(f"{server}/stats", query="users.active") == 17
    assert probe(f"{server}/stats", query="ratio") == Decimal("0.25")
    assert probe(f"{server}/stats", query="length(users.names)") == 1


def test_prometheus_sums_matching_series(server: str) -> None:
    assert (
        probe(f"{server}/metrics", format="prometheus", query='http_requests_total{code="200"}')
        == 1030
    )
    assert probe(f"{server}/metrics", format="prometheus", query="http_requests_total") == 1043
    assert (
        probe(
            f"{server}/metrics",
            format="prometheus",
            query='http_requests_total{code=~"5..",method!="POST"}',
        )
        == 12
    )
    assert probe(f"{server}/metrics", format="prometheus", query="active_users") == 42


def test_prometheus_declared_metric_without_matching_series_reads_zero(server: str) -> None:
    # No 5xx so far is 0, not an error; a counter's first series then count from 0.
    query = 'http_requests_total{code="999"}'
    assert probe(f"{server}/metrics", format="prometheus", query=query) == 0


def test_openmetrics_answer(server: str) -> None:
    assert probe(f"{server}/om", format="prometheus", query="jobs") == 4
    assert probe(f"{server}/om", format="prometheus", query="jobs_total") == 4


def test_text_regex(server: str) -> None:
    assert probe(f"{server}/text", format="text", query=r"depth: (\d+)") == 314


def test_headers_are_sent(server: str) -> None:
    assert probe(f"{server}/auth", query="n", headers={"Authorization": "Bearer s3cret"}) == 5


def test_mode_up(server: str) -> None:
    assert probe(f"{server}/stats", mode="up") == 1
    assert probe(f"{server}/error", mode="up") == 0
    assert probe("http://127.0.0.1:9/", mode="up") == 0


def test_same_host_redirect_is_followed(server: str) -> None:
    assert probe(f"{server}/here", query="users.active") == 17


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("/error", {"query": "x"}, "answered HTTP 500"),
        ("/stats", {"query": "users.missing"}, "matched nothing"),
        ("/stats", {"query": "users"}, "gave dict, not a number"),
        ("/notjson", {"query": "x"}, "did not answer JSON"),
        ("/big", {"query": "[0]", "max_bytes": 1024}, "more than 1024 bytes"),
        ("/slow", {"query": "x", "timeout": 1}, "no complete answer within the 1 s timeout"),
        ("/elsewhere", {"query": "users.active"}, "redirected to another host"),
        ("/metrics", {"format": "prometheus", "query": "http_requestz_total"}, "no metric"),
        ("/badprom", {"format": "prometheus", "query": "active_users"}, "line 2: not a valid"),
        ("/om-cut", {"format": "prometheus", "query": "jobs"}, "without # EOF"),
        ("/text", {"format": "text", "query": r"missing (\d+)"}, "not found"),
    ],
)
def test_failures_are_collector_errors(server: str, path: str, options: dict, message: str) -> None:
    with pytest.raises(CollectorError, match=message):
        probe(f"{server}{path}", **options)


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_server_ends_at_the_total_deadline(server: str, path: str) -> None:
    """urllib's timeout is per socket operation: each byte resets it. The probe's own deadline
    ends the read at `timeout`, and a body cut short is never parsed as a (smaller) number."""
    started = time.monotonic()
    with pytest.raises(CollectorError, match="no complete answer within the 1 s timeout"):
        probe(f"{server}{path}", query="users.active", timeout=1)
    assert time.monotonic() - started < 2.0
    # the same answer, given time, is read in full
    assert probe(f"{server}/trickle", query="users.active", timeout=15) == 1234567


def test_connection_refused_is_a_collector_error() -> None:
    with pytest.raises(CollectorError, match="unreachable"):
        probe("http://127.0.0.1:9/stats", query="x")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "query: required for format json"),
        ({"query": "users.[["}, "query: invalid JMESPath"),
        ({"format": "prometheus", "query": "bad metric{"}, "expected a metric name"),
        ({"format": "prometheus", "query": 'm{a~"x"}'}, "cannot parse label matcher"),
        ({"format": "text", "query": r"\d+"}, "needs a group"),
    ],
)
def test_config_errors(options: dict, message: str) -> None:
    opts = {"url": "http://x/", "format": "json", "query": None, "mode": "value", **options}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        HttpCollector.validate(opts, "dimensions[0].collector")


def test_selector_parsing() -> None:
    assert parse_selector('m{a="1", b=~"x|y"}', "q") == ("m", [("a", "=", "1"), ("b", "=~", "x|y")])
    assert prometheus_sum(PROM, "http_requests_total", [("path", "=", '/a "b"')]) == 1


def test_an_unparsable_line_is_a_counted_error_and_loses_nothing(tmp_path: Path) -> None:
    """The round with a bad line stores nothing (baselines included) and `status` counts it; the
    next good round bills everything since the last good one."""
    from agent.collecting.sampling import Sampler
    from tests.billing import H, make_config
    from tests.fakes import FakeClock
    from tests.test_daemon import FakeImds, open_daemon

    body = {"text": '# TYPE jobs counter\njobs_total{t="a"} 10\n'}

    class Exporter(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            data = body["text"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/metrics"
        cfg = make_config(
            tmp_path,
            dims=f"""
              - name: jobs
                collector: {{type: http, url: '{url}', format: prometheus, query: jobs_total,
                             counter: true}}
            """,
        )
        clock = FakeClock(H)
        d = open_daemon(cfg, clock, FakeImds("i-1"), sampler=Sampler(cfg),
                        sender_command=lambda *_: ["true"])  # fmt: skip
        d.sample_round(60)  # baseline 10
        assert d.reads.wait(10)
        clock.advance(60)
        body["text"] = '# TYPE jobs counter\njobs_total{t="a"} 25\njobs_total{t="b" 5\n'
        d.sample_round(60)
        assert d.reads.wait(10)
        status = {s.dimension: s for s in d.ledger.dimension_status()}
        assert status["jobs"].errors == 1 and "line 3" in (status["jobs"].last_error or "")
        clock.advance(60)
        body["text"] = '# TYPE jobs counter\njobs_total{t="a"} 40\njobs_total{t="b"} 5\n'
        d.sample_round(60)
        assert d.reads.wait(10)
        status = {s.dimension: s for s in d.ledger.dimension_status()}
        assert status["jobs"].errors == 1 and status["jobs"].last_error is None  # recovered
        clock.advance(3600)
        d.close_hours()
        assert [h.quantity.value for h in d.ledger.hours()] == [30 + 5]
    finally:
        srv.shutdown()
