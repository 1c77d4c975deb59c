"""The promql collector against a fake Prometheus HTTP API (a local server answering what each
test sets): per-series differencing through the real sampler, carried series, each error a
round's collector error, config errors naming the key, and the auth headers (SigV4 checked
against botocore's own signer)."""

from __future__ import annotations

import base64
import json
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.collectors.sigv4 import Credentials, fetch_in_child, sign_get
from agent.errors import ConfigError
from tests.conftest import PRODUCT, run_cli
from tests.fakes import FakeClock, FakeHost


class FakeApi:
    """What the fake API answers next (status, body), and the requests it received."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b""
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []

    def vector(self, *series: tuple[dict[str, str], str], at: float = 1_800_000_000.0) -> None:
        result = [{"metric": m, "value": [at, v]} for m, v in series]
        self.answer({"status": "success", "data": {"resultType": "vector", "result": result}})

    def answer(self, data: Any, status: int = 200) -> None:
        self.status, self.body = status, json.dumps(data).encode()


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            fake.requests.append((self.path, dict(self.headers)))
            time.sleep(fake.delay)
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            self.wfile.write(fake.body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def load(tmp_path: Path, collector: str, saas: bool = True) -> config.Config:
    path = tmp_path / "c.yaml"
    mode = "mode: saas\nsaas: {customer_label: customer}\n" if saas else ""
    path.write_text(
        f"product_code: {PRODUCT}\n{mode}dimensions:\n"
        f"  - name: requests\n    collector: {collector}\n"
    )
    return config.load(path)


def sampler(tmp_path: Path, url: str, extra: str = "", **sources: Any) -> tuple[Sampler, Any]:
    cfg = load(tmp_path, f"{{type: promql, url: '{url}', query: app_requests_total{extra}}}")
    host = FakeHost(tmp_path / f"host{len(list(tmp_path.iterdir()))}")
    return Sampler(cfg, Registry(), Sources(proc=host.proc, extra=sources)), host


def a(customer: str, instance: str) -> dict[str, str]:
    return {"__name__": "app_requests_total", "customer": customer, "instance": instance}


def by_customer(breakdown: Any) -> dict[str, Decimal]:
    return {dict(k).get("customer", ""): v for k, v in (breakdown or {}).items()}


def test_each_series_differenced_with_the_agents_counter_rules(
    tmp_path: Path, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    s, host = sampler(tmp_path, url)
    dim = s.config.dimensions[0]
    saved: dict[str, Any] | None = None
    billed: list[dict[str, Decimal]] = []

    def reading(*series: tuple[dict[str, str], str], at: float) -> Decimal:
        nonlocal saved
        fake.vector(*series, at=at)
        sample = s.take(dim, at, saved)
        assert sample.error is None, sample.error
        saved = sample.state
        billed.append(by_customer(sample.breakdown))
        assert sample.value is not None
        return sample.value

    x1, x2, y2 = a("acme", "i1"), a("acme", "i2"), a("globex", "i2")
    t = 1_800_000_000.0
    assert reading((x1, "5"), (y2, "3"), at=t) == 0  # first reading: the baselines
    assert reading((x1, "8"), (y2, "3"), (x2, "2"), at=t + 60) == 5  # 3, and i2's new series
    assert billed[-1] == {"acme": 5}
    # a failed scrape makes i2's series stale: missing from the answer, carried at their value
    assert reading((x1, "9"), at=t + 120) == 1
    assert reading((x1, "9"), (y2, "4"), (x2, "2"), at=t + 180) == 1  # back: only the new one
    assert billed[-1] == {"globex": 1}
    # i1 restarted: its counter went down, it counts its new value
    assert reading((x1, "2"), (y2, "4"), (x2, "2"), at=t + 240) == 2
    host.boot("boot-2")  # this machine's reboot resets none of the fleet's counters
    assert reading((x1, "3"), (y2, "4"), (x2, "2"), at=t + 300) == 1
    # a series missing for more than a day is forgotten: seen again, it counts whole
    assert reading((x1, "3"), at=t + 300 + 86_401) == 0
    assert reading((x1, "3"), (y2, "4"), at=t + 300 + 86_460) == 4
    assert fake.requests[0][0] == "/api/v1/query?query=app_requests_total"


def errors_for(tmp_path: Path, url: str, timeout: str = "") -> tuple[Sampler, Any]:
    s, _ = sampler(tmp_path, url, timeout)
    return s, s.config.dimensions[0]


@pytest.mark.parametrize(
    ("status", "answer", "expected"),
    [
        (400, {"status": "error", "errorType": "bad_data", "error": "parse error: unclosed"},
         "answered HTTP 400: bad_data: parse error: unclosed"),
        (503, "<html>down</html>", "answered HTTP 503"),
        (401, "no", "answered HTTP 401 (check the collector's auth)"),
        (200, {"status": "success", "data": {"resultType": "matrix", "result": []}},
         "gave a matrix result, not an instant vector"),
        (200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "+Inf"]}},
         "gave a scalar result"),
        (200, {"status": "success", "data": {"resultType": "vector",
                                             "result": [{"metric": {"customer": "c"},
                                                         "value": [1, "NaN"]}]}},
         "not a finite number"),
        (200, {"status": "success", "data": {"resultType": "vector",
                                             "result": [{"metric": {"customer": "c"},
                                                         "value": [1, "+Inf"]}]}},
         "not a finite number"),
        (200, {"status": "success", "data": {"resultType": "vector",
                                             "result": [{"metric": {"customer": "c"},
                                                         "value": [1, "-2"]}]}},
         "a counter is never negative"),
        (200, {"status": "success", "data": {"resultType": "vector",
                                             "result": [{"metric": {"job": "app"},
                                                         "value": [1, "7"]}]}},
         'series {"job":"app"} has no customer label (saas.customer_label)'),
        (200, {"status": "error", "errorType": "timeout", "error": "query timed out"},
         "answered status 'error': timeout: query timed out"),
        (200, "not json", "did not answer the Prometheus API's JSON"),
    ],
)  # fmt: skip
def test_each_bad_answer_is_the_rounds_collector_error(
    tmp_path: Path, api: tuple[FakeApi, str], status: int, answer: Any, expected: str
) -> None:
    fake, url = api
    s, dim = errors_for(tmp_path, url)
    fake.vector((a("acme", "i1"), "5"))
    first = s.take(dim, 1.0, None)
    assert first.error is None
    fake.answer(answer, status)
    sample = s.take(dim, 2.0, first.state)
    assert sample.error is not None and expected in sample.error
    assert "\n" not in sample.error
    assert sample.value is None and sample.state is None  # nothing stored, baselines kept
    fake.vector((a("acme", "i1"), "9"))
    assert s.take(dim, 3.0, first.state).value == 4  # the next good answer bills what passed


def test_unreachable_slow_and_oversized_sources(tmp_path: Path, api: tuple[FakeApi, str]) -> None:
    fake, url = api
    s, dim = errors_for(tmp_path, "http://127.0.0.1:9")
    error = s.take(dim, 1.0, None).error
    assert error is not None and error.startswith("http://127.0.0.1:9 unreachable:")
    s, dim = errors_for(tmp_path, url, ", timeout: 1")
    fake.vector((a("acme", "i1"), "5"))
    fake.delay = 2.0
    started = time.monotonic()
    error = s.take(dim, 1.0, None).error
    assert time.monotonic() - started < 1.8
    assert error is not None and "gave no complete answer within the 1 s timeout" in error
    fake.delay = 0.0
    s, dim = errors_for(tmp_path, url, ", max_bytes: 1024")
    fake.vector(*[(a(f"c{i}", "i1"), "1") for i in range(40)])
    error = s.take(dim, 1.0, None).error
    assert error is not None and "answered more than 1024 bytes (max_bytes)" in error


def test_a_missing_customer_label_is_fine_outside_saas_mode(
    tmp_path: Path, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    cfg = load(tmp_path, f"{{type: promql, url: '{url}', query: x}}", saas=False)
    s = Sampler(cfg, Registry(), Sources(proc=FakeHost(tmp_path / "h").proc))
    dim = cfg.dimensions[0]
    fake.vector(({"job": "a"}, "1"))
    first = s.take(dim, 1.0, None)
    fake.vector(({"job": "a"}, "4"), ({"job": "b"}, "2"))
    assert s.take(dim, 2.0, first.state).value == 5
    assert dim.collector.kind == "increment" and dim.aggregate == "sum"


@pytest.mark.parametrize(
    ("collector", "key", "message"),
    [
        ("{type: promql, query: x}", "dimensions[0].collector.url", "required key is missing"),
        ("{type: promql, url: 'http://p:9090'}", "dimensions[0].collector.query", "required"),
        ("{type: promql, url: 'http://p:9090?x=1', query: x}", "dimensions[0].collector.url",
         "without a query"),
        ("{type: promql, url: 'http://p', query: x, counter: true}",
         "dimensions[0].collector.counter", "already yields increments"),
        ("{type: promql, url: 'http://p', query: x, auth: {bearer_file: /t, basic: "
         "{username: u, password_file: /p}}}", "dimensions[0].collector.auth",
         "exactly one of bearer_file, basic, sigv4; found 2"),
        ("{type: promql, url: 'http://p', query: x, auth: {sigv4: {service: aps}}}",
         "dimensions[0].collector.auth.sigv4.region", "required key is missing"),
        ("{type: promql, url: 'http://p', query: x, auth: {basic: {username: u, password: p}}}",
         "dimensions[0].collector.auth.basic.password", "unknown key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path: Path, collector: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, collector)
    text = str(caught.value)
    assert key in text and message in text, text


def test_bad_config_is_exit_78_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: r\n"
        "    collector: {type: promql, url: 'http://p', query: x, auth: {sigv4: {region: x}}}\n"
    )
    done = run_cli("check", "--offline", "-c", str(path))
    assert done.returncode == 78
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "dimensions[0].collector.auth.sigv4.region" in lines[0]
    assert "Traceback" not in done.stderr


def test_bearer_and_basic_auth_read_their_files_at_each_query(
    tmp_path: Path, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    s, _ = sampler(tmp_path, url, f", auth: {{bearer_file: {token}}}")
    dim = s.config.dimensions[0]
    fake.vector()
    assert s.take(dim, 1.0, None).error is None
    token.write_text("rotated")
    s.take(dim, 2.0, None)
    assert [r[1]["Authorization"] for r in fake.requests] == ["Bearer t0k3n", "Bearer rotated"]
    token.unlink()
    error = s.take(dim, 3.0, None).error
    assert error is not None and error.startswith(f"auth.bearer_file: cannot read {token}")
    password = tmp_path / "pw"
    password.write_text("p:w\n")
    s, _ = sampler(tmp_path, url, f", auth: {{basic: {{username: me, password_file: {password}}}}}")
    assert s.take(s.config.dimensions[0], 1.0, None).error is None
    assert fake.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(b"me:p:w").decode()


def test_sigv4_signature_is_botocores(tmp_path: Path, api: tuple[FakeApi, str]) -> None:
    """The oracle is botocore's SigV4Auth signing the same GET with the same credentials."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    fake, url = api
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "tok/en+=")
    fetched: list[int] = []

    def fetch() -> Credentials:
        fetched.append(1)
        return creds

    clock = FakeClock()
    query = 'sum by (customer, instance) (app_requests_total{job="a b",path=~"/api/.*"})'
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            mode: saas
            dimensions:
              - name: requests
                collector:
                  type: promql
                  url: '{url}/workspaces/ws-1234/'
                  query: '{query}'
                  auth: {{sigv4: {{region: eu-west-1}}}}
            """
        )
    )
    cfg = config.load(path)
    s = Sampler(cfg, Registry(), Sources(extra={"wall_clock": clock, "aws_credentials": fetch}))
    fake.vector()
    assert s.take(cfg.dimensions[0], 1.0, None).error is None
    sent_path, headers = fake.requests[-1]
    assert sent_path.startswith("/workspaces/ws-1234/api/v1/query?query=sum%20by%20%28")
    request = AWSRequest(method="GET", url=url + sent_path)
    SigV4Auth(BotoCredentials(creds.access_key, creds.secret_key, creds.token), "aps",
              "eu-west-1").add_auth(request)  # fmt: skip
    # botocore signs at its own now: sign ours at that instant and compare
    at = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=timezone.utc
    )
    ours = sign_get(url + sent_path, "eu-west-1", "aps", creds, at)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Security-Token"] == request.headers["X-Amz-Security-Token"]
    assert headers["X-Amz-Date"] == clock.now().strftime("%Y%m%dT%H%M%SZ")
    # credentials are kept between reads, fetched again after a refusal
    s.take(cfg.dimensions[0], 2.0, None)
    assert len(fetched) == 1
    fake.answer({"status": "error", "error": "denied"}, 403)
    s.take(cfg.dimensions[0], 3.0, None)
    fake.vector()
    s.take(cfg.dimensions[0], 4.0, None)
    assert len(fetched) == 2


def test_credentials_child_reads_the_default_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCHILD")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session")
    assert fetch_in_child() == Credentials("AKIDCHILD", "secret", "session", None)


def test_credentials_child_takes_the_instance_role_over_imdsv2(emulator: Any) -> None:
    """The emulator's IMDSv2 (the conftest points botocore at it) serves the instance role's
    credentials with an expiry: the daemon refreshes before it."""
    creds = fetch_in_child()
    assert creds.access_key and creds.secret_key and creds.token
    assert creds.expires is not None and creds.expires > time.time() + 600


def test_warnings_are_billed_and_counted(tmp_path: Path, api: tuple[FakeApi, str]) -> None:
    fake, url = api
    s, dim = errors_for(tmp_path, url)
    fake.vector((a("acme", "i1"), "5"))
    first = s.take(dim, 1.0, None)
    data = json.loads(fake.body)
    data["data"]["result"][0]["value"][1] = "7"
    fake.answer({**data, "warnings": ["partial response: store eu-1 unreachable"]})
    sample = s.take(dim, 2.0, first.state)
    assert sample.value == 2 and sample.error is None
    assert sample.warning is not None and "partial response: store eu-1" in sample.warning
