"""A real prometheus_client exporter, in its own process with its own registry, whose series come
and go and whose process restarts: what the sampler and a real Ledger bill must equal the sum of the
increments the test really applied (every inc() call after the dimension's first reading).

The exporter is served in both formats prometheus_client speaks: the classic text format and, when
asked by the Accept header, OpenMetrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.ledger import Ledger
from agent.modes import instance as sealing
from tests.billing import H
from tests.conftest import PRODUCT
from tests.fakes import FakeHost

EXPORTER = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    jobs = Counter("jobs", "Jobs done.", ["tenant", "kind"], registry=registry)
    server, _ = start_http_server(int(sys.argv[1]), addr="127.0.0.1", registry=registry)
    print(server.server_port, flush=True)
    for line in sys.stdin:
        cmd, tenant, kind, amount = json.loads(line)
        if cmd == "inc":
            jobs.labels(tenant, kind).inc(amount)
        else:
            jobs.remove(tenant, kind)
        print("ok", flush=True)
    """
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Exporter:
    """The exporter process; `restart()` is a new process (a new registry: every counter at 0)."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "exporter.py"
        self.script.write_text(EXPORTER)
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def _send(self, *command: object) -> None:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def inc(self, tenant: str, amount: float, kind: str = "batch") -> None:
        self._send("inc", tenant, kind, amount)

    def remove(self, tenant: str, kind: str = "batch") -> None:
        self._send("remove", tenant, kind, 0)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Exporter]:
    exp = Exporter(tmp_path)
    yield exp
    exp.stop()


class Agent:
    """The sampler and a real ledger, as the daemon drives them; `restart()` rebuilds both from
    the state directory (a new agent process reading its saved baselines)."""

    def __init__(self, tmp_path: Path, url: str, accept: str | None) -> None:
        headers = f", headers: {{Accept: '{accept}'}}" if accept else ""
        path = tmp_path / "config.yaml"
        path.write_text(
            f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
            "dimensions:\n"
            "  - name: jobs\n"
            f"    collector: {{type: http, url: '{url}', format: prometheus, counter: true,\n"
            f"                query: 'jobs_total{{kind!=\"ignored\"}}'{headers}}}\n"
        )
        self.config = config.load(path)
        self.dim = self.config.dimensions[0]
        self.host = FakeHost(tmp_path / "host")
        self.t = float(H - 300)  # readings cross an hour boundary
        self.restart()

    def restart(self) -> None:
        self.sampler = Sampler(self.config, Registry(), Sources(proc=self.host.proc))
        self.ledger = Ledger(self.config.state_dir)

    def reading(self) -> None:
        sample = self.sampler.take(self.dim, self.t, self.ledger.position(self.dim.name))
        assert sample.error is None and sample.value is not None
        self.ledger.record_sample(self.dim.name, self.t, sample.value, 60, sample.state, carry=True)
        self.t += 60

    def billed(self) -> Decimal:
        sealing.seal_hours(self.ledger, self.config, self.t, 0, include_current=True)
        return sum((Decimal(str(h.quantity.value)) for h in self.ledger.hours()), Decimal(0))


@pytest.mark.parametrize("accept", [None, OPENMETRICS], ids=["classic", "openmetrics"])
def test_billed_equals_the_increments_applied(
    tmp_path: Path, exporter: Exporter, accept: str | None
) -> None:
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Accept": accept or "*/*"}), timeout=10
    ) as answer:
        served = answer.headers["Content-Type"]
    assert served.startswith("application/openmetrics-text" if accept else "text/plain")
    agent = Agent(tmp_path, url, accept)
    applied = 0

    def inc(tenant: str, amount: int, kind: str = "batch") -> None:
        nonlocal applied
        exporter.inc(tenant, amount, kind)
        if kind != "ignored":
            applied += amount

    exporter.inc("acme", 500)  # before the dimension's first reading: not billable
    exporter.inc("globex", 70)
    agent.reading()

    inc("acme", 3)
    inc("globex", 4)
    inc('C:\\new "x"', 10)  # a series first seen after the first reading counts from 0
    inc("acme", 1_000_000, kind="ignored")  # not selected
    agent.reading()

    exporter.remove("globex")  # a series goes away: the others must not look new
    inc("acme", 2)
    agent.reading()

    inc("globex", 1)  # re-created: a new child from 0
    inc('C:\\new "x"', 5)
    agent.reading()

    agent.restart()  # the agent restarts from its saved baselines
    inc("acme", 1)
    agent.reading()

    exporter.restart()  # the exporter restarts: every series from 0, a new registry
    inc("acme", 2)
    inc('C:\\new "x"', 100)  # above its old baseline of 15: only _created shows the restart
    agent.reading()

    inc("globex", 3)
    for _ in range(3):
        inc("acme", 7)
        agent.reading()
    agent.reading()  # nothing new

    assert agent.billed() == applied == 3 + 4 + 10 + 2 + 1 + 5 + 1 + 2 + 100 + 3 + 21
    assert len(agent.ledger.hours()) == 2  # the readings spanned two hours
