"""End to end: the real daemon writes its metrics file, Debian's real node_exporter serves it
(textfile collector only), and what a scrape reads is what the ledger, the emulator, health.json
and the log hold: hours pending while the emulator refuses (AccessDenied: sending pauses, the
stop flush sends nothing either), lines written to the log, collector errors of a source that is
down. (Sends accepted, and the last accepted send: tests/test_metrics.py on a real ledger.)"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.ledger import Ledger
from tests.conftest import PRODUCT
from tests.e2e import Agent, faketime_env, ledger_hours, offset_to_before_boundary, wait_for

pytestmark = pytest.mark.e2e

Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> Scrape:
    """What a Prometheus server would read: name -> {labels: value} (prometheus_client's parser;
    a counter's samples keep their `_total`)."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def answers(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Debian's prometheus-node-exporter with only the textfile collector, on a free port."""
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        pytest.skip("prometheus-node-exporter (Debian) is not installed")
    directory = tmp_path / "textfile"
    directory.mkdir()
    url = f"http://127.0.0.1:{free_port()}/metrics"
    with open(tmp_path / "node_exporter.log", "w") as log:
        proc = subprocess.Popen(
            [binary, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={directory}",
             f"--web.listen-address={url.split('/')[2]}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for("node_exporter to answer", lambda: proc.poll() is None and answers(url), 15)
        yield directory, url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ledger_facts(state: Path) -> tuple[int, int, float | None, int]:
    """pending records, sent records, last accepted send, the broken dimension's errors."""
    hours = ledger_hours(state)
    ledger = Ledger(state, readonly=True)
    try:
        accepted = ledger.send_state().last_accepted
        errors = {d.dimension: d.errors for d in ledger.dimension_status()}
    finally:
        ledger.close()
    pending = sum(h.state == "pending" for h in hours)
    return pending, sum(h.state == "sent" for h in hours), accepted, errors.get("broken", 0)


def first_reading(state: Path, dimension: str) -> bool:
    if not (state / "ledger.db").exists():
        return False
    ledger = Ledger(state, readonly=True)
    try:
        return any(d.dimension == dimension and d.last_t for d in ledger.dimension_status())
    except Exception:  # the daemon still creating it
        return False
    finally:
        ledger.close()


def test_node_exporter_serves_what_the_ledger_the_emulator_and_the_log_hold(
    emulator, tmp_path: Path, node_exporter: tuple[Path, str]
) -> None:
    directory, url = node_exporter
    state, log = tmp_path / "state", tmp_path / "access.log"
    log.write_text("")
    target = directory / "metering-agent.prom"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {state}\n"
        f'metering: {{endpoint_url: "{emulator.url}", send_window: 0, startup_check: false}}\n'
        f"sampling: {{interval: 2s}}\nmetrics: {{textfile: {target}}}\ndimensions:\n"
        "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
        f"  - name: requests\n    collector: {{type: log, path: {log}, pattern: 'GET /api/'}}\n"
        f"  - name: broken\n    collector: {{type: http, url: 'http://127.0.0.1:{free_port()}/', query: up,"
        " timeout: 1s}\n"
    )
    # every MeterUsage refused: the send pass pauses sending and ends, health.json not ok
    emulator.inject("error", count=100_000, code="AccessDeniedException", status=400)
    agent = Agent(cfg, faketime_env(offset_to_before_boundary(5), emulator.url)).start()
    try:
        wait_for("the log's first reading", lambda: first_reading(state, "requests"), 30, agent)
        with log.open("a") as f:  # 25 matching lines among 40
            for i in range(40):
                f.write(f'10.0.0.1 - - "{"GET /api/" if i % 8 < 5 else "POST /x/"}{i}" 200\n')
        # the hour before the boundary sealed and refused: the scrape and the ledger agree
        got = wait_for(
            "the scrape to show the refused hour pending and health not ok",
            lambda: (
                (s := scrape(url)).get("metering_agent_healthy") == {(): 0}
                and s["metering_agent_pending_records"][()] >= 2
                and s["metering_agent_pending_records"][()] == ledger_facts(state)[0]
                and s
            ),
            60,
            agent,
        )
        assert json.loads((state / "health.json").read_text())["ok"] is False
        assert got["metering_agent_oldest_pending_age_seconds"][()] > 0
        assert emulator.records() == []  # (the emulator accepted nothing)
        wait_for(
            "the lines written to be counted as read",
            lambda: (
                scrape(url)["metering_agent_log_lines_read_total"]
                == {(("dimension", "requests"),): 40}
            ),
            30,
            agent,
        )
        assert agent.terminate() == 0  # the partial hour sealed; sending stays paused
    finally:
        if agent.alive():
            agent.kill9()
    # The daemon's last write, after its stop: served as the ledger and the emulator have it.
    final = scrape(url)
    pending, sent, accepted, errors = ledger_facts(state)
    assert pending == final["metering_agent_pending_records"][()] >= 3  # (+ the partial hour)
    assert sent == len(emulator.records()) == 0 and accepted is None
    assert final["metering_agent_recent_records"] == {
        (("state", "sent"),): 0, (("state", "rejected"),): 0, (("state", "expired"),): 0
    }  # fmt: skip
    assert final["metering_agent_last_accepted_timestamp_seconds"] == {(): 0}
    assert final["metering_agent_oldest_pending_age_seconds"][()] > 0
    assert final["metering_agent_healthy"] == {(): 0}
    assert json.loads((state / "health.json").read_text())["ok"] is False
    assert errors > 0
    assert final["metering_agent_collector_errors_total"][(("dimension", "broken"),)] == errors
    assert final["metering_agent_collector_errors_total"][(("dimension", "requests"),)] == 0
    assert final["metering_agent_log_lines_read_total"] == {(("dimension", "requests"),): 40}
    assert final["node_textfile_scrape_error"] == {(): 0}
    assert (("file", str(target)),) in final["node_textfile_mtime_seconds"]
    assert sorted(p.name for p in directory.iterdir()) == ["metering-agent.prom"]  # no temp left
