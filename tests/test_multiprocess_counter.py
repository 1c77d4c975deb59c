"""prometheus_client in multiprocess mode (as under gunicorn): a counter is declared in the answer
only once a worker has written it, and workers come and go. The agent reads before the first
worker wrote; every increment the workers made after that is billed.

Real prometheus_client: each worker is its own process writing its own file in
PROMETHEUS_MULTIPROC_DIR; the exporter is a real HTTP server serving MultiProcessCollector's view.
Oracle: the increments the workers made (60), against 40 billed before the fix.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.config import load
from tests.conftest import PRODUCT

pytest.importorskip("prometheus_client")

EXPORTER = """
import sys, time
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry()
MultiProcessCollector(registry)
start_http_server(int(sys.argv[1]), addr="127.0.0.1", registry=registry)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""

WORKER = """
import sys
from prometheus_client import Counter
requests = Counter("requests", "requests served", ["path"])
for _ in range(int(sys.argv[1])):
    requests.labels(path=sys.argv[2]).inc()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def exporter(tmp_path: Path) -> Any:
    mp = tmp_path / "multiproc"
    mp.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp), "PATH": "/usr/bin:/bin"}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(port)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def worker(increments: int, path: str) -> int:
        """One worker process that serves `increments` requests and exits."""
        subprocess.run([sys.executable, "-c", WORKER, str(increments), path], env=env, check=True)
        return increments

    yield port, worker
    proc.kill()
    proc.wait()


def test_a_counter_first_declared_after_the_agents_first_reading_bills_every_increment(
    tmp_path: Path, exporter: Any
) -> None:
    port, worker = exporter
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            dimensions:
              - name: requests
                collector: {{type: http, url: 'http://127.0.0.1:{port}/metrics',
                             format: prometheus, query: requests_total, counter: true}}
            """
        )
    )
    cfg = load(config)
    (dim,) = cfg.dimensions
    sampler = Sampler(cfg, Registry(), Sources())  # the real host: /proc's boot time and boot id
    billed = Decimal(0)
    state = None
    t = time.time()

    def read() -> None:
        nonlocal billed, state, t
        t += 60
        sample = sampler.take(dim, t, state)
        if sample.value is None:  # as the daemon does: a failed reading stores nothing
            return
        billed += sample.value
        state = sample.state

    read()  # no worker has written yet: the answer has no such metric
    made = worker(20, "/api")  # the first worker declares the counter
    read()
    made += worker(25, "/api")  # workers come and go
    made += worker(5, "/upload")  # a new series of a declared metric
    read()
    made += worker(10, "/api")
    read()
    assert made == 60
    assert billed == made
