"""Usage across a fleet through a real Prometheus server (Debian's `prometheus`, 1 s scrapes)
scraping three instances of a small app (tests/fleet_app.py) with per-customer counters, and the
real daemon in SaaS mode reading it with `type: promql`.

On the way: one instance stalls (SIGSTOP) past its scrape timeout, so Prometheus marks its series
stale and they vanish from instant queries, then come back unchanged; another is restarted, so
its counters start again from 0. The oracle is the requests the test made, per customer (each
counted once the app answered it): after a quiescent point (Prometheus holds every final count
and the agent has read after that), the stop seals the hour, and what BatchMeterUsage received
per customer equals them exactly. `check` and `sample` run against the same server.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.conftest import PRODUCT, ROOT, run_cli
from tests.e2e import Agent, ledger_hours, ledger_samples, wait_for

pytestmark = pytest.mark.e2e
CUSTOMERS = ("acme", "globex", "initech")
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


class App:
    """One instance of the fleet's app; `counts` is what its counters hold (since its start)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.counts: Counter[str] = Counter()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fleet_app", str(self.port)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.counts = Counter()
        wait_for(f"app on {self.port}", lambda: _answers(f"http://127.0.0.1:{self.port}/m"), 10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)

    def request(self, customer: str) -> None:
        get(f"http://127.0.0.1:{self.port}/work?customer={customer}")
        self.counts[customer] += 1


def _answers(url: str) -> bool:
    try:
        get(url)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


class Prometheus:
    def __init__(self, tmp: Path, targets: list[int]) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = tmp / "prometheus.yml"
        listed = ", ".join(f"'127.0.0.1:{p}'" for p in targets)
        conf.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 500ms}\n"
            "scrape_configs:\n"
            f"  - job_name: app\n    static_configs: [{{targets: [{listed}]}}]\n"
        )
        with open(tmp / "prometheus.log", "ab") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for("prometheus ready", lambda: _answers(f"{self.url}/-/ready"), 20)

    def counters(self) -> dict[tuple[str, str], int]:
        """What an instant query of the raw counters answers: (instance port, customer) -> n."""
        query = urllib.parse.quote("app_requests_total")
        data = json.loads(get(f"{self.url}/api/v1/query?query={query}"))
        return {
            (r["metric"]["instance"].rsplit(":", 1)[1], r["metric"]["customer"]): int(
                Decimal(r["value"][1])
            )
            for r in data["data"]["result"]
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[list[App], Prometheus]]:
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus)")
    apps = [App(free_port(), tmp_path / f"app{i}.log") for i in range(3)]
    prom: Prometheus | None = None
    try:
        for app in apps:
            app.start()
        prom = Prometheus(tmp_path, [app.port for app in apps])
        yield apps, prom
    finally:
        for app in apps:
            app.stop()
        if prom is not None:
            prom.stop()


def customer(label: str) -> Customer:
    arn = f"arn:aws:license-manager::111122223333:license:l-{label}"
    return Customer(label, "111122223333", arn, f"agmt-{label}", None, None, 0.0)


def drive(apps: list[App], rng: random.Random, n: int, made: Counter[str]) -> None:
    for _ in range(n):
        app, who = rng.choice(apps), rng.choice(CUSTOMERS)
        app.request(who)
        made[who] += 1


def holds(prom: Prometheus, apps: list[App]) -> bool:
    """Prometheus's latest scrape of every instance holds exactly what its counters do."""
    want = {(str(a.port), c): n for a in apps for c, n in a.counts.items()}
    return prom.counters() == want


def test_fleet_usage_billed_exactly_across_a_stall_and_a_restart(
    emulator: Emulator, fleet: tuple[list[App], Prometheus], tmp_path: Path
) -> None:
    apps, prom = fleet
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {state}
            mode: saas
            saas: {{customer_label: customer, idle_zero: false}}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600, startup_check: false}}
            sampling: {{interval: 1}}
            dimensions:
              - name: requests
                collector: {{type: promql, url: '{prom.url}', query: app_requests_total}}
            """
        )
    )
    ledger = Ledger(state)
    for label in CUSTOMERS:
        ledger.add_customer(customer(label))
    ledger.close()
    done = run_cli("check", "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    rng = random.Random(24)
    made: Counter[str] = Counter()
    agent = Agent(config, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}).start()
    try:
        wait_for("the agent's first reading", lambda: ledger_samples(state) > 0, 20, agent)
        drive(apps, rng, 150, made)  # series first seen after the first reading: whole
        stalled, restarted = apps[2], apps[1]
        wait_for("every count scraped", lambda: holds(prom, apps), 10)
        # a stall: the scrape times out, the instance's series go stale, then come back as they were
        assert stalled.proc is not None
        stalled.proc.send_signal(signal.SIGSTOP)
        gone = lambda: not [k for k in prom.counters() if k[0] == str(stalled.port)]  # noqa: E731
        wait_for("the stalled instance's series stale", gone, 10)
        seen = ledger_samples(state)
        drive(apps[:2], rng, 40, made)
        wait_for("two readings while stale", lambda: ledger_samples(state) >= seen + 2, 10, agent)
        assert gone()
        stalled.proc.send_signal(signal.SIGCONT)
        # a restart: that instance's counters start again from 0 (fewer requests than before)
        before = dict(restarted.counts)
        restarted.stop()
        wait_for("the restarted instance's series stale",
                 lambda: not [k for k in prom.counters() if k[0] == str(restarted.port)], 10)  # fmt: skip
        restarted.start()
        for _ in range(20):
            who = rng.choice(CUSTOMERS)
            if restarted.counts[who] + 1 < before.get(who, 0):
                restarted.request(who)
                made[who] += 1
        drive([apps[0], apps[2]], rng, 60, made)
        wait_for("every final count scraped", lambda: holds(prom, apps), 10)
        seen = ledger_samples(state)  # quiescent: the agent's next readings hold every count
        wait_for("two readings after it", lambda: ledger_samples(state) >= seen + 2, 10, agent)
    finally:
        assert agent.terminate() == 0  # the stop seals the partial hour and sends it
    billed: Counter[str] = Counter()
    for h in ledger_hours(state):
        billed[h.customer] += int(h.quantity.text)
        assert h.state == "sent"
    assert billed == made  # exactly the requests made, per customer
    license_of = {customer(c).license_arn: c for c in CUSTOMERS}
    received: Counter[str] = Counter()
    for r in emulator.records():
        received[license_of[r.customer.split("|")[1]]] += int(r.quantity_text)
    assert received == made
    # `sample` reads the same source without writing
    shown = run_cli("sample", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "requests" in shown.stdout
    prom.stop()
    down = run_cli("check", "-c", str(config))
    assert down.returncode == 69, down.stdout + down.stderr
    assert "unreachable" in down.stdout + down.stderr
