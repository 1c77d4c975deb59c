"""kill -9 while a log is being counted: after restarts, every line is billed exactly once."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import Agent, ledger_hours, ledger_samples, wait_for
from tests.rotation import LOGROTATE, PATTERN, Writer, on_disk

pytestmark = pytest.mark.e2e


def counted(state: Path) -> Decimal:
    """Lines the agent has stored for api_requests: its samples and the hours it sealed (a real
    hour boundary may pass during the test), read in one statement: one snapshot."""
    if not (state / "ledger.db").exists():
        return Decimal(0)
    db = sqlite3.connect(f"file:{state / 'ledger.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT value FROM samples WHERE dimension = 'api_requests' UNION ALL "
            "SELECT quantity FROM hours WHERE dimension = 'api_requests'"
        ).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the daemon is still creating it
            return Decimal(0)
        raise
    finally:
        db.close()
    return sum((Decimal(v) for (v,) in rows), Decimal(0))


LINE = b'10.1.2.3 - - "GET /api/v1/orders HTTP/1.1" 200 512\n'
OTHER = b'10.1.2.3 - - "GET /static/app.js HTTP/1.1" 200 512\n'


def test_kill9_during_counting_neither_loses_nor_repeats(
    emulator: Emulator, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    log.write_bytes((LINE + OTHER) * 200_000)  # a backlog that takes a while to count
    written = 200_000
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: {log}, pattern: '"GET /api/', start_at: beginning}}
            """
        )
    )
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    stop = threading.Event()
    count = {"n": 0}

    def writer() -> None:
        rng = random.Random(5)
        with open(log, "ab", buffering=0) as f:
            while not stop.is_set():
                k = rng.randint(1, 40)
                # lines sometimes arrive in pieces: a partial line must wait for its newline
                data = (LINE + OTHER) * k
                cut = rng.randint(0, len(data))
                f.write(data[:cut])
                time.sleep(0.002)
                f.write(data[cut:])
                count["n"] += k
                time.sleep(rng.uniform(0, 0.01))

    agent = Agent(config, env).start()
    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(11)
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.3, 1.5))  # sometimes mid-backlog, sometimes between rounds
            agent.kill9()
            agent = Agent(config, env).start()
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    written += count["n"]
    # let the agent read everything, then stop it: the partial hour is sealed and sent
    wait_for("every line written read", lambda: counted(tmp_path / "state") >= written, 60, agent)
    assert agent.terminate() == 0
    hours = [h for h in ledger_hours(tmp_path / "state") if h.dimension == "api_requests"]
    assert ledger_samples(tmp_path / "state") == 0
    billed = sum(int(h.quantity.value) for h in hours)
    assert billed == written
    accepted = sum(int(r.quantity) for r in emulator.records())
    assert accepted == written


@pytest.mark.skipif(not os.access(LOGROTATE, os.X_OK), reason=f"{LOGROTATE} is not installed")
def test_real_logrotate_copytruncate_and_kill9_bill_what_is_on_disk(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The real daemon, the real logrotate (copytruncate, the hardest), a writer at ~2,000
    lines/s and kill -9 twice: what the emulator accepted equals the matching lines on disk."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "access.log"
    log.touch()
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            metering: {{endpoint_url: "{emulator.url}", send_window: 3600}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api_requests
                collector: {{type: log, path: '{log}*', pattern: '{PATTERN}'}}
            """
        )
    )
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 500\n  copytruncate\n  compress\n  delaycompress\n}}\n")
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    agent = Agent(config, env).start()
    wait_for("the first sample", lambda: ledger_samples(tmp_path / "state") > 0, 20, agent)
    writer = Writer(log)
    writer.start()
    try:
        for i in range(6):
            # The daemon reads at whole seconds; logrotate runs between them, at x.5 s, so a
            # reading never falls inside copytruncate's own copy-then-truncate window.
            time.sleep(1.5 - time.time() % 1.0)
            subprocess.run(
                [LOGROTATE, "-f", "-s", str(tmp_path / "lr.state"), str(conf)],
                check=True,
                capture_output=True,
            )
            if i in (1, 3):
                time.sleep(0.3)
                agent.kill9()
                agent = Agent(config, env).start()
    finally:
        writer.stop.set()
        writer.join()
    expected = on_disk(logs)  # the writer and logrotate are done: the files stay as they are
    wait_for("the lines on disk read", lambda: counted(tmp_path / "state") >= expected, 60, agent)
    assert agent.terminate() == 0
    assert expected > 5000
    assert sum(int(r.quantity) for r in emulator.records()) == expected
