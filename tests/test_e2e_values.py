"""End to end, issue 10 items 1-5: the real daemon against odd values, a clock stepped back, a
trickling and a hung HTTP source, and kill -9 between two samples of an `integral` dimension.

Oracles: what was written to the log, what the test's own server saw, the real seconds the agent
ran (times the CPUs it has), never a number the agent computed.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import sqlite3
import textwrap
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.clock import hour_start
from agent.emulator import Emulator
from agent.ledger import Ledger
from tests.conftest import PRODUCT, run_cli
from tests.e2e import (
    Agent,
    faketime_env,
    newest_instant,
    offset_to_before_boundary,
    wait_for,
    wait_round_after,
)

pytestmark = pytest.mark.e2e
CPUS = os.cpu_count() or 1


def write_config(tmp_path: Path, url: str, dims: str, interval: str = "2s") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        f'metering: {{endpoint_url: "{url}", send_window: 0}}\n'
        f"sampling: {{interval: {interval}}}\n"
        "dimensions:\n" + textwrap.indent(textwrap.dedent(dims).strip("\n"), "  ") + "\n"
    )
    return path


def env_for(emulator: Emulator, **extra: str) -> dict[str, str]:
    return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url, **extra}


def billed(emulator: Emulator) -> dict[tuple[int, str], str]:
    return {(r.hour, r.dimension): r.quantity_text for r in emulator.records()}


def assert_no_duplicates(emulator: Emulator) -> None:
    codes = [c.get("code") for c in emulator.calls()]
    assert "DuplicateRequestException" not in codes
    assert "IdempotencyConflictException" not in codes


def samples(state: Path, dimension: str) -> list[tuple[float, Decimal]]:
    if not (state / "ledger.db").exists():
        return []
    ledger = Ledger(state, readonly=True)
    try:
        rows = ledger.db.execute(
            "SELECT t, value FROM samples WHERE dimension = ? ORDER BY t", (dimension,)
        ).fetchall()
    except sqlite3.OperationalError:  # the daemon is still creating the ledger
        return []
    finally:
        ledger.close()
    return [(float(t), Decimal(v)) for t, v in rows]


def status_json(config: Path) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill9()


# -- 1. values -------------------------------------------------------------------------------


def test_a_nan_line_beside_a_healthy_dimension(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """A log in `mode: sum` with nan, inf and 61-digit values: those lines add nothing and are
    counted as collector errors, every other line is billed, the other dimension too."""
    log = tmp_path / "jobs.log"
    log.write_text("rows=5\nrows=nan\nrows=2.5\n")
    config = write_config(
        tmp_path,
        emulator.url,
        f"""
        - name: rows
          collector: {{type: log, path: {log}, pattern: 'rows=(?P<value>\\S+)', mode: sum,
                      start_at: beginning}}
          decimals: 1
        - name: vcpus
          collector: {{type: system, metric: cpu_count}}
        """,
    )
    agent = Agent(config, env_for(emulator)).start()
    agents.append(agent)
    state = tmp_path / "state"
    wait_for("the first lines", lambda: sum(v for _, v in samples(state, "rows")) == 7.5, 20, agent)
    with open(log, "a") as f:
        f.write("rows=inf\nrows=" + "9" * 61 + "\nrows=1e61\nrows=1\n")
    wait_for("the next lines", lambda: sum(v for _, v in samples(state, "rows")) == 8.5, 20, agent)
    rows = next(d for d in status_json(config)["dimensions"] if d["name"] == "rows")
    assert rows["collector_errors"] in (2, 3)  # reads that met lines that are not finite decimals
    assert agent.terminate() == 0
    hour = hour_start(time.time())
    got = billed(emulator)
    assert got.get((hour, "vcpus")) == str(CPUS) or got.get((hour - 3600, "vcpus")) == str(CPUS)
    assert sum(Decimal(q) for (_h, d), q in got.items() if d == "rows") == Decimal("8.5")
    assert_no_duplicates(emulator)


def test_a_ledger_with_a_nan_sample_bills_the_finite_samples(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """The ledger an older agent left after `rows=nan`: a NaN sample stored for `rows` (that agent
    then sealed nothing). The upgraded agent drops the NaN sample and bills both dimensions' hour
    from their finite samples; SIGTERM exits 0 and the restart's start-up seal does not crash."""
    state = tmp_path / "state"
    previous = hour_start(time.time()) - 3600
    ledger = Ledger(state)
    with ledger.transaction() as db:
        for dim, value in (("rows", "5"), ("rows", "NaN"), ("vcpus", "4")):
            t = previous + 60 + (30 if value == "NaN" else 0)
            db.execute(
                "INSERT INTO samples (dimension, hour, t, value, span) VALUES (?, ?, ?, ?, 60)",
                (dim, previous, t, value),
            )
    ledger.close()
    config = write_config(
        tmp_path,
        emulator.url,
        """
        - name: rows
          collector: {type: system, metric: users}
        - name: vcpus
          collector: {type: system, metric: cpu_count}
        """,
    )
    agent = Agent(config, env_for(emulator)).start()
    agents.append(agent)
    wait_for(
        "both hours sent",
        lambda: {(previous, "vcpus"), (previous, "rows")} <= set(billed(emulator)),
        30,
        agent,
    )
    assert agent.terminate() == 0
    health = json.loads((state / "health.json").read_text())
    assert health["ok"] is True, health
    last = newest_instant(state)
    again = Agent(config, env_for(emulator)).start()
    agents.append(again)
    # its start-up seal runs before its first round: a round stored means it passed
    wait_for("a round by the restarted agent", lambda: newest_instant(state) != last, 30, again)
    assert again.alive()
    assert again.terminate() == 0
    assert billed(emulator)[(previous, "vcpus")] == "4"
    assert billed(emulator)[(previous, "rows")] == "5"
    assert_no_duplicates(emulator)


# -- 2. a backward clock step ----------------------------------------------------------------


def drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return messages


def test_a_backward_step_of_ten_minutes_stalls_nothing(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """The wall clock steps back ten minutes after an hour boundary (NTP correcting a clock that
    ran ahead). Samples keep coming every interval in real time, the watchdog keeps pinging, the
    hour before is sealed and sent once, and every log line is billed once."""
    state = tmp_path / "state"
    log = tmp_path / "access.log"
    log.write_text("hit\n" * 5)
    config = write_config(
        tmp_path,
        emulator.url,
        f"""
        - name: vcpus
          collector: {{type: system, metric: cpu_count}}
        - name: vcpu_hours
          collector: {{type: system, metric: cpu_count}}
          aggregate: integral
          decimals: 6
        - name: lines
          collector: {{type: log, path: {log}, pattern: hit, start_at: beginning}}
        """,
    )
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    stamp = tmp_path / "faketime"
    lead = 10
    offset = offset_to_before_boundary(lead)
    stamp.write_text(f"{offset:+d}\n")
    env = faketime_env(offset, emulator.url)
    del env["FAKETIME"]
    env.update(
        FAKETIME_TIMESTAMP_FILE=str(stamp),
        FAKETIME_NO_CACHE="1",
        NOTIFY_SOCKET=str(notify),
        WATCHDOG_USEC="2000000",
    )
    started = time.time()
    agent = Agent(config, env).start()
    agents.append(agent)
    before = hour_start(time.time() + offset)  # the hour the agent starts in
    wait_for("the first hour sent", lambda: len(emulator.records()) == 3, 40, agent)
    boundary_real = before + 3600 - offset
    stamp.write_text(f"{offset - 600:+d}\n")  # the step: back ten minutes, into the sealed hour
    stepped = time.time()
    drain(sock)
    with open(log, "a") as f:
        f.write("hit\n" * 7)
    wait_for(
        "lines written after the step sampled within a few intervals",
        lambda: sum(v for _, v in samples(state, "lines")) == 7,
        8,
        agent,
    )
    pings = drain(sock).count("WATCHDOG=1")
    while pings < 3 and time.time() < stepped + 5:
        time.sleep(0.1)
        pings += drain(sock).count("WATCHDOG=1")
    assert pings >= 3  # every second (WatchdogSec=2), not ten minutes later
    stamp.write_text(f"{offset:+d}\n")  # and forward again to the true time
    # a whole round on the true clock (its samples' spans too) before the stop
    wait_round_after(state, time.time() + offset, 2, "a round after the step forward", 20, agent)
    assert agent.terminate() == 0
    stopped = time.time()
    sock.close()
    got = billed(emulator)
    after = before + 3600
    assert set(got) == {(h, d) for h in (before, after) for d in ("vcpus", "vcpu_hours", "lines")}
    assert (got[(before, "lines")], got[(after, "lines")]) == ("5", "7")
    assert got[(before, "vcpus")] == got[(after, "vcpus")] == str(CPUS)
    # the re-lived ten minutes are not billed again: integral at most the real seconds
    assert Decimal(got[(before, "vcpu_hours")]) <= Decimal(CPUS * (lead + 1)) / 3600
    assert Decimal(got[(after, "vcpu_hours")]) <= Decimal(CPUS * (stopped - boundary_real)) / 3600
    assert stopped - started < 60
    assert_no_duplicates(emulator)


# -- 3, 5. slow and hung sources -------------------------------------------------------------


class Source(BaseHTTPRequestHandler):
    """`/trickle`: a valid answer, one byte every 2 s; `/hung`: never a byte. Each request's
    life (from arrival to the moment the agent closed the connection) is recorded."""

    lives: ClassVar[list[float]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        began = time.monotonic()
        try:
            if self.path == "/hung":
                self.connection.settimeout(120)
                self.connection.recv(1)  # returns when the agent closes its end
            else:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
                for byte in b'{"n": 12345678901234567890}':
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    readable, _, _ = select.select([self.connection], [], [], 2)
                    if readable and not self.connection.recv(1):
                        return  # the agent closed the connection
        except OSError:
            pass
        finally:
            type(self).lives.append(time.monotonic() - began)


@pytest.fixture
def source() -> Iterator[str]:
    Source.lives = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Source)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def instants(state: Path, dimension: str) -> list[float]:
    return [t for t, _ in samples(state, dimension)]


def test_a_trickling_http_source_ends_at_its_deadline(
    emulator: Emulator, source: str, tmp_path: Path, agents: list[Agent]
) -> None:
    config = write_config(
        tmp_path,
        emulator.url,
        f"""
        - name: api
          collector: {{type: http, url: '{source}/trickle', query: n, timeout: 3s}}
        - name: vcpus
          collector: {{type: system, metric: cpu_count}}
        """,
        interval="5s",
    )
    agent = Agent(config, env_for(emulator)).start()
    agents.append(agent)
    state = tmp_path / "state"
    wait_for("four vcpus samples", lambda: len(instants(state, "vcpus")) >= 4, 30, agent)
    grid = instants(state, "vcpus")[1:]
    assert all(b - a == 5 for a, b in itertools.pairwise(grid))  # no instant skipped
    assert instants(state, "api") == []  # a cut answer is never parsed as a number
    api = next(d for d in status_json(config)["dimensions"] if d["name"] == "api")
    assert api["collector_errors"] >= 2 and "within the 3 s timeout" in api["last_error"]
    lives = list(Source.lives)  # the connections the agent closed so far (not the stop)
    assert len(lives) >= 2 and all(2.5 < life < 3.5 for life in lives)  # closed at 3 s
    began = time.monotonic()
    assert agent.terminate() == 0
    assert time.monotonic() - began < 10  # the stop never waits for the source


def test_a_hung_source_does_not_halve_the_integral_beside_it(
    emulator: Emulator, source: str, tmp_path: Path, agents: list[Agent]
) -> None:
    config = write_config(
        tmp_path,
        emulator.url,
        f"""
        - name: api
          collector: {{type: http, url: '{source}/hung', query: n, timeout: 5s}}
        - name: vcpu_hours
          collector: {{type: system, metric: cpu_count}}
          aggregate: integral
          decimals: 6
        """,
        interval="5s",
    )
    began = time.time()
    agent = Agent(config, env_for(emulator)).start()
    agents.append(agent)
    state = tmp_path / "state"
    wait_for("six integral samples", lambda: len(instants(state, "vcpu_hours")) >= 6, 45, agent)
    grid = instants(state, "vcpu_hours")[1:]
    assert all(b - a == 5 for a, b in itertools.pairwise(grid))
    assert agent.terminate() == 0
    ended = time.time()
    total = sum(Decimal(q) for (_h, d), q in billed(emulator).items() if d == "vcpu_hours")
    physical = Decimal(CPUS) * Decimal(ended - began) / 3600
    assert total <= physical
    assert total >= physical * Decimal("0.7")  # halved was the bug; start-up takes ~1 s


# -- 4. kill -9 between two samples of an integral dimension ---------------------------------


def test_kill9_between_two_integral_samples_never_bills_above_the_physical_maximum(
    emulator: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """Samples every 20 s; the agent dies 2 s after one and restarts at once: the sample before
    the crash stood for 20 s, the start-up sample for the rest of the interval. Billed: at most
    the CPUs times the real seconds from the first start to the stop."""
    config = write_config(
        tmp_path,
        emulator.url,
        """
        - name: vcpu_hours
          collector: {type: system, metric: cpu_count}
          aggregate: integral
          decimals: 6
        """,
        interval="20s",
    )
    state = tmp_path / "state"
    began = time.time()
    agent = Agent(config, env_for(emulator)).start()
    agents.append(agent)
    on_grid = wait_for(
        "a sample on the 20 s grid",
        lambda: [t for t in instants(state, "vcpu_hours") if t % 20 == 0],
        40,
        agent,
    )
    time.sleep(max(0.0, on_grid[0] + 2 - time.time()))
    agent.kill9()
    again = Agent(config, env_for(emulator)).start()
    agents.append(again)
    wait_for("the start-up sample", lambda: len(instants(state, "vcpu_hours")) >= 3, 20, again)
    time.sleep(3)
    assert again.terminate() == 0
    ended = time.time()
    total = sum(Decimal(q) for (_h, d), q in billed(emulator).items() if d == "vcpu_hours")
    physical = Decimal(CPUS) * Decimal(ended - began) / 3600
    assert 0 < total <= physical
    db = sqlite3.connect(state / "ledger.db")
    assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0  # all sealed at the stop
    db.close()
    assert_no_duplicates(emulator)
